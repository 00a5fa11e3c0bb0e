"""``npu-dsv3 verify``: our model's logits against transformers' on a user's HF directory.

Both models run in one process on the same random token ids; the result is one
JSON line and the exit code (0 passed, 1 failed).
"""

import argparse
import json
import os
import subprocess
import sys

import torch

from npu_dsv3.argtypes import positive_int
from npu_dsv3.layout import add_layout_flags, layout_from_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_TOLERANCE = 1e-4


def compare_logits(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Max abs difference, relative to the largest reference logit, and the verdict."""
    max_abs_diff = (ours.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    rel_diff = max_abs_diff / scale if scale else max_abs_diff
    return {"max_abs_diff": max_abs_diff, "rel_diff": rel_diff, "passed": bool(rel_diff <= tolerance)}


def verify_hf_dir(hf_dir: str, dtype=torch.float32, batch: int = 2, seq_length: int = 64, seed: int = 0,
                  tolerance: float = DEFAULT_TOLERANCE, mcore_dir: str = None, layout: dict = None) -> dict:
    """Our logits (from ``hf_dir``, or from the megatron checkpoint ``mcore_dir`` of the
    given ``layout``) against transformers' on ``hf_dir``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from npu_dsv3 import backend
    from npu_dsv3.model import forward_logits, load_hf, load_mcore

    device = backend.device()
    ours = load_hf(hf_dir, dtype=dtype) if mcore_dir is None else load_mcore(mcore_dir, dtype=dtype, **(layout or {}))
    ours = ours.to(device)
    # The eager per-expert loop is transformers' plainest reference path. transformers
    # does not build the MTP layer and would print a table of its "unexpected" tensors.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, experts_implementation="eager")
    finally:
        transformers_logging.set_verbosity(verbosity)
    reference = reference.eval().to(device)
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_length), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        result = compare_logits(forward_logits(ours, ids), reference(ids).logits, tolerance)
    return {"hf_dir": hf_dir, **({"mcore_dir": mcore_dir} if mcore_dir else {}),
            "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq_length": seq_length,
            "tolerance": tolerance, **result}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="compare our logits with transformers' on an HF model directory")
    p.add_argument("--hf-dir", required=True, help="HF DeepSeek-V3 directory (config.json + safetensors)")
    p.add_argument("--device", choices=("cpu", "cuda", "npu"), default="cpu",
                   help="where both models run (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of both models (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="sequences compared (default %(default)s)")
    p.add_argument("--seq-length", type=positive_int, default=64, help="tokens per sequence (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="pass if max|ours - hf| <= tolerance * max|hf| (default %(default)s)")
    mcore = p.add_argument_group("megatron checkpoint (compare it instead of our model loaded from --hf-dir); "
                                 "the layout flags, training's names, default to what the checkpoint records")
    mcore.add_argument("--mcore-dir", default=None, metavar="DIR",
                       help="a checkpoint written by convert hf2mcore or by training")
    add_layout_flags(mcore, {
        "tensor_model_parallel_size": "tensor-parallel size of a legacy --mcore-dir",
        "pipeline_model_parallel_size": "pipeline-parallel size of a legacy --mcore-dir",
        "expert_model_parallel_size": "expert-parallel size of a legacy --mcore-dir",
        "expert_tensor_parallel_size": "expert-tensor-parallel size of a legacy --mcore-dir",
        "num_layers_per_virtual_pipeline_stage": "layers per virtual pipeline stage of a legacy --mcore-dir",
        "num_layer_list": "layers per pipeline stage of a legacy --mcore-dir",
        "noop_layers": "identity layers of a legacy --mcore-dir",
        "schedules_method": "a legacy --mcore-dir written for dualpipev",
        "moe_grouped_gemm": "a legacy --mcore-dir with GroupedMLP experts",
        "moe_tp_extend_ep": "a legacy --mcore-dir whose tensor ranks hold different whole experts",
        "mla_mm_split": "a legacy --mcore-dir with split MLA up-projections",
    })
    return p


def _layout(args) -> dict:
    """The layout of a legacy --mcore-dir: the flags given, then what it records, then the defaults."""
    from npu_dsv3.checkpoint.layout_record import checkpoint_dir, recorded_layout

    checkpoint_dir(args.mcore_dir)
    layout, note = layout_from_args(args, recorded_layout(args.mcore_dir), f"--mcore-dir {args.mcore_dir}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return layout


def run(args) -> int:
    from npu_dsv3 import backend

    if args.device != backend.current_backend():
        # The backend is fixed when npu_dsv3 is imported; run again on the requested one.
        backend.require_backend(args.device)
        env = {**os.environ, backend.ENV_VAR: args.device}
        return subprocess.run([sys.executable, "-m", "npu_dsv3", *args._argv], env=env).returncode
    layout = _layout(args) if args.mcore_dir else None
    result = verify_hf_dir(args.hf_dir, DTYPES[args.dtype], args.batch_size, args.seq_length, args.seed,
                           args.tolerance, args.mcore_dir, layout)
    print(json.dumps(result), flush=True)
    return 0 if result["passed"] else 1
