"""Smoke run of ``benchmarks/fb_overlap.py`` at small sizes: DualPipeV's overlapped pairs are recorded on
every rank, part of their communication runs beside the other lane's compute, and the last line reports
the overlap fraction and the iteration-time ratio."""

import os
import re
import subprocess
import sys

import pytest

from support import BENCHMARKS

pytestmark = pytest.mark.slow  # two trainings of 4 processes each

SCRIPT = str(BENCHMARKS / "fb_overlap.py")
LAST_LINE = (r"fb-overlap: comm overlapped with the other lane's compute ([\d.]+); "
             r"iteration time with/without overlap ([\d.]+)")


def _run(*flags, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *flags], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_small_run_records_pairs_and_reports_the_overlap():
    result = _run("--hidden", "128", "--layers", "4", "--experts", "8", "--seq-length", "32",
                  "--global-batch-size", "8", "--iters", "1", "--no-plot")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(LAST_LINE, lines[-1])
    assert match, lines[-1]
    overlap, ratio = map(float, match.groups())
    assert 0 < overlap <= 1
    assert ratio > 0
    pairs = [int(m.group(1)) for line in lines if (m := re.match(r"rank \d: (\d+) overlapped pairs recorded", line))]
    assert len(pairs) == 4 and all(p > 0 for p in pairs), lines


def test_bad_option_fails_with_one_line():
    result = _run("--global-batch-size", "6", "--no-plot", timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "error: --global-batch-size must be even and >= 8: dualpipev needs >= 4 micro-batches "
        "per DP rank (got 6)")
