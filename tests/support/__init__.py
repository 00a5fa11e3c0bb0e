"""What the tests share: paths, free ports, the environment of the processes they start, and (as
modules of this package) checkpoint builders (``checkpoint_files``), the torchrun-like runner of training
ranks (``pretrain_runs``), the rank script that loads converted checkpoints (``mp_load_converted``), the
plain-torch emulation of torch_npu (``npu_emulation``), op tolerances (``op_asserts``) and the flags of
MindSpeed-LLM's DeepSeek-V3 recipes (``recipes``).

The tests are in two folders: ``tests/unit`` runs in the pytest process (one single-process gloo world,
CLI subprocesses at most); ``tests/multiprocess`` starts training ranks or whole runs (conftest marks
them ``multiprocess``).
"""

import os
import socket
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASED_CONFIG = FIXTURES / "deepseek_v3_config.json"
SHELL = REPO / "shell"
BENCHMARKS = REPO / "benchmarks"
MP_LOAD_CONVERTED = Path(__file__).resolve().parent / "mp_load_converted.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict:
    """This process's environment for a child Python process that imports ``support`` (a test file run as a
    rank script, ``mp_load_converted``), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
