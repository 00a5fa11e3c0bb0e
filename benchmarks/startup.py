#!/usr/bin/env python
"""Start-up time of the ``npu-dsv3`` command against ``python -c "import torch"``.

    python benchmarks/startup.py                # 7 repetitions of each case, medians
    python benchmarks/startup.py --repeats 15

Every case is a fresh process, timed from its start to its exit, except the conversion, which is
timed to the first progress-bar line it writes on stderr (tqdm's ``hf2mcore: ...`` line, drawn
before the first rank file is written):

- ``import torch``: the floor; ``import npu_dsv3`` selects the backend, which imports torch.
- ``import torch + megatron.core``: what any command that touches megatron-core pays on top.
- ``npu-dsv3 --help``: builds every subcommand's parser.
- ``convert hf2mcore, bad argument``: argparse rejects ``--target-tensor-parallel-size zero``.
- ``convert hf2mcore, first progress line``: a conversion of the tests' tiny model
  (``npu_dsv3.tiny_model``) into a fresh directory each time.

Each line prints the median, its difference from the ``import torch`` median and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PYTHON = sys.executable


def _cli() -> list[str]:
    script = shutil.which("npu-dsv3")
    return [script] if script else [PYTHON, "-m", "npu_dsv3"]


def time_exit(cmd: list[str], expect_rc: int) -> float:
    """Seconds from start to exit; the exit status must be ``expect_rc``."""
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != expect_rc:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}, expected {expect_rc}: {done.stderr.decode()}")
    return elapsed


def time_first_progress(cmd: list[str], marker: bytes) -> float:
    """Seconds from start until ``marker`` appears on stderr; the process then runs to the end."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, elapsed = b"", None
    while elapsed is None:
        chunk = os.read(proc.stderr.fileno(), 4096)  # tqdm ends its lines with \r, so read bytes
        if not chunk:
            break
        seen += chunk
        if marker in seen:
            elapsed = time.perf_counter() - start
    seen += proc.stderr.read()
    if proc.wait() != 0 or elapsed is None:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} without printing {marker!r}: {seen.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each case (the median is shown)")
    args = parser.parse_args()

    from npu_dsv3.tiny_model import make_hf_model, save_hf

    cli = _cli()
    with tempfile.TemporaryDirectory() as tmp:
        hf = save_hf(make_hf_model(), os.path.join(tmp, "hf"))
        runs = iter(range(10**6))
        cases = [
            ("import torch", lambda: time_exit([PYTHON, "-c", "import torch"], 0)),
            ("import torch + megatron.core", lambda: time_exit([PYTHON, "-c", "import torch, megatron.core"], 0)),
            ("npu-dsv3 --help", lambda: time_exit([*cli, "--help"], 0)),
            ("convert hf2mcore, bad argument", lambda: time_exit(
                [*cli, "convert", "hf2mcore", "--load-dir", hf, "--save-dir", os.path.join(tmp, "never"),
                 "--target-tensor-parallel-size", "zero"], 2)),
            ("convert hf2mcore, first progress line", lambda: time_first_progress(
                [*cli, "convert", "hf2mcore", "--load-dir", hf, "--save-dir", os.path.join(tmp, f"out{next(runs)}")],
                b"hf2mcore:")),
        ]
        medians = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits every case alike
            for name, run in cases:
                medians.setdefault(name, []).append(run())
    base = statistics.median(medians["import torch"])
    print(f"{sys.executable}, {args.repeats} runs each, median seconds")
    for name, times in medians.items():
        median = statistics.median(times)
        print(f"{name:40s} {median:6.2f} s   {median - base:+6.2f} s   x{median / base:4.2f}")


if __name__ == "__main__":
    main()
