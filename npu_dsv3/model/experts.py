"""Routed experts as two grouped GEMMs (fc1 = [gate; up] -> SwiGLU -> fc2).

Parameters keep megatron-core's ``GroupedMLP`` layout (``weight1`` is
``[hidden, experts * 2 * ffn]`` viewed as ``[experts, hidden, 2 * ffn]``) so its
sharded-state-dict mapping and checkpoints stay interchangeable with
megatron-core and MindSpeed. The forward runs on ``npu_dsv3.ops.gmm`` in any
dtype (megatron's version asserts bf16 and needs the CUDA grouped_gemm package).
"""

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import GroupedMLP

from npu_dsv3.ops.gmm import gmm
from npu_dsv3.ops.swiglu import reference_swiglu, swiglu


class GroupedExperts(GroupedMLP):
    def __init__(self, num_local_experts, config, pg_collection=None):
        if not (config.gated_linear_unit and config.activation_func is torch.nn.functional.silu):
            raise ValueError("GroupedExperts implements SwiGLU experts only (hidden_act silu)")
        super().__init__(num_local_experts, config, pg_collection=pg_collection)
        self.swiglu = swiglu if config.use_fused_swiglu else reference_swiglu

    def _act_with_probs(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return (self.swiglu(fc1_out) * probs.unsqueeze(-1)).to(fc1_out.dtype)

    def _fc1(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """The base fc1 GEMM (QLoRA's NF4 experts replace it, npu_dsv3.lora.nf4_base)."""
        return gmm(x, self.weight1.view(self.num_local_experts, self.config.hidden_size, -1), tokens_per_expert)

    def _fc2(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return gmm(x, self.weight2.view(self.num_local_experts, -1, self.config.hidden_size), tokens_per_expert)

    def forward(self, permuted_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        tokens_per_expert = torch.as_tensor(tokens_per_expert)
        fc1_out = self._fc1(permuted_hidden, tokens_per_expert)
        if self.activation_recompute:
            checkpoint = tensor_parallel.CheckpointWithoutOutput()
            act = checkpoint.checkpoint(self._act_with_probs, fc1_out, permuted_probs)
            out = self._fc2(act, tokens_per_expert)
            checkpoint.discard_output_and_register_recompute(out)
        else:
            out = self._fc2(self._act_with_probs(fc1_out, permuted_probs), tokens_per_expert)
        return out, None
