"""``npu-dsv3 convert CONVERSION ...``: checkpoint conversions, one sub-subcommand each.

To add a conversion, write ``add_<name>(subparsers)`` that adds its parser, calls
``add_job_arguments`` if it is a resumable multi-file job, and sets
``_convert=<function(args) -> int>`` as a default; then append it to
``CONVERSIONS``. Heavy imports belong inside the conversion function, so
``npu-dsv3 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from npu_dsv3.argtypes import ArgsError, positive_int
from npu_dsv3.layout import LAYOUT_DEFAULTS, add_layout_flags, converter_flag, given_flags, layout_from_args


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """--workers / --resume / --no-progress, shared by every conversion that writes a directory."""
    p.add_argument("--workers", type=positive_int, default=1,
                   help="files converted at a time, one process each (default %(default)s: in this process); "
                        "each holds a few tensors in memory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in the output directory: files recorded as finished "
                        "and still intact (size and CRC-32) are kept, the rest are redone")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")


# --------------------------------------------------------------------------- fp8-to-bf16


def add_fp8_to_bf16(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fp8-to-bf16", help="cast DeepSeek's FP8 release (weight_scale_inv, 128x128 blocks) to BF16",
        description="Cast DeepSeek's block-FP8 HF checkpoint to BF16, shard by shard: FP8 weights become "
                    "bf16(fp32(w) * scale_inv per 128x128 block), the *_scale_inv tensors and the config's "
                    "quantization_config are removed, every other file is copied unchanged.")
    p.add_argument("--input-fp8-hf-path", required=True, metavar="DIR", help="the FP8 HF checkpoint directory")
    p.add_argument("--output-bf16-hf-path", required=True, metavar="DIR",
                   help="where the BF16 checkpoint is written (absent or empty, unless --resume)")
    add_job_arguments(p)
    p.set_defaults(_convert=run_fp8_to_bf16)
    return p


def run_fp8_to_bf16(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.fp8 import convert_fp8_to_bf16

    summary = convert_fp8_to_bf16(args.input_fp8_hf_path, args.output_bf16_hf_path, workers=args.workers,
                                  resume=args.resume, progress=args.progress)
    gb = summary["input_bytes"] / 1e9
    print(f"wrote {args.output_bf16_hf_path}: of {summary['shards']} shards {summary['converted']} converted, "
          f"{summary['skipped']} kept from an earlier run; {gb:.2f} GB of FP8 input in {summary['seconds']:.1f} s",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- hf2mcore / mcore2hf


# The converters' flags beside the layout ones: the model sizes, which default to config.json's.
_MODEL_SIZES = ("num_layers", "first_k_dense_replace", "mtp_num_layers")


def _add_layout_arguments(p: argparse.ArgumentParser, side: str, prefix_all: bool = False) -> None:
    """The layout flags of MindSpeed-LLM's converter for ``side`` ("target" or "source"), named by
    ``npu_dsv3.layout.converter_flag``. The layout flags default to None ("not given"): a source side takes
    what the checkpoint records, then ``npu_dsv3.layout.LAYOUT_DEFAULTS``.
    """
    group = p.add_argument_group(f"{side} layout")
    flag = converter_flag(side, prefix_all)
    recorded = " (default: what the checkpoint records, else %s)" if side == "source" else " (default %s)"
    add_layout_flags(group, {
        "tensor_model_parallel_size": "tensor-parallel size" + recorded % 1,
        "pipeline_model_parallel_size": "pipeline-parallel size" + recorded % 1,
        "expert_model_parallel_size": "expert-parallel size" + recorded % 1,
        "expert_tensor_parallel_size": "tensor-parallel size of the routed experts: 1 (DeepSeek-V3 recipes) or the "
                                       "tensor-parallel size"
                                       + recorded % "the tensor-parallel size, 1 with --moe-tp-extend-ep",
        "num_layers_per_virtual_pipeline_stage": "layers per virtual pipeline stage (interleaved schedule)"
                                                 + recorded % "none",
        "num_layer_list": "layers per pipeline stage" + recorded % "an even split",
        "noop_layers": "global indices of identity layers that pad --num-layers" + recorded % "none",
        "schedules_method": "dualpipev: each pipeline rank holds stages r and 2P-1-r" + recorded % "none",
        "moe_grouped_gemm": "experts as GroupedMLP weight1/weight2 (else one MLP per expert)" + recorded % "off",
        "moe_tp_extend_ep": "the TP ranks of an EP rank hold different whole experts (experts split over EP x TP; "
                            "--expert-tensor-parallel-size 1)" + recorded % "off",
        "mla_mm_split": "MLA's up-projections as linear_qk_nope/linear_qk_rope and linear_kv_nope/linear_v"
                        + recorded % "off",
    }, flag, size_metavar="N")
    group.add_argument(flag("num_layers"), type=positive_int, default=None,
                       help="decoder layers including the noop layers (default: config.json's + noop layers)")
    # Model sizes default to config.json; smaller values convert part of the model.
    group.add_argument(flag("first_k_dense_replace"), type=int, default=None, metavar="K",
                       help="dense layers before the MoE layers; below the checkpoint's, its first K dense "
                            "layers then its MoE layers (default: config.json's)")
    group.add_argument(flag("mtp_num_layers"), type=int, default=None, metavar="N",
                       help="MTP layers to convert, 0 for none (default: config.json's)")


def _given_flags(args: argparse.Namespace, side: str, prefix_all: bool = False) -> dict:
    """The layout and model-size flags of ``side`` as given (None: not on the command line), by
    ``ParallelLayout.from_flags`` keyword."""
    return given_flags(args, converter_flag(side, prefix_all), (*LAYOUT_DEFAULTS, *_MODEL_SIZES))


def _layout_flags(args: argparse.Namespace, side: str, prefix_all: bool = False, load_dir: str = None) -> dict:
    """The ``ParallelLayout.from_flags`` keywords for ``side``: the flags given, then what the legacy
    checkpoint ``load_dir`` records (one note when it supplies any), then the defaults."""
    recorded = None
    if load_dir is not None:
        from npu_dsv3.checkpoint.layout_record import recorded_layout

        recorded = recorded_layout(load_dir)
    layout, note = layout_from_args(args, recorded, f"--load-dir {load_dir}", converter_flag(side, prefix_all))
    if note:
        print(f"note: {note}", file=sys.stderr)
    return {**_given_flags(args, side, prefix_all), **layout}


def _add_save_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-format", choices=["torch", "torch_dist"], default="torch",
                   help="torch: the legacy per-rank mp_rank_* files of exactly this layout; torch_dist: "
                        "megatron.core.dist_checkpointing, loadable by any layout with this tensor-parallel "
                        "size (vocabulary padding)")


def _is_dist(load_dir: str) -> bool:
    from npu_dsv3.checkpoint.mcore_dist import release_dir

    return release_dir(load_dir) is not None


def _ignored_source_flags(args: argparse.Namespace, given: dict) -> None:
    """torch_dist checkpoints carry their own layout: say so rather than silently ignore --source-* flags."""
    given = sorted(k for k, v in given.items() if v is not None and k != "mtp_num_layers")
    if given:
        print(f"note: {args.load_dir} is a torch_dist checkpoint, which any layout reads; the source layout "
              f"flags ({', '.join(given)}) are not needed and were not used", file=sys.stderr)


def add_hf2mcore(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hf2mcore", help="HF (BF16/FP32, or DeepSeek's FP8 release) -> megatron checkpoint in a training layout",
        description="Write the megatron-core checkpoint a training run with these layout flags loads "
                    "(--load), one rank file at a time. DeepSeek's FP8 release is dequantised on the fly.")
    p.add_argument("--load-dir", required=True, metavar="DIR", help="HF checkpoint directory")
    p.add_argument("--save-dir", required=True, metavar="DIR", help="megatron checkpoint directory to write")
    _add_layout_arguments(p, "target")
    _add_save_format(p)
    p.add_argument("--qlora-nf4", action="store_true",
                   help="QLoRA's base: every targetable linear (attention projections, dense and shared MLPs, "
                        "routed experts per expert) in NF4 with double-quantized scales, as bitsandbytes stores "
                        "it; train it with --qlora (needs --moe-grouped-gemm)")
    add_job_arguments(p)
    p.set_defaults(_convert=run_hf2mcore)
    return p


def run_hf2mcore(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_legacy import write_layout
    from npu_dsv3.checkpoint.sources import HFInput

    flags = _layout_flags(args, "target")
    if args.qlora_nf4:
        if not flags.get("moe_grouped_gemm"):
            raise ArgsError("--qlora-nf4 stores the routed experts for grouped GEMMs, which QLoRA training "
                            "dequantizes: add --moe-grouped-gemm")
    source = HFInput(args.load_dir, nf4=args.qlora_nf4)
    if args.save_format == "torch_dist":
        return _report_dist(args, source, flags, "convert hf2mcore")
    summary = write_layout(source, args.save_dir, flags, "convert hf2mcore", args.workers, args.resume,
                           args.progress)
    print(f"wrote {args.save_dir}: {summary['written']} of {summary['rank_files']} rank files "
          f"({summary['rank_files'] - summary['written']} kept from an earlier run) in {summary['seconds']:.1f} s",
          file=sys.stderr)
    return 0


def add_mcore2hf(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mcore2hf", help="megatron checkpoint of any layout -> HF safetensors",
        description="Rebuild the HF checkpoint (<= 5 GB shards, index, config.json, tokenizer files) from a "
                    "megatron checkpoint written by hf2mcore or by training; the layout flags it records are used, "
                    "--source-* flags given must agree with them.")
    p.add_argument("--load-dir", required=True, metavar="DIR", help="megatron checkpoint directory (with config.json)")
    p.add_argument("--save-dir", required=True, metavar="DIR", help="HF directory to write")
    _add_layout_arguments(p, "source")
    _add_lora_arguments(p)
    add_job_arguments(p)
    p.set_defaults(_convert=run_mcore2hf)
    return p


def _add_lora_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (MindSpeed-LLM's converter flags; npu_dsv3.lora)")
    g.add_argument("--lora-load", default=None, metavar="DIR",
                   help="a LoRA training checkpoint (either format, any layout) whose adapters are merged, W + "
                        "alpha / r x B A in fp32, into --load-dir's weights (default: --load-dir's own adapters, "
                        "when it holds any)")
    g.add_argument("--save-lora-to-hf", action="store_true",
                   help="write the adapters as a PEFT adapter directory (adapter_config.json, "
                        "adapter_model.safetensors) for transformers' DeepseekV3ForCausalLM instead of merged weights")
    g.add_argument("--lora-r", type=positive_int, default=None, help="must equal the adapters' recorded rank")
    g.add_argument("--lora-alpha", type=float, default=None, help="must equal the adapters' recorded alpha")
    g.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                   help="must name the adapters' recorded targets")


def _report_dist(args: argparse.Namespace, source, flags: dict, command: str) -> int:
    from npu_dsv3.checkpoint.mcore_dist import convert_to_dist

    summary = convert_to_dist(source, args.save_dir, flags, command, workers=args.workers, resume=args.resume,
                              progress=args.progress)
    print(f"wrote {args.save_dir}: torch_dist, {summary['pieces']} tensors, {summary['bytes'] / 1e9:.2f} GB "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


def _source_flags(args: argparse.Namespace, prefix_all: bool = False):
    """The layout of the legacy checkpoint ``--load-dir``, or None for a torch_dist one (any layout reads it)."""
    from npu_dsv3.checkpoint.layout_record import checkpoint_dir

    checkpoint_dir(args.load_dir)  # a missing tracker or iteration, named before any layout is blamed
    if _is_dist(args.load_dir):
        _ignored_source_flags(args, _given_flags(args, "source", prefix_all))
        return None
    return _layout_flags(args, "source", prefix_all, load_dir=args.load_dir)


def run_mcore2hf(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_dist import convert_dist_to_hf
    from npu_dsv3.checkpoint.mcore_legacy import convert_legacy_to_hf

    lora = _lora_adapters(args)
    if args.save_lora_to_hf:
        return _save_adapter(args, *lora)
    flags = _source_flags(args)
    merge, job = None, {}
    if lora is not None:
        from npu_dsv3.lora.export import MergedSource

        adapters, description, lora_dir = lora
        merge = functools.partial(MergedSource, adapters=adapters, alpha=description["alpha"], r=description["r"])
        job = {"lora_load": os.path.realpath(lora_dir)}
        print(f"note: merging the LoRA adapters of {lora_dir} (r {description['r']}, alpha {description['alpha']})",
              file=sys.stderr)
    if flags is None:
        summary = convert_dist_to_hf(args.load_dir, args.save_dir, args.mtp_num_layers, resume=args.resume,
                                     progress=args.progress, wrap=merge, job=job)
    else:
        summary = convert_legacy_to_hf(args.load_dir, args.save_dir, flags, resume=args.resume,
                                       progress=args.progress, wrap=merge, job=job)
    print(f"wrote {args.save_dir}: {summary['shards']} shards, {summary['bytes'] / 1e9:.2f} GB "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


def _lora_adapters(args: argparse.Namespace):
    """(adapters, description, directory) of --lora-load, or of --load-dir when it holds adapters; None else."""
    from npu_dsv3.lora.sources import LORA_FILE, adapters_of, check_description

    lora_dir = args.lora_load or (args.load_dir if os.path.isfile(os.path.join(args.load_dir, LORA_FILE)) else None)
    if lora_dir is None:
        given = [f for f, v in (("--save-lora-to-hf", args.save_lora_to_hf), ("--lora-r", args.lora_r),
                                ("--lora-alpha", args.lora_alpha), ("--lora-target-modules", args.lora_target_modules))
                 if v]
        if given:
            raise ValueError(f"{', '.join(given)}: --load-dir {args.load_dir} holds no LoRA adapters ({LORA_FILE}); "
                             "give the LoRA checkpoint with --lora-load")
        return None
    adapters, description = adapters_of(lora_dir)
    check_description(description, args.lora_r, args.lora_alpha, args.lora_target_modules)
    return adapters, description, lora_dir


def _save_adapter(args: argparse.Namespace, adapters, description: dict, lora_dir: str) -> int:
    from npu_dsv3.config import load_hf_config
    from npu_dsv3.lora.export import peft_config, peft_tensors, write_peft_adapter

    layers = load_hf_config(lora_dir)["num_hidden_layers"]
    tensors = peft_tensors(adapters, layers)
    mtp = any(layer is not None and layer >= layers for _, layer in adapters)
    config = peft_config(list(description["targets"]), description["r"], description["alpha"],
                         description["dropout"], os.path.realpath(args.load_dir), mtp)
    write_peft_adapter(args.save_dir, tensors, config)
    note = " (the MTP layer's adapters left out: transformers has no MTP module)" if mtp else ""
    print(f"wrote {args.save_dir}: a PEFT adapter, {len(tensors)} tensors{note}", file=sys.stderr)
    return 0


def add_reshard(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reshard", help="megatron checkpoint in one layout -> another layout, without going through HF",
        description="Rewrite a megatron checkpoint (--source-* layout) in another layout (--target-*). Options "
                    "without a side (--expert-tensor-parallel-size, --num-layer-list, ...) take --source-/--target- "
                    "prefixes here.")
    p.add_argument("--load-dir", required=True, metavar="DIR", help="megatron checkpoint directory to read")
    p.add_argument("--save-dir", required=True, metavar="DIR", help="megatron checkpoint directory to write")
    for side in ("source", "target"):
        _add_layout_arguments(p, side, prefix_all=True)
    _add_save_format(p)
    add_job_arguments(p)
    p.set_defaults(_convert=run_reshard)
    return p


def run_reshard(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_dist import DistInput, convert_to_legacy
    from npu_dsv3.checkpoint.mcore_legacy import LegacyInput, reshard_legacy

    source_flags, target_flags = _source_flags(args, True), _layout_flags(args, "target", True)
    source = DistInput(args.load_dir) if source_flags is None else LegacyInput(args.load_dir, source_flags)
    if args.save_format == "torch_dist":
        return _report_dist(args, source, target_flags, "convert reshard")
    if source_flags is None:
        summary = convert_to_legacy(args.load_dir, args.save_dir, target_flags, workers=args.workers,
                                    resume=args.resume, progress=args.progress)
    else:
        summary = reshard_legacy(args.load_dir, args.save_dir, source_flags, target_flags, workers=args.workers,
                                 resume=args.resume, progress=args.progress)
    print(f"wrote {args.save_dir}: {summary['written']} of {summary['rank_files']} rank files in "
          f"{summary['seconds']:.1f} s", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- subcommand

CONVERSIONS = [add_fp8_to_bf16, add_hf2mcore, add_mcore2hf, add_reshard]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert checkpoints (fp8-to-bf16, hf2mcore, mcore2hf, reshard)",
                              description="Convert checkpoints between formats.")
    conversions = p.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    for add in CONVERSIONS:
        add(conversions)
    return p


def run(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.io import check_output_path

    check_output_path(getattr(args, "save_dir", None) or args.output_bf16_hf_path)  # before any input is read
    return args._convert(args)
