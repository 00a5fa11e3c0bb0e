"""LoRA fine-tuning (MindSpeed-LLM's flags): the base weights frozen, low-rank adapters trained on the
linears ``--lora-target-modules`` names, on every layout full fine-tuning runs.

Where the rest lives: target names and their HF modules ``npu_dsv3.lora.targets``; the model transform
(TP/SP-aware adapters, grouped-GEMM routed experts) ``npu_dsv3.lora.layers``, applied by
``model.builder.build_model`` when ``config.lora_rank`` is set; PEFT adapters and merged deltas
``npu_dsv3.lora.export``.
"""

import argparse

from npu_dsv3.argtypes import ArgsError, Unsupported, positive_int

NAME = "lora"
TESTS = "tests/unit/test_lora.py, tests/multiprocess/test_lora_layouts.py, tests/multiprocess/test_lora_fusion.py"

FLAGS = {
    "--lora-r": "config.lora_rank (with --lora-target-modules)",
    "--lora-alpha": "config.lora_alpha (the update is scaled by alpha / r)",
    "--lora-dropout": "config.lora_dropout",
    "--lora-target-modules": "config.lora_targets (npu_dsv3.lora.targets; a non-empty list turns LoRA on)",
    "--lora-fusion": "config.lora_fusion",
    "--lora-ckpt-filter": "args.lora_ckpt_filter",
    "--lora-load": "args.lora_load",
    "--lora-modules-to-save": Unsupported(
        "training whole modules beside the adapters is not implemented; fine-tune every weight with "
        "python -m npu_dsv3.finetune without --lora-* flags, or adapt the module (--lora-target-modules)"),
    "--lora-register-forward-hook": Unsupported(
        "MindSpeed's hooks attach its PEFT wrapper to megatron's linears; here the adapters are part of the "
        "linears' own forward, so there is nothing to hook: drop the flag"),
}

_LORA_DESTS = ("lora_ckpt_filter", "lora_load", "lora_fusion")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (npu_dsv3.features.lora)")
    g.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help="linears to adapt, by megatron name (linear_q_down_proj linear_q_up_proj linear_kv_down_proj "
                        "linear_kv_up_proj linear_proj linear_fc1 linear_fc2 output_layer; mlp., shared_experts. or "
                        "experts. narrow fc1/fc2; MindSpeed's linear_qkv linear_qb linear_kvb): turns LoRA on")
    g.add_argument("--lora-r", type=positive_int, default=None, help="adapter rank (default 16)")
    g.add_argument("--lora-alpha", type=_positive_float, default=None,
                   help="scale numerator: the update is alpha / r x B A (default 32)")
    g.add_argument("--lora-dropout", type=_fraction, default=None, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-fusion", action="store_true",
                   help="row-parallel adapters add their partial output before the base layer's one reduction")
    g.add_argument("--lora-ckpt-filter", action="store_true",
                   help="save only the adapters (and their optimizer state), not the frozen base")
    g.add_argument("--lora-load", default=None, metavar="DIR",
                   help="adapters (a LoRA checkpoint of this package, or a PEFT adapter directory) loaded on top of "
                        "--load; iteration, optimizer and RNG come from it")


def enabled(args: argparse.Namespace) -> bool:
    return bool(args.lora_target_modules)


def check_flags(args: argparse.Namespace) -> None:
    from npu_dsv3.lora.targets import TargetError, resolve

    if not enabled(args):
        given = [f"--{d.replace('_', '-')}" for d in ("lora_r", "lora_alpha", "lora_dropout", *_LORA_DESTS)
                 if getattr(args, d) not in (None, False)]
        if given:
            raise ArgsError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --lora-target-modules "
                            "(the linears to adapt): give it, or drop them for full fine-tuning")
        return
    try:
        args.lora_targets = resolve(args.lora_target_modules)
    except TargetError as e:
        raise ArgsError(str(e)) from None
    if args.lora_load and not args.load:
        raise ArgsError("--lora-load adds adapters on top of a base model: give the base with --load")
    if any(t.startswith("experts.") for t in args.lora_targets) and not args.moe_grouped_gemm:
        raise ArgsError("LoRA on routed experts (--lora-target-modules linear_fc1/linear_fc2 or experts.*) runs "
                        "through grouped GEMMs: add --moe-grouped-gemm, or narrow the targets to mlp./shared_experts.")


def check_model(args: argparse.Namespace, config) -> None:
    if not enabled(args):
        return
    from npu_dsv3.lora.targets import present

    have = present(config)
    missing = [t for t in args.lora_targets if t not in have]
    if missing:
        raise ArgsError(f"--lora-target-modules: {', '.join(missing)} name no linear of this model "
                        f"(it has {', '.join(have)})")
    if "output_layer" in args.lora_targets and config.tie_word_embeddings:
        raise ArgsError("--lora-target-modules output_layer adapts the output layer, which this model ties to the "
                        "embedding: add --untie-embeddings-and-output-weights or drop output_layer")


def config_fields(args: argparse.Namespace) -> dict:
    if not enabled(args):
        return {}
    return {"lora_rank": args.lora_r or 16, "lora_alpha": float(args.lora_alpha or 32.0),
            "lora_dropout": args.lora_dropout or 0.0, "lora_targets": tuple(args.lora_targets),
            "lora_fusion": args.lora_fusion, "lora_seed": args.seed,
            # the router's expert bias is part of the frozen base: its aux-loss-free update stops
            "moe_router_bias_update_rate": 0.0}
