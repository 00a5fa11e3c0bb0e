"""Shared test setup: tests under tests/multiprocess are marked `multiprocess` (they start training ranks
or whole runs; `-m "not multiprocess"` or `tests/unit` is the fast in-process set); `npu`-marked tests run
only where an Ascend NPU is usable; in-process tests share one single-process gloo world (megatron's
parallel state is process-global, so tests must not each create and destroy their own). Helpers are in
the `support` package beside this file."""

import importlib.util
import json
from pathlib import Path

import pytest

from support import RELEASED_CONFIG


def _npu_usable() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return bool(torch.npu.is_available())


MULTIPROCESS = Path(__file__).resolve().parent / "multiprocess"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MULTIPROCESS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.multiprocess)
    npu_items = [item for item in items if item.get_closest_marker("npu") is not None]
    if not npu_items or _npu_usable():
        return
    skip = pytest.mark.skip(reason="needs torch_npu and a visible Ascend NPU")
    for item in npu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_moe_loss_tracker():
    """megatron's MoE aux-loss tracker is process-global and sized by the first model that logs into it:
    a model with more layers in a later test would index past it. Each test starts with it empty."""
    yield
    import sys

    if "megatron.core.transformer.moe.moe_utils" in sys.modules:
        sys.modules["megatron.core.transformer.moe.moe_utils"].get_moe_layer_wise_logging_tracker().clear()


@pytest.fixture(scope="session")
def world1():
    from npu_dsv3.distributed import ensure_single_process_group

    ensure_single_process_group()


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """Installs tests/support/npu_emulation.py (a plain-torch EMULATION of the documented torch_npu API,
    not torch_npu) as ``sys.modules["torch_npu"]`` for one test; removed afterwards."""
    import sys

    from support import npu_emulation

    monkeypatch.setitem(sys.modules, "torch_npu", npu_emulation)
    monkeypatch.setattr(npu_emulation, "REQUIRE_PADDED_HEAD_DIM", True)
    npu_emulation.calls.clear()
    yield npu_emulation
    npu_emulation.calls.clear()


@pytest.fixture(scope="module")
def released_config_dir(tmp_path_factory):
    """(directory, config dict): the released DeepSeek-V3 config.json as a BF16 checkpoint has it
    (no quantization_config)."""
    with open(RELEASED_CONFIG) as f:
        hf = json.load(f)
    hf.pop("quantization_config")
    path = tmp_path_factory.mktemp("hf")
    (path / "config.json").write_text(json.dumps(hf))
    return str(path), hf
