"""Kernel switches: each is one Megatron/MindSpeed flag mapped to one config field.

The field is read where the kernel is chosen (the model's modules, and the
wrappers in ``npu_dsv3.model.patches`` that receive the config), so two models
in one process can use different choices and the parity tests run both ways.
``--moe-grouped-gemm`` is megatron-core's own field: grouped-GEMM experts
(``ops.gmm``) versus megatron's per-expert ``SequentialMLP``; it is also a layout
flag (``npu_dsv3.layout``: the converters write grouped or per-expert weights).
The kernels themselves are in ``ops/``.
"""

import argparse
from dataclasses import dataclass
from typing import Dict, List

NAME = "kernels"
TESTS = ("tests/unit/test_features.py, tests/unit/test_ops.py, tests/unit/test_ops_npu_paths.py, "
         "tests/unit/test_npu_smoke.py")


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


_OLD_PERMUTE_FLAG = "--use-fused-moe-token-permute-and-unpermute"

FLAGS = {
    **{f.flag: f"config.{f.field}" for f in FEATURES},
    _OLD_PERMUTE_FLAG: "config.use_fused_permute (MindSpeed's older --moe-permute-fusion)",
}


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


def add_flags(parser: argparse.ArgumentParser) -> None:
    add_feature_args(parser)
    parser.set_defaults(moe_grouped_gemm=None)  # a layout flag too: None ("not given") until the layout resolves
    parser.add_argument(_OLD_PERMUTE_FLAG, dest="use_fused_permute", action="store_true",
                        help="MindSpeed's older name of --moe-permute-fusion")


config_fields = feature_overrides


def patches() -> List:
    from npu_dsv3.model import patches as model
    from npu_dsv3.patching import Patch

    rotary = Patch(name="mla.apply_rotary_pos_emb", feature=NAME,
                   target="megatron.core.transformer.multi_latent_attention.apply_rotary_pos_emb",
                   replacement=model.mla_rotary, wrap=True,
                   why="--use-fused-rotary-pos-emb: MLA's RoPE through ops.apply_rotary (npu_rotary_mul on Ascend)")
    return [rotary] + [
        Patch(name=f"moe.dispatcher_{name}", feature=NAME,
              target=f"megatron.core.transformer.moe.token_dispatcher.{name}",
              replacement=wrapper, wrap=True,
              why=f"--moe-permute-fusion: the dispatcher's token {name} through ops.{name} (npu_moe_token_{name} on "
              "Ascend) inside MoE layers that enable it")
        for name, wrapper in (("permute", model.dispatcher_permute), ("unpermute", model.dispatcher_unpermute))
    ]
