"""LoRA against full fine-tuning on the same DeepSeek-V3-shaped model, in one run (CPU or one device).

Both train the same model (MLA, a dense layer, grouped-GEMM routed experts, shared experts) on the same
batch with AdamW: full fine-tuning updates every weight; LoRA (rank ``--rank``) adapts every linear --
attention, dense and shared MLPs, routed experts per expert, the output layer -- with the base frozen.
Printed, with LoRA / full ratios:

- step time: forward + backward + optimizer step, median of ``--steps`` after ``--warmup``, the two models
  stepped in turns;
- peak memory of live tensors: the bytes the model, gradients and optimizer state hold when the step
  starts, plus the highest the allocator's live bytes rise during the step, from the memory events of
  ``torch.profiler`` (every tensor allocation and free; not process RSS);
- trainable parameters, and the bytes a checkpoint of the trained tensors takes (full: every weight;
  LoRA: the adapters, what ``--lora-ckpt-filter`` saves), as safetensors.

    python benchmarks/lora.py                       # hidden 512, 4 layers, 16 experts: about a minute
    python benchmarks/lora.py --hidden 1024 --experts 32

Targets (docs/benchmarks.md): step time <= 0.8x full, peak live memory <= 0.4x full.
"""

import argparse
import statistics
import tempfile
import time

import torch
from safetensors.torch import save

from npu_dsv3.lora.targets import CANONICAL
from npu_dsv3.model import load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf


def model_config(args) -> dict:
    heads = args.hidden // 64
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers, num_attention_heads=heads,
                num_key_value_heads=heads, n_routed_experts=args.experts, num_experts_per_tok=4,
                n_group=4, topk_group=2, q_lora_rank=args.hidden * 3 // 8, kv_lora_rank=args.hidden // 4,
                qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1)


def _live_bytes(model, optimizer) -> int:
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(b): b for b in model.buffers()})  # QLoRA's NF4 weights are buffers
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    for state in optimizer.state.values():
        tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _peak_rise(prof) -> int:
    """The highest the live bytes rise above where they started, from the profiler's memory events."""
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def _checkpoint_bytes(model) -> int:
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return len(save(trained))


class Run:
    """One model's training step (forward, backward, AdamW step) on a fixed batch."""

    def __init__(self, model, ids):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.ids, self.labels = ids, torch.roll(ids, -1, 1)
        self.positions = torch.arange(ids.shape[1]).expand_as(ids)

    def step(self) -> float:
        start = time.perf_counter()
        self.model(self.ids, self.positions, None, labels=self.labels).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def memory(self) -> dict:
        resting = _live_bytes(self.model, self.optimizer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        return {"peak_bytes": resting + _peak_rise(prof),
                "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "checkpoint_bytes": _checkpoint_bytes(self.model)}


def measure(runs: dict, steps: int, warmup: int) -> dict:
    """Step times taken in turns (full, LoRA, full, ...), so that a slower stretch of the machine hits both."""
    for _ in range(warmup):
        for run in runs.values():
            run.step()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            times[name].append(run.step())
    return {name: {"step_s": statistics.median(times[name]), **run.memory()} for name, run in runs.items()}


def parse(doc: str, argv=None) -> argparse.Namespace:
    """The model, batch and timing flags (this benchmark's and benchmarks/qlora.py's)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(__doc__, argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf(make_hf_model(seed=0, **model_config(args)), tmp)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        runs = {"full": Run(load_hf(hf_dir, moe_grouped_gemm=True), ids),
                "lora": Run(load_hf(hf_dir, moe_grouped_gemm=True, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                                    lora_targets=CANONICAL), ids)}
        results = measure(runs, args.steps, args.warmup)
        full, lora = results["full"], results["lora"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} routed experts, vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq} tokens; LoRA rank {args.rank} on every linear (routed experts too)")
    for key, label, unit in (("step_s", "step time", "s"), ("peak_bytes", "peak live tensor memory", "MB"),
                             ("trainable", "trainable parameters", "M"),
                             ("checkpoint_bytes", "checkpoint of the trained tensors", "MB")):
        scale = 1e6 if unit in ("MB", "M") else 1
        print(f"{label}: full {full[key] / scale:.3f} {unit}, LoRA {lora[key] / scale:.3f} {unit}, "
              f"ratio {lora[key] / full[key]:.3f}")


if __name__ == "__main__":
    main()
