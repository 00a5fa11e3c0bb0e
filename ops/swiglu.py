"""``swiglu(x) = silu(x[..., :n]) * x[..., n:]`` for ``x`` of width ``2n`` (gate first, then up)."""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
