"""megatron-core 0.16.1 patches the DeepSeek-V3 model needs without TransformerEngine.

These hold on every backend: Ascend has no TransformerEngine and neither does a
CPU machine, so the CPU run exercises the same module structure as the NPU one.
"""

import importlib.util
import types

from npu_dsv3.config import DeepSeekV3TransformerConfig
from npu_dsv3.model.linear import DuplicatedLinear
from npu_dsv3.model.moe_layer import fused_permute_enabled
from npu_dsv3.model.placement import layer_offset
from npu_dsv3.ops.gmm import gmm
from npu_dsv3.ops.permute import permute as ops_permute
from npu_dsv3.ops.permute import unpermute as ops_unpermute
from npu_dsv3.ops.rotary import apply_rotary
from npu_dsv3.patching import Patch, register

_HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

register(
    Patch(
        name="mla.have_te",
        feature="model",
        target="megatron.core.transformer.multi_latent_attention.HAVE_TE",
        replacement=_HAVE_TE,
        why="megatron's TE extension module imports without TE and leaves HAVE_TE True with TELinear None, "
        "so MLA's isinstance(linear_proj, TELinear) check crashes",
    )
)

register(
    Patch(
        name="mla.duplicated_linear",
        feature="model",
        target="megatron.core.transformer.multi_latent_attention.Linear",
        replacement=DuplicatedLinear,
        why="MLA accepts an unsplit down-projection only as its `Linear`, which is None without TE; ours holds "
        "the weight whole on every TP rank so the rotary key's gradient sums every rank's heads",
    )
)

register(
    Patch(
        name="moe.te_general_gemm",
        feature="model",
        target="megatron.core.transformer.moe.moe_utils.te_general_gemm",
        replacement=None,
        create=True,
        why="the router's gating linear reads te_general_gemm, which is only defined when TE imports",
    )
)


def _gmm(a, b, batch_sizes, trans_b=False):
    """The ``grouped_gemm.ops.gmm`` signature megatron's GroupedMLP calls."""
    return gmm(a, b.transpose(1, 2) if trans_b else b, batch_sizes)


register(
    Patch(
        name="moe.grouped_gemm_ops",
        feature="model",
        target="megatron.core.transformer.moe.grouped_gemm_util.ops",
        replacement=types.SimpleNamespace(gmm=_gmm),
        why="grouped GEMM comes from npu_dsv3.ops.gmm (npu_grouped_matmul on Ascend), not the CUDA grouped_gemm package",
    )
)

register(
    Patch(
        name="moe.grouped_gemm_available",
        feature="model",
        target="megatron.core.transformer.moe.grouped_gemm_util.assert_grouped_gemm_is_available",
        replacement=lambda: None,
        why="GroupedMLP (and our GroupedExperts built on it) asserts the CUDA grouped_gemm package at init",
    )
)


def _mla_rotary(original):
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        # Packed (THD) positions restart per document: megatron's own THD path handles them.
        if getattr(config, "use_fused_rotary_pos_emb", False) and cu_seqlens is None:
            return apply_rotary(t, freqs, mscale)
        return original(t, freqs, config=config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    return apply_rotary_pos_emb


register(
    Patch(
        name="mla.apply_rotary_pos_emb",
        feature="fused-rotary-pos-emb",
        target="megatron.core.transformer.multi_latent_attention.apply_rotary_pos_emb",
        replacement=_mla_rotary,
        wrap=True,
        why="--use-fused-rotary-pos-emb: MLA's RoPE through ops.apply_rotary (npu_rotary_mul on Ascend)",
    )
)


def _dispatcher_permute(original):
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        if fused_permute_enabled() and not drop_and_pad:
            return ops_permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens)
        return original(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, fused=fused,
                        drop_and_pad=drop_and_pad)

    return permute


def _dispatcher_unpermute(original):
    def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
                  drop_and_pad=False):
        if fused_permute_enabled() and not drop_and_pad:
            return ops_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map)
        return original(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map,
                        fused=fused, drop_and_pad=drop_and_pad)

    return unpermute


for _name, _wrapper in (("permute", _dispatcher_permute), ("unpermute", _dispatcher_unpermute)):
    register(
        Patch(
            name=f"moe.dispatcher_{_name}",
            feature="moe-permute-fusion",
            target=f"megatron.core.transformer.moe.token_dispatcher.{_name}",
            replacement=_wrapper,
            wrap=True,
            why=f"--moe-permute-fusion: the dispatcher's token {_name} through ops.{_name} "
            f"(npu_moe_token_{_name} on Ascend) inside MoE layers that enable it",
        )
    )


def _layout_offset(original):
    def get_transformer_layer_offset(config, vp_stage=None, pp_rank=None):
        if isinstance(config, DeepSeekV3TransformerConfig):
            return layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return original(config, vp_stage=vp_stage, pp_rank=pp_rank)

    return get_transformer_layer_offset


# Every module that calls it through its own name: layers add it to their position, the block
# subtracts it to name its checkpoint entries, the MTP layer to number its decoder layer.
for _module in ("transformer_layer", "transformer_block", "multi_token_prediction"):
    register(
        Patch(
            name=f"pipeline.layer_offset.{_module}",
            feature="model",
            target=f"megatron.core.transformer.{_module}.get_transformer_layer_offset",
            replacement=_layout_offset,
            wrap=True,
            why="layers are placed by npu_dsv3.layout (--num-layer-list, --noop-layers, dualpipev), "
            "not megatron's uniform split: the offset of a chunk is its count of earlier real layers",
        )
    )


def _checkpoint_without_output_init(original):
    def __init__(self, fp8=False):
        # megatron tests `fp8 is not None`, so its own default (False) switches FP8 on and then needs TE.
        original(self, fp8=fp8 or None)

    return __init__


register(
    Patch(
        name="recompute.checkpoint_without_output_fp8",
        feature="model",
        target="megatron.core.tensor_parallel.random.CheckpointWithoutOutput.__init__",
        replacement=_checkpoint_without_output_init,
        wrap=True,
        why="CheckpointWithoutOutput() (selective recompute of layernorm, moe_act) reads fp8=False as FP8 on and "
        "calls TransformerEngine's FP8GlobalStateManager",
    )
)
