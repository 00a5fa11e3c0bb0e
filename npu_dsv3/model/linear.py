"""MLA's down-projections as one weight every tensor-parallel rank holds whole.

Split over TP (megatron's local spec uses ColumnParallelLinear), the part of
``linear_kv_down_proj``'s output that carries the shared rotary key is used by
every rank's heads but its gradient comes back only from the rank that owns
those columns: the other ranks' heads never reach the weight. Held whole (what
TransformerEngine's ``parallel_mode="duplicated"`` does), each rank projects its
own sequence shard and MLA gathers the rotary key across ranks, whose backward
sums the heads of every rank; ``sequence_parallel`` on the weight makes
megatron all-reduce its gradient over the TP group like a norm's.
"""

import torch
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class DuplicatedLinear(torch.nn.Linear):
    """megatron's parallel-linear constructor and ``(output, bias)`` return; no TP split."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, is_expert: bool = False, gather_output: bool = False, **_unused):
        super().__init__(input_size, output_size, bias=bias, dtype=config.params_dtype)
        if config.perform_initialization:
            init_method(self.weight)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        self._skip_bias_add = skip_bias_add and bias

    def forward(self, x: torch.Tensor):
        if self._skip_bias_add:
            return torch.nn.functional.linear(x, self.weight), self.bias
        return super().forward(x), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # No axis split: one copy, replicated over the TP ranks.
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   sharded_offsets=sharded_offsets)
