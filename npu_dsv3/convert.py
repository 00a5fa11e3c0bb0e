"""``npu-dsv3 convert CONVERSION ...``: checkpoint conversions, one sub-subcommand each.

To add a conversion, write ``add_<name>(subparsers)`` that adds its parser, calls
``add_job_arguments`` if it is a resumable multi-file job, and sets
``_convert=<function(args) -> int>`` as a default; then append it to
``CONVERSIONS``. Heavy imports belong inside the conversion function, so
``npu-dsv3 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """--workers / --resume / --no-progress, shared by every conversion that writes a directory."""
    p.add_argument("--workers", type=_positive_int, default=1,
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


_SIDED = ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size")
_SHARED = ("expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage", "num_layer_list", "noop_layers",
           "schedules_method", "num_layers", "moe_grouped_gemm", "moe_tp_extend_ep", "mla_mm_split",
           "first_k_dense_replace", "mtp_num_layers")


def _add_layout_arguments(p: argparse.ArgumentParser, side: str, prefix_all: bool = False) -> None:
    """The layout flags of MindSpeed-LLM's converter for ``side`` ("target" or "source").

    hf2mcore / mcore2hf have one megatron side, so only the parallel sizes carry
    the prefix (``--target-tensor-parallel-size``, ``--num-layer-list``);
    reshard has two and prefixes every flag (``--source-num-layer-list``).
    """
    group = p.add_argument_group(f"{side} layout")
    pre = f"--{side}-" if prefix_all else "--"
    for name in _SIDED:
        group.add_argument(f"--{side}-{name.replace('_', '-')}", type=_positive_int, default=1)
    group.add_argument(f"{pre}expert-tensor-parallel-size", type=_positive_int, default=1,
                       help="1 (DeepSeek-V3 recipes) or the tensor-parallel size")
    group.add_argument(f"{pre}num-layers-per-virtual-pipeline-stage", type=_positive_int, default=None)
    group.add_argument(f"{pre}num-layer-list", default=None, metavar="N,N,...", help="layers per pipeline stage")
    group.add_argument(f"{pre}noop-layers", default=None, metavar="I,I,...",
                       help="global indices of identity layers that pad --num-layers")
    group.add_argument(f"{pre}schedules-method", choices=["dualpipev"], default=None)
    group.add_argument(f"{pre}num-layers", type=_positive_int, default=None,
                       help="decoder layers including the noop layers (default: config.json's + noop layers)")
    group.add_argument(f"{pre}moe-grouped-gemm", action="store_true",
                       help="experts as GroupedMLP weight1/weight2 (else one MLP per expert)")
    group.add_argument(f"{pre}moe-tp-extend-ep", action="store_true",
                       help="the TP ranks of an EP rank hold different whole experts (experts split over EP x TP; "
                            "--expert-tensor-parallel-size 1)")
    group.add_argument(f"{pre}mla-mm-split", action="store_true",
                       help="MLA's up-projections as linear_qk_nope/linear_qk_rope and linear_kv_nope/linear_v")
    # Model sizes default to config.json; smaller values convert part of the model.
    group.add_argument(f"{pre}first-k-dense-replace", type=int, default=None, metavar="K",
                       help="dense layers before the MoE layers; below the checkpoint's, its first K dense "
                            "layers then its MoE layers (default: config.json's)")
    group.add_argument(f"{pre}mtp-num-layers", type=int, default=None, metavar="N",
                       help="MTP layers to convert, 0 for none (default: config.json's)")


def _layout_flags(args: argparse.Namespace, side: str, prefix_all: bool = False) -> dict:
    """The ``ParallelLayout.from_flags`` keywords for ``side``."""
    flags = {
        "tensor_model_parallel_size": getattr(args, f"{side}_tensor_parallel_size"),
        "pipeline_model_parallel_size": getattr(args, f"{side}_pipeline_parallel_size"),
        "expert_model_parallel_size": getattr(args, f"{side}_expert_parallel_size"),
    }
    for name in _SHARED:
        flags[name] = getattr(args, f"{side}_{name}" if prefix_all else name)
    return flags


def _add_save_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-format", choices=["torch", "torch_dist"], default="torch",
                   help="torch: the legacy per-rank mp_rank_* files of exactly this layout; torch_dist: "
                        "megatron.core.dist_checkpointing, loadable by any layout with this tensor-parallel "
                        "size (vocabulary padding)")


def _is_dist(load_dir: str) -> bool:
    from npu_dsv3.checkpoint.mcore_dist import release_dir

    return release_dir(load_dir) is not None


def _ignored_source_flags(args: argparse.Namespace, flags: dict) -> None:
    """torch_dist checkpoints carry their own layout: say so rather than silently ignore --source-* flags."""
    defaults = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
                "expert_tensor_parallel_size": 1, "moe_grouped_gemm": False}
    given = sorted(k for k, v in flags.items() if v not in (None, False) and defaults.get(k) != v)
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
    add_job_arguments(p)
    p.set_defaults(_convert=run_hf2mcore)
    return p


def run_hf2mcore(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_legacy import convert_hf_to_legacy

    if args.save_format == "torch_dist":
        return _report_dist(args, ("hf", args.load_dir), _layout_flags(args, "target"), "convert hf2mcore")
    summary = convert_hf_to_legacy(args.load_dir, args.save_dir, _layout_flags(args, "target"),
                                   workers=args.workers, resume=args.resume, progress=args.progress)
    print(f"wrote {args.save_dir}: {summary['written']} of {summary['rank_files']} rank files "
          f"({summary['rank_files'] - summary['written']} kept from an earlier run) in {summary['seconds']:.1f} s",
          file=sys.stderr)
    return 0


def add_mcore2hf(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mcore2hf", help="megatron checkpoint of any layout -> HF safetensors",
        description="Rebuild the HF checkpoint (<= 5 GB shards, index, config.json, tokenizer files) from a "
                    "megatron checkpoint written by hf2mcore or by training; the --source-* flags describe it.")
    p.add_argument("--load-dir", required=True, metavar="DIR", help="megatron checkpoint directory (with config.json)")
    p.add_argument("--save-dir", required=True, metavar="DIR", help="HF directory to write")
    _add_layout_arguments(p, "source")
    add_job_arguments(p)
    p.set_defaults(_convert=run_mcore2hf)
    return p


def _report_dist(args: argparse.Namespace, source: tuple, flags: dict, command: str) -> int:
    from npu_dsv3.checkpoint.mcore_dist import convert_to_dist

    summary = convert_to_dist(source, args.save_dir, flags, command, workers=args.workers, resume=args.resume,
                              progress=args.progress)
    print(f"wrote {args.save_dir}: torch_dist, {summary['pieces']} tensors, {summary['bytes'] / 1e9:.2f} GB "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


def run_mcore2hf(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_dist import convert_dist_to_hf
    from npu_dsv3.checkpoint.mcore_legacy import convert_legacy_to_hf

    flags = _layout_flags(args, "source")
    if _is_dist(args.load_dir):
        _ignored_source_flags(args, {k: v for k, v in flags.items() if k != "mtp_num_layers"})
        summary = convert_dist_to_hf(args.load_dir, args.save_dir, flags.get("mtp_num_layers"), resume=args.resume,
                                     progress=args.progress)
    else:
        summary = convert_legacy_to_hf(args.load_dir, args.save_dir, flags, resume=args.resume,
                                       progress=args.progress)
    print(f"wrote {args.save_dir}: {summary['shards']} shards, {summary['bytes'] / 1e9:.2f} GB "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0


def add_reshard(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reshard", help="megatron checkpoint in one layout -> another layout, without going through HF",
        description="Rewrite a megatron checkpoint (--source-* layout) in another layout (--target-*). Options "
                    "without a side (--expert-tensor-parallel-size, --num-layer-list, ...) take --source-/--target- "
                    "prefixes here.")
    p.add_argument("--load-dir", required=True, metavar="DIR")
    p.add_argument("--save-dir", required=True, metavar="DIR")
    for side in ("source", "target"):
        _add_layout_arguments(p, side, prefix_all=True)
    _add_save_format(p)
    add_job_arguments(p)
    p.set_defaults(_convert=run_reshard)
    return p


def run_reshard(args: argparse.Namespace) -> int:
    from npu_dsv3.checkpoint.mcore_legacy import reshard_legacy

    source_flags, target_flags = _layout_flags(args, "source", True), _layout_flags(args, "target", True)
    if _is_dist(args.load_dir):
        _ignored_source_flags(args, source_flags)
        source = ("dist", args.load_dir)
    else:
        source = ("mcore", args.load_dir, source_flags)
    if args.save_format == "torch_dist":
        return _report_dist(args, source, target_flags, "convert reshard")
    if source[0] == "dist":
        from npu_dsv3.checkpoint.mcore_dist import convert_to_legacy

        summary = convert_to_legacy(args.load_dir, args.save_dir, target_flags, workers=args.workers,
                                    resume=args.resume, progress=args.progress)
        print(f"wrote {args.save_dir}: {summary['written']} of {summary['rank_files']} rank files in "
              f"{summary['seconds']:.1f} s", file=sys.stderr)
        return 0
    summary = reshard_legacy(args.load_dir, args.save_dir, _layout_flags(args, "source", True),
                             _layout_flags(args, "target", True),
                             workers=args.workers, resume=args.resume, progress=args.progress)
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
    import torch

    # The streaming writers save data-less skeletons and read tensors at their file offsets.
    if not hasattr(torch.serialization, "skip_data"):
        raise ValueError(f"npu-dsv3 convert needs torch >= 2.5 (this is {torch.__version__}); a CPU-only torch "
                         "in its own environment is enough for converting")
    return args._convert(args)
