"""Smoke run of ``benchmarks/pipeline.py`` at PP=2: the three schedules (and DualPipeV with
--moe-fb-overlap) run on real gloo processes and the last line reports a bubble fraction per
schedule, DualPipeV's below 1F1B's."""

import os
import re
import subprocess
import sys

import pytest

from support import BENCHMARKS

pytestmark = pytest.mark.slow

SCRIPT = str(BENCHMARKS / "pipeline.py")


def test_pp2_smoke_run_reports_each_schedules_bubble():
    # 20 ms units: with smaller ones the per-op communication overhead (~2 ms) blurs the schedules apart.
    result = subprocess.run(
        [sys.executable, SCRIPT, "--pp", "2", "--micro-batches", "4", "--unit-ms", "20", "--no-plot"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("pp=2 ")] == [
        "1f1b", "interleaved", "dualpipev", "dualpipev-overlap"]
    match = re.fullmatch(r"bubble: 1f1b=([\d.]+) interleaved=([\d.]+) dualpipev=([\d.]+)", lines[-1])
    assert match, lines[-1]
    one_f_one_b, interleaved, dualpipev = map(float, match.groups())
    for fraction in (one_f_one_b, interleaved, dualpipev):
        assert 0 <= fraction < 1
    assert dualpipev < one_f_one_b
    assert lines[-2].startswith("dualpipev/1f1b = ")


def test_bad_sizes_fail_with_one_line():
    result = subprocess.run([sys.executable, SCRIPT, "--pp", "4", "--micro-batches", "4", "--no-plot"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: dualpipev needs --micro-batches (4) >= 2 x PP = 8"
