"""Kernel features: each is one Megatron/MindSpeed flag mapped to one config field.

The field is read where the kernel is chosen (the model's modules, and the
patches in ``npu_dsv3.model.patches`` that receive the config), so two models
in one process can use different choices and the parity tests run both ways.
``--moe-grouped-gemm`` is megatron-core's own field: grouped-GEMM experts
(``ops.gmm``) versus megatron's per-expert ``SequentialMLP``.
"""

import argparse
from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Feature:
    flag: str
    field: str
    help: str


FEATURES = (
    Feature("--use-flash-attn", "use_flash_attn",
            "MLA attention via ops.mla_attention (npu_fusion_attention on Ascend) instead of materialised scores"),
    Feature("--mla-fa-without-pad", "mla_fa_without_pad",
            "pass MLA's 192/128 head dims to npu_fusion_attention unpadded (CANN >= 8.2.RC1)"),
    Feature("--use-fused-rmsnorm", "use_fused_rmsnorm", "RMSNorm via ops.rms_norm (npu_rms_norm on Ascend)"),
    Feature("--use-fused-swiglu", "use_fused_swiglu", "SwiGLU via ops.swiglu (npu_swiglu on Ascend)"),
    Feature("--use-fused-rotary-pos-emb", "use_fused_rotary_pos_emb",
            "MLA RoPE via ops.apply_rotary (npu_rotary_mul on Ascend)"),
    Feature("--moe-permute-fusion", "use_fused_permute",
            "MoE token permutation via ops.permute (npu_moe_token_permute on Ascend)"),
    Feature("--moe-grouped-gemm", "moe_grouped_gemm",
            "routed experts as grouped GEMMs via ops.gmm (npu_grouped_matmul on Ascend) instead of a per-expert loop"),
)


def add_feature_args(parser: argparse.ArgumentParser) -> None:
    """The flags, off unless given, as in Megatron / MindSpeed recipes."""
    group = parser.add_argument_group("kernels")
    for feature in FEATURES:
        group.add_argument(feature.flag, dest=feature.field, action="store_true", help=feature.help)


def feature_overrides(args: argparse.Namespace) -> Dict[str, bool]:
    """Config overrides for the parsed flags."""
    return {feature.field: bool(getattr(args, feature.field)) for feature in FEATURES}


def all_features(enabled: bool) -> Dict[str, bool]:
    """Every kernel choice on (the config default) or off (the unfused baselines)."""
    return {feature.field: enabled for feature in FEATURES if feature.field != "mla_fa_without_pad"}
