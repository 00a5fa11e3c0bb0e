"""Shared test setup: `npu`-marked tests run only where an Ascend NPU is usable;
in-process tests share one single-process gloo world (megatron's parallel state
is process-global, so tests must not each create and destroy their own)."""

import importlib.util

import pytest


def _npu_usable() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return bool(torch.npu.is_available())


def pytest_collection_modifyitems(config, items):
    npu_items = [item for item in items if item.get_closest_marker("npu") is not None]
    if not npu_items or _npu_usable():
        return
    skip = pytest.mark.skip(reason="needs torch_npu and a visible Ascend NPU")
    for item in npu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def world1():
    from npu_dsv3.distributed import ensure_single_process_group

    ensure_single_process_group()
