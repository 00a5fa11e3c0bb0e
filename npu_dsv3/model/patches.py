"""What the megatron-core 0.16.1 patches of the DeepSeek-V3 model put in place: without
TransformerEngine (Ascend has none, nor has a CPU machine, so the CPU run exercises the module
structure the NPU one does), for the kernel switches, and for the layer placement.

The patches themselves (targets, reasons) are declared by the feature modules that register them:
``npu_dsv3.features.model`` (always on), ``features.kernels`` (``--use-fused-rotary-pos-emb``,
``--moe-permute-fusion``) and ``features.recompute``. The wrappers read their choice from the
model's config, so two models in one process can differ.
"""

import importlib.util
import types

from npu_dsv3.config import DeepSeekV3TransformerConfig
from npu_dsv3.model.moe_layer import fused_permute_enabled
from npu_dsv3.model.placement import layer_offset
from npu_dsv3.ops.gmm import gmm
from npu_dsv3.ops.permute import permute as ops_permute
from npu_dsv3.ops.permute import unpermute as ops_unpermute
from npu_dsv3.ops.rotary import apply_rotary

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def _gmm(a, b, batch_sizes, trans_b=False):
    """The ``grouped_gemm.ops.gmm`` signature megatron's GroupedMLP calls."""
    return gmm(a, b.transpose(1, 2) if trans_b else b, batch_sizes)


GROUPED_GEMM_OPS = types.SimpleNamespace(gmm=_gmm)
"""Stands in for the CUDA ``grouped_gemm.ops`` module megatron's GroupedMLP calls."""


def grouped_gemm_available() -> None:
    """megatron's ``assert_grouped_gemm_is_available``: ours always is."""


def mla_rotary(original):
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        # Packed (THD) positions restart per document: megatron's own THD path handles them.
        if getattr(config, "use_fused_rotary_pos_emb", False) and cu_seqlens is None:
            return apply_rotary(t, freqs, mscale)
        return original(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    return apply_rotary_pos_emb


def dispatcher_permute(original):
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        if fused_permute_enabled() and not drop_and_pad:
            return ops_permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens)
        return original(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, fused=fused,
                        drop_and_pad=drop_and_pad)

    return permute


def dispatcher_unpermute(original):
    def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
                  drop_and_pad=False):
        if fused_permute_enabled() and not drop_and_pad:
            return ops_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map)
        return original(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map,
                        fused=fused, drop_and_pad=drop_and_pad)

    return unpermute


def layout_offset(original):
    def get_transformer_layer_offset(config, vp_stage=None, pp_rank=None):
        if isinstance(config, DeepSeekV3TransformerConfig):
            return layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return original(config, vp_stage=vp_stage, pp_rank=pp_rank)

    return get_transformer_layer_offset


def checkpoint_without_output_init(original):
    def __init__(self, fp8=False):
        # megatron tests `fp8 is not None`, so its own default (False) switches FP8 on and then needs TE.
        original(self, fp8=fp8 or None)

    return __init__
