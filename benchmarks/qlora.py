"""QLoRA against LoRA on the same DeepSeek-V3-shaped model, in one run (CPU or one device).

Both adapt every linear (rank ``--rank``) of the model ``benchmarks/lora.py`` builds, on the same batch with
AdamW; QLoRA's base is NF4 (``convert hf2mcore --qlora-nf4``'s weights: every targetable linear, routed
experts per expert), dequantized per GEMM in forward and backward. Printed, with QLoRA / baseline ratios:

- bytes of the quantized linears (codes and double-quantized scales) against the same linears in bf16;
- peak memory of live tensors of a training step (``lora.Run.memory``: parameters, buffers, gradients,
  optimizer state, and the highest rise during the step from the profiler's memory events), QLoRA / LoRA;
- step time (forward + backward + optimizer step, median of ``--steps``, the two stepped in turns) at the
  LoRA benchmark's batch and sequence length, QLoRA / LoRA;
- dequantization throughput: every quantized linear of the model dequantized to bf16, in GB/s of bf16
  written, against a plain copy of the same number of bf16 bytes.

    python benchmarks/qlora.py                 # hidden 512, 4 layers, 16 experts: about a minute on CPU

Targets (docs/benchmarks.md): NF4 bytes <= 0.27x bf16, step time <= 1.5x LoRA.
"""

import tempfile
import time

import torch

from lora import Run, measure, model_config, parse  # benchmarks/lora.py, beside this file

from npu_dsv3.lora.nf4_base import NF4Experts, NF4Linear
from npu_dsv3.lora.targets import CANONICAL
from npu_dsv3.model import load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf


def _nf4_modules(model):
    return [m for m in model.modules() if isinstance(m, (NF4Linear, NF4Experts))]


def _nf4_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for m in _nf4_modules(model) for n, b in m.named_buffers(recurse=False)
               if "_nf4" in n)


def _dequantize_all(model) -> int:
    """Every quantized linear dequantized once (to bf16); returns the bf16 bytes written."""
    written = 0
    for m in _nf4_modules(model):
        dtype = m.nf4_dtype
        m.nf4_dtype = torch.bfloat16
        try:
            weights = [m.nf4_fc1(), m.nf4_fc2()] if isinstance(m, NF4Experts) else [m.nf4_dequantize()]
        finally:
            m.nf4_dtype = dtype
        written += sum(w.numel() * 2 for w in weights)
    return written


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    args = parse(__doc__, argv)
    torch.manual_seed(0)
    lora = dict(moe_grouped_gemm=True, lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_targets=CANONICAL)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf(make_hf_model(seed=0, **model_config(args)), tmp)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        runs = {"lora": Run(load_hf(hf_dir, **lora), ids), "qlora": Run(load_hf(hf_dir, qlora=True, **lora), ids)}
    quantized = runs["qlora"].model
    nf4 = _nf4_bytes(quantized)
    bf16 = _dequantize_all(quantized)
    dequant_s = _best_time(lambda: _dequantize_all(quantized), 3)
    plain = torch.randn(bf16 // 2, dtype=torch.bfloat16)
    copy_s = _best_time(lambda: torch.empty_like(plain).copy_(plain), 3)
    results = measure(runs, args.steps, args.warmup)
    base, ours = results["lora"], results["qlora"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} routed experts, vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq} tokens; rank {args.rank} on every linear; fp32 compute")
    print(f"quantized linears: NF4 {nf4 / 1e6:.3f} MB, bf16 {bf16 / 1e6:.3f} MB, ratio {nf4 / bf16:.3f}")
    for key, label, unit in (("peak_bytes", "peak live tensor memory", "MB"), ("step_s", "step time", "s")):
        scale = 1e6 if unit == "MB" else 1
        print(f"{label}: LoRA {base[key] / scale:.3f} {unit}, QLoRA {ours[key] / scale:.3f} {unit}, "
              f"ratio {ours[key] / base[key]:.3f}")
    print(f"dequantization: {bf16 / dequant_s / 1e9:.2f} GB/s of bf16 written, plain copy of the same bytes "
          f"{bf16 / copy_s / 1e9:.2f} GB/s, ratio {copy_s / dequant_s:.3f}")


if __name__ == "__main__":
    main()
