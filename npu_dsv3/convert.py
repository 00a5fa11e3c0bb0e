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
                        "each worker holds one output shard in memory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in the output directory: files recorded as finished "
                        "and still intact (sha256) are kept, the rest are redone")
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


# --------------------------------------------------------------------------- subcommand

CONVERSIONS = [add_fp8_to_bf16]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert checkpoints (fp8-to-bf16)",
                              description="Convert checkpoints between formats.")
    conversions = p.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    for add in CONVERSIONS:
        add(conversions)
    return p


def run(args: argparse.Namespace) -> int:
    return args._convert(args)
