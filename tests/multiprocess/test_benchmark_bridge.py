"""Smoke run of ``benchmarks/bridge.py`` at small sizes: 4 ranks load from HF, export bucketed, per tensor and
through the disk, and the report's lines carry the ratios and the buffer bound."""

import os
import re
import subprocess
import sys

import pytest

from support import BENCHMARKS

pytestmark = pytest.mark.slow  # 4 processes, plus two conversions


def test_small_run_reports_every_ratio():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bridge.py"), "--hidden", "128", "--layers", "2",
                             "--experts", "8", "--vocab", "512", "--bucket-mb", "1"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-5:]
    assert lines[0].startswith("model: ") and "4 gloo ranks (TP2 x EP2)" in lines[0]
    assert re.match(r"load: bridge [\d.]+ s; disk route: .* ratio [\d.]+$", lines[1]), lines[1]
    assert re.match(r"export: bucketed [\d.]+ s \(the first, which makes the plan, [\d.]+ s\), per-tensor [\d.]+ s, "
                    r"speed-up [\d.]+x; one HF tensor per bucket [\d.]+ s, speed-up [\d.]+x; disk route: .*x$",
                    lines[2]), lines[2]
    assert re.match(r"export traffic: [\d.]+ GB received per rank; .* take [\d.]+ s \(the floor here\)$", lines[3])
    live, bound = map(float, re.match(r"export buffer: ([\d.]+) MB live per rank; bound .* = ([\d.]+) MB$",
                                      lines[4]).groups())
    assert 0 < live <= bound
