"""SwiGLU for megatron's MLP (dense layers, shared and per-expert MLPs)."""

import torch
from megatron.core.transformer.module import MegatronModule

from npu_dsv3.ops.swiglu import reference_swiglu, swiglu


class SwiGLU(MegatronModule):
    # MegatronModule: megatron's MLP asks every submodule for its (here empty) sharded state dict.
    def __init__(self, config):
        super().__init__(config)
        self.fn = swiglu if config.use_fused_swiglu else reference_swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
