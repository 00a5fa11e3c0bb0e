"""Where an op takes its torch_npu path: tensors on an NPU device.

Dispatch is by device, not by a global switch, so the same function serves a
CPU test and an NPU training step, and tests can run the NPU implementations on
CPU tensors against a plain-torch emulation of torch_npu.
"""

import importlib

import torch


def on_npu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "npu"


def torch_npu():
    """The torch_npu module (imported on first use: it is absent off Ascend)."""
    return importlib.import_module("torch_npu")
