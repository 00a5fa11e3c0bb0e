"""Activation recompute: megatron-core's full (whole layers) and selective (named parts) recompute,
with MindSpeed's flag names. The recompute itself is megatron's and the model's
(``npu_dsv3.model.experts`` recomputes the grouped experts' activation for ``moe_act``).
"""

import argparse
from typing import List

from npu_dsv3.argtypes import ArgsError, Unsupported, positive_int

NAME = "recompute"
TESTS = ("tests/multiprocess/test_pretrain_layouts.py (recompute runs), tests/multiprocess/test_dualpipev_training.py, "
         "tests/unit/test_arguments.py")

FLAGS = {
    "--recompute-granularity": "config.recompute_granularity",
    "--recompute-method": "config.recompute_method",
    "--recompute-num-layers": "config.recompute_num_layers",
    "--recompute-modules": "config.recompute_modules",
    "--recompute-activation-function": Unsupported(
        "MindSpeed's activation-only recompute has no megatron-core equivalent that combines with full recompute; "
        "use --recompute-granularity selective --recompute-modules moe_act"),
    "--recompute-mtp-layer": Unsupported("megatron-core recomputes the MTP layer itself under --recompute-granularity "
                                         "full --recompute-method uniform --recompute-num-layers 1"),
    "--recompute-mtp-norm": Unsupported("MindSpeed's MTP norm recompute is not implemented"),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="recompute activations in the backward: whole layers or --recompute-modules (none)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: groups of --recompute-num-layers layers, or that many layers per stage")
    g.add_argument("--recompute-num-layers", type=positive_int, default=None,
                   help="layers per recompute group (uniform) or recomputed per pipeline stage (block)")
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   choices=["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"],
                   help="the parts --recompute-granularity selective recomputes (megatron's core_attn)")


def check_flags(args: argparse.Namespace) -> None:
    granularity, method, layers = args.recompute_granularity, args.recompute_method, args.recompute_num_layers
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", method), ("--recompute-num-layers", layers),
                                          ("--recompute-modules", args.recompute_modules)) if value is not None]
        if given:
            raise ArgsError(f"{', '.join(given)} need --recompute-granularity")
    elif granularity == "full":
        if method is None or layers is None:
            raise ArgsError("--recompute-granularity full needs --recompute-method (uniform or block) and "
                            "--recompute-num-layers")
        if args.recompute_modules is not None:
            raise ArgsError("--recompute-modules selects what --recompute-granularity selective recomputes; "
                            "full recomputes whole layers")
    elif method is not None or layers is not None:
        raise ArgsError("--recompute-granularity selective takes --recompute-modules, not --recompute-method / "
                        "--recompute-num-layers")
    if not args.moe_grouped_gemm and "moe_act" in (args.recompute_modules or ()):
        raise ArgsError("--recompute-modules moe_act needs --moe-grouped-gemm")


def config_fields(args: argparse.Namespace) -> dict:
    fields = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                  recompute_num_layers=args.recompute_num_layers)
    if args.recompute_modules is not None:
        fields["recompute_modules"] = args.recompute_modules
    return fields


def patches() -> List:
    from npu_dsv3.model import patches as model
    from npu_dsv3.patching import Patch

    return [Patch(name="recompute.checkpoint_without_output_fp8", feature=NAME,
                  target="megatron.core.tensor_parallel.random.CheckpointWithoutOutput.__init__",
                  replacement=model.checkpoint_without_output_init, wrap=True,
                  why="CheckpointWithoutOutput() (selective recompute of layernorm, moe_act) reads fp8=False as FP8 on "
                  "and calls TransformerEngine's FP8GlobalStateManager")]
