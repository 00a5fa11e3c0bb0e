"""``swiglu(x) = silu(x[..., :n]) * x[..., n:]`` for ``x`` of width ``2n`` (gate first, then up).

- NPU: ``torch_npu.npu_swiglu(x, dim=-1)``.
- Portable: one chunk, silu and multiply; torch fuses nothing more on CPU.
"""

import torch
import torch.nn.functional as F

from npu_dsv3.ops._npu import on_npu, torch_npu


def reference_swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def npu_swiglu(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:  # the kernel takes no empty tensor (an expert shard that received no tokens)
        return reference_swiglu(x)
    return torch_npu().npu_swiglu(x.contiguous(), dim=-1)  # nor a non-contiguous one


def swiglu(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim (gate and up halves), got {x.shape[-1]}")
    if on_npu(x):
        return npu_swiglu(x)
    return reference_swiglu(x)
