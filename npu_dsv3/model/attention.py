"""MLA pieces megatron-core lacks without TransformerEngine.

Core attention: megatron's local DotProductAttention assumes one head dim for q, k
and v; MLA needs ``k_channels`` (192) != ``v_channels`` (128). ``--mla-mm-split``:
MLA with its up-projections as separate linears (``SplitMLASelfAttention``)."""

import dataclasses
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import build_module

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


class _HeadConcat(torch.nn.Module):
    """Stands in for an unsplit up-projection in megatron's MLA forward: the parts' outputs
    side by side within each head, which is the unsplit linear's output (its rows per head
    are the parts' rows in turn). The parts belong to the attention module; they are not
    registered here, so each parameter keeps its one name."""

    def __init__(self, parts, heads_per_partition: int):
        super().__init__()
        self._parts = tuple(parts)
        self.heads = heads_per_partition

    def forward(self, x: torch.Tensor):
        outs = [part(x)[0] for part in self._parts]
        per_head = [out.view(*out.shape[:-1], self.heads, -1) for out in outs]
        return torch.cat(per_head, dim=-1).flatten(-2), None


class SplitMLASelfAttention(MLASelfAttention):
    """``--mla-mm-split``: MLA with each up-projection stored and run as one column-parallel
    linear per part, named as MindSpeed-LLM's converter names them (``linear_qk_nope`` /
    ``linear_qk_rope`` for q behind a LoRA down-projection, ``linear_kv_nope`` / ``linear_v``);
    each splits over TP by heads, as the unsplit linear does."""

    def __init__(self, config, submodules: MLASelfAttentionSubmodules, layer_number: int, **kwargs):
        if config.cache_mla_latents or config.qk_clip:
            raise ValueError("--mla-mm-split does not support cache_mla_latents or qk_clip, which rewrite the "
                             "unsplit up-projection weights")
        # megatron builds the unsplit up-projections; build none (IdentityOp), then the parts.
        placeholders = dataclasses.replace(submodules, linear_q_up_proj=IdentityOp, linear_kv_up_proj=IdentityOp)
        super().__init__(config, placeholders, layer_number, **kwargs)
        nope, rope, v = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
        if config.q_lora_rank is not None:
            self.linear_qk_nope = self._part(submodules.linear_q_up_proj, config.q_lora_rank, nope, "qk_nope")
            self.linear_qk_rope = self._part(submodules.linear_q_up_proj, config.q_lora_rank, rope, "qk_rope")
            self.linear_q_up_proj = _HeadConcat((self.linear_qk_nope, self.linear_qk_rope),
                                                self.num_attention_heads_per_partition)
        self.linear_kv_nope = self._part(submodules.linear_kv_up_proj, config.kv_lora_rank, nope, "kv_nope")
        self.linear_v = self._part(submodules.linear_kv_up_proj, config.kv_lora_rank, v, "v")
        self.linear_kv_up_proj = _HeadConcat((self.linear_kv_nope, self.linear_v),
                                             self.num_attention_heads_per_partition)

    def _part(self, linear, in_features: int, head_dim: int, name: str):
        return build_module(
            linear, in_features, self.config.num_attention_heads * head_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name=name, tp_group=self.pg_collection.tp,
        )
