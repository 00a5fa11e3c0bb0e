"""MLA pieces megatron-core lacks without TransformerEngine.

Core attention: megatron's local DotProductAttention assumes one head dim for q, k
and v; MLA needs ``k_channels`` (192) != ``v_channels`` (128). ``--mla-mm-split``:
MLA with its up-projections as separate linears (``SplitMLASelfAttention``), stored in
distributed checkpoints as the unsplit linears, so one checkpoint loads into either model."""

import dataclasses
import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
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


class HeadConcat(torch.nn.Module):
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
            self.linear_q_up_proj = HeadConcat((self.linear_qk_nope, self.linear_qk_rope),
                                                self.num_attention_heads_per_partition)
        self.linear_kv_nope = self._part(submodules.linear_kv_up_proj, config.kv_lora_rank, nope, "kv_nope")
        self.linear_v = self._part(submodules.linear_kv_up_proj, config.kv_lora_rank, v, "v")
        self.linear_kv_up_proj = HeadConcat((self.linear_kv_nope, self.linear_v),
                                             self.num_attention_heads_per_partition)

    def _splits(self):
        """(unsplit linear, its parts as (name, rows per head)) for each split up-projection."""
        nope, rope, v = self.config.qk_head_dim, self.config.qk_pos_emb_head_dim, self.config.v_head_dim
        splits = [("linear_kv_up_proj", (("linear_kv_nope", nope), ("linear_v", v)))]
        if self.config.q_lora_rank is not None:
            splits.insert(0, ("linear_q_up_proj", (("linear_qk_nope", nope), ("linear_qk_rope", rope))))
        return splits

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The parts under the unsplit linears' keys (the layout megatron's MLA and the converter
        write), so the checkpoint is the same with or without ``--mla-mm-split``."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for unsplit, parts in self._splits():
            head_rows = sum(rows for _, rows in parts)
            block = math.gcd(*(rows for _, rows in parts))
            start = 0
            for index, (name, rows) in enumerate(parts):
                # The weight, and what a part holds in its stead (QLoRA's NF4 codes, rows of the weight): the
                # rows it fills in the unsplit entry. Other weight data (NF4 scales) is the unsplit tensor's,
                # the same in every part: stored once, from the first part.
                local_rows = getattr(self, name).output_size_per_partition
                for key in [k for k in state if k.startswith(f"{prefix}{name}.weight")]:
                    suffix = key[len(f"{prefix}{name}.weight"):]
                    entry, unsplit_key = state[key], f"{prefix}{unsplit}.weight{suffix}"
                    if entry.local_shape[len(entry.local_shape) - 2] == local_rows:
                        state[key] = _rows_in_unsplit(entry, unsplit_key, sharded_offsets, rows, start, head_rows,
                                                      block)
                    else:
                        state[key] = dataclasses.replace(entry, key=unsplit_key,
                                                         replica_id=(index, *entry.replica_id[1:]))
                start += rows
            extras = [state.pop(f"{prefix}{name}._extra_state") for name, _ in parts]
            state[f"{prefix}{unsplit}._extra_state"] = dataclasses.replace(extras[0],
                                                                           key=f"{prefix}{unsplit}._extra_state")
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # What sharded_state_dict stores as the unsplit linear's extra state is every part's.
        for unsplit, parts in self._splits():
            extra_key = f"{prefix}{unsplit}._extra_state"
            if extra_key in state_dict:
                extra = state_dict.pop(extra_key)
                for name, _ in parts:
                    state_dict.setdefault(f"{prefix}{name}._extra_state", extra)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _part(self, linear, in_features: int, head_dim: int, name: str):
        return build_module(
            linear, in_features, self.config.num_attention_heads * head_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name=name, tp_group=self.pg_collection.tp,
        )


def _rows_in_unsplit(part: ShardedTensor, unsplit_key: str, sharded_offsets: tuple, rows: int, start: int,
                     head_rows: int, block: int) -> ShardedTensorFactory:
    """A TP shard of a part (``rows`` per head) as the rows it fills in the unsplit weight, whose
    heads hold ``head_rows`` rows with the part's from ``start``. Those rows are not one block of
    the unsplit weight, and megatron's checkpoint shards are the cells of a regular grid: the
    grid here has ``block`` rows per cell, a divisor of every part's rows, and the part is the
    cells of its rows. The factory's data stays the parameter, so optimizer states map the same way."""
    axis = len(sharded_offsets)
    first_head = part.global_offset[axis] // rows
    cells = part.global_shape[axis] // rows * head_rows // block

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(f"{key}: --mla-mm-split parts are stored whole, not as flattened ranges")
        pieces = []
        for head in range(data.shape[0] // rows):
            for row in range(0, rows, block):
                cell = ((first_head + head) * head_rows + start + row) // block
                pieces.append(ShardedTensor.from_rank_offsets(
                    key, data[head * rows + row:head * rows + row + block], *sharded_offsets, (axis, cell, cells),
                    replica_id=replica_id, prepend_axis_num=axis))
        return pieces

    return ShardedTensorFactory(unsplit_key, part.data, build, torch.cat, part.replica_id)


SPLIT_PARTS = ("linear_qk_nope", "linear_qk_rope", "linear_kv_nope", "linear_v")


def mtp_block_without_stale_parts(original):
    """megatron's ``MultiTokenPredictionBlock.sharded_state_dict``. Its generic pass over its children reads the
    MTP layers' plain ``state_dict`` before each layer's own ``sharded_state_dict`` replaces the entries, so the
    split parts' ``_extra_state`` entries, which ``SplitMLASelfAttention`` stores under the unsplit linear's
    key, stay behind as keys no checkpoint has; they are dropped."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = original(self, prefix, sharded_offsets, metadata)
        stale = [k for k in state if k.endswith("._extra_state") and k.rsplit(".", 2)[-2] in SPLIT_PARTS]
        for key in stale:
            del state[key]
        return state

    return sharded_state_dict
