"""Smoke run of benchmarks/lora.py at a toy size: it runs, and LoRA trains and saves a fraction of full
fine-tuning's tensors (the speed and memory targets are the benchmark's, at its own size)."""

import re
import subprocess
import sys

from support import BENCHMARKS


def test_benchmark_prints_lora_against_full_fine_tuning():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "lora.py"), "--hidden", "128", "--layers", "2",
                           "--experts", "8", "--vocab", "512", "--seq", "32", "--steps", "1", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(.+?): full .* ratio ([0-9.]+)$", proc.stdout,
                                                                   re.M)}
    assert set(ratios) == {"step time", "peak live tensor memory", "trainable parameters",
                           "checkpoint of the trained tensors"}
    assert ratios["trainable parameters"] < 0.5 and ratios["checkpoint of the trained tensors"] < 0.5
    assert ratios["peak live tensor memory"] < 1
