"""Core attention for MLA: megatron's local DotProductAttention assumes one head
dim for q, k and v; MLA needs ``k_channels`` (192) != ``v_channels`` (128)."""

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from npu_dsv3.ops.attention import mla_attention, reference_attention


class MLACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("MLACoreAttention does not support context parallelism (set --context-parallel-size 1)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"MLACoreAttention is causal only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.without_pad = config.mla_fa_without_pad
        self.attention_fn = mla_attention if config.use_flash_attn else reference_attention

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        cu_seqlens = None
        if packed_seq_params is not None:
            # megatron passes packed (THD) q/k/v as [t, h, d]; the op takes [t, 1, h, d].
            cu_seqlens = packed_seq_params.cu_seqlens_q
            query, key, value = (t.unsqueeze(1) if t.dim() == 3 else t for t in (query, key, value))
        kwargs = dict(causal=True, cu_seqlens=cu_seqlens)
        if self.attention_fn is mla_attention:
            kwargs["without_pad"] = self.without_pad
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p == 0.0:
            return self.attention_fn(query, key, value, self.softmax_scale, **kwargs)
        # Heads are split over TP ranks, so each rank needs its own dropout stream.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_fn(query, key, value, self.softmax_scale, dropout_p=dropout_p, **kwargs)
