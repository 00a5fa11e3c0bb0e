"""QLoRA (MindSpeed-LLM's ``--qlora``): LoRA on a frozen base whose targetable linears are NF4, converted
with ``npu-dsv3 convert hf2mcore --qlora-nf4``; each GEMM dequantizes its weight in forward and backward.

Where the rest lives: NF4 itself ``npu_dsv3.ops.nf4`` (bitsandbytes' format, bit for bit); the NF4 base
(names, cuts, the dequantizing linears and experts) ``npu_dsv3.lora.nf4_base``, applied by
``model.builder.build_model`` when ``config.qlora`` is set; the converter's NF4 specs
``npu_dsv3.checkpoint.sharding.nf4_specs``; the adapters as for LoRA (``features.lora``).
"""

import argparse
import json
import os

from npu_dsv3.argtypes import ArgsError

NAME = "qlora"
TESTS = "tests/unit/test_nf4.py, tests/unit/test_qlora.py"

FLAGS = {
    "--qlora": "config.qlora (with --lora-target-modules; --load converted with --qlora-nf4)",
    "--qlora-save-dequantize": "args.qlora_save_dequantize (saves hold the base dequantized, as a LoRA run's)",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("QLoRA (npu_dsv3.features.qlora)")
    g.add_argument("--qlora", action="store_true",
                   help="LoRA on an NF4 base (convert it with `npu-dsv3 convert hf2mcore --qlora-nf4`); the "
                        "weights are dequantized per GEMM")
    g.add_argument("--qlora-save-dequantize", action="store_true",
                   help="checkpoints hold the base dequantized (the model's dtype) beside the adapters: a LoRA run "
                        "of the same layout loads them, and convert mcore2hf merges them")


def _nf4_checkpoint(load: str):
    """Whether the megatron checkpoint ``load`` holds NF4 weights (None: it has no config.json to say)."""
    from npu_dsv3.lora.nf4_base import is_nf4_config

    path = os.path.join(load, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return is_nf4_config(json.load(f))


def check_flags(args: argparse.Namespace) -> None:
    load = getattr(args, "load", None)
    nf4 = _nf4_checkpoint(load) if load else None
    if args.qlora_save_dequantize and not args.qlora:
        raise ArgsError("--qlora-save-dequantize belongs to --qlora: add it, or drop the flag")
    if not args.qlora:
        if nf4:
            raise ArgsError(f"--load {load} holds NF4 weights (converted with --qlora-nf4), which only QLoRA "
                            "trains: add --qlora and --lora-target-modules, or convert without --qlora-nf4")
        return
    if not args.lora_target_modules:
        raise ArgsError("--qlora trains LoRA adapters on a frozen NF4 base; NF4 weights cannot be fine-tuned "
                        "themselves: add --lora-target-modules, or drop --qlora for full fine-tuning")
    if not load:
        raise ArgsError("--qlora needs its NF4 base: --load a checkpoint converted with "
                        "`npu-dsv3 convert hf2mcore --qlora-nf4`")
    if nf4 is False:
        raise ArgsError(f"--qlora: --load {load} holds unquantized weights; convert the HF model with "
                        "`npu-dsv3 convert hf2mcore --qlora-nf4` (same layout flags) and load that, or drop --qlora")
    if not args.moe_grouped_gemm:
        raise ArgsError("--qlora dequantizes the routed experts into grouped GEMMs: add --moe-grouped-gemm")
    if args.qlora_save_dequantize and args.lora_ckpt_filter:
        raise ArgsError("--qlora-save-dequantize dequantizes the base a save holds, and --lora-ckpt-filter saves "
                        "the adapters only: drop one of them")


def config_fields(args: argparse.Namespace) -> dict:
    return {"qlora": True} if args.qlora else {}
