"""Runs ``python -m npu_dsv3.pretrain`` as torchrun would: one process per rank on gloo, with
MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK set, and reads back the per-iteration
records of ``--log-jsonl``. When a rank fails the others are killed (as torchrun does), so a rank
left waiting in a collective does not hang the test.

``crash_saving`` runs the ranks through a bootstrap that makes ``torch.save`` die half-way through
the first file whose path contains that text (``os._exit``, no clean-up), to show what a crash
mid-save leaves on disk.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from npu_dsv3.checkpoint.sources import TRACKER_FILE
from support import free_port
from npu_dsv3.training.checkpointing import iteration_dir

CRASH_EXIT = 86
_CRASH_BOOTSTRAP = f"""
import os, runpy, sys, torch
save = torch.save
def crashing_save(obj, f, *args, **kwargs):
    if os.environ["NPU_DSV3_TEST_CRASH_SAVING"] in str(f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        os._exit({CRASH_EXIT})
    return save(obj, f, *args, **kwargs)
torch.save = crashing_save
runpy.run_module("npu_dsv3.pretrain", run_name="__main__")
"""


def _wait(procs, timeout: float) -> List[int]:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    return [p.returncode for p in procs]


def run_pretrain(world: int, flags: List[str], log: Path, crash_saving: Optional[str] = None,
                 timeout: float = 300, module: str = "npu_dsv3.pretrain") -> List[dict]:
    """The records of ``log`` after a run of ``world`` ranks of ``module`` with ``flags``; the ranks'
    stdout and stderr go to ``log`` + ``.rank<r>.out`` / ``.err``. A failing rank fails the call,
    except the crash ``crash_saving`` asks for."""
    program = ["-m", module] if crash_saving is None else ["-c", _CRASH_BOOTSTRAP]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "NPU_DSV3_TEST_CRASH_SAVING": crash_saving or ""}
    errs = [Path(f"{log}.rank{r}.err") for r in range(world)]
    procs = []
    for rank, err in enumerate(errs):
        with open(err, "w") as stderr, open(rank_stdout(log, rank), "w") as stdout:
            procs.append(subprocess.Popen([sys.executable, *program, "--log-jsonl", str(log), *flags],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=stdout, stderr=stderr))
    codes = _wait(procs, timeout)
    if crash_saving is None:
        failed = [r for r, c in enumerate(codes) if c != 0]
        assert not failed, f"rank {failed[0]} exited with {codes[failed[0]]}: {errs[failed[0]].read_text()[-3000:]}"
    else:
        assert CRASH_EXIT in codes, f"no rank crashed writing {crash_saving}: exit codes {codes}"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def rank_stdout(log: Path, rank: int) -> Path:
    """Where ``run_pretrain`` keeps what ``rank`` printed (the Megatron lines: the logging rank's)."""
    return Path(f"{log}.rank{rank}.out")


def stopped_at(root: Path, iteration: int, dest: Path) -> Path:
    """``dest`` as a run killed right after saving ``iteration`` under ``root`` leaves it: that
    checkpoint and a tracker naming it."""
    dest.mkdir()
    os.symlink(iteration_dir(str(root), iteration), iteration_dir(str(dest), iteration))
    (dest / TRACKER_FILE).write_text(str(iteration))
    return dest
