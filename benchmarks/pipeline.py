"""Measured pipeline bubble of 1F1B, interleaved 1F1B and DualPipeV on real gloo processes.

What is measured: for each schedule and pipeline size P, P worker processes run
the real schedule functions (megatron-core's
``forward_backward_pipelining_without_interleaving`` and ``..._with_interleaving``
with 2 chunks per rank, and ``npu_dsv3.schedules.dualpipev.forward_backward_dualpipev``)
on real model chunks, which exchange real [128, 1, 256] fp32 activations and
gradients by gloo point-to-point. Every chunk is one linear layer whose forward,
input-gradient backward and weight-gradient backward each last a calibrated time:
the real matmul (well under a millisecond) and then a ``time.sleep`` up to the
calibrated cost. Sleeping ranks do not compete for CPU cores, so P ranks on a
2-core machine behave like P devices. Per rank and micro-batch a forward costs 1
unit (``--unit-ms``, default 40 ms), an input gradient 1 and a weight gradient 1
(a full backward is 2); with two chunks per rank each chunk costs half.

The weight gradient goes through ``npu_dsv3.ops.weight_grad``: a schedule
that opens ``weight_grad.deferring()`` (DualPipeV's zero-bubble ``B`` steps)
gets it later in its ``W`` step; megatron's schedules never do, so it runs inline.

Every op records its wall-clock interval (``time.time()``, one clock for every
process on the machine). Busy time of a rank is the time its op intervals cover; the
makespan runs from the first rank leaving the barrier before the step to the last
rank returning from the schedule; the measured bubble fraction is the mean over
ranks of 1 - busy / makespan. Communication, megatron's bookkeeping and Python
run between the ops, so they count as idle: the simulation charges them nothing.
After one warm-up step the fastest of ``--steps`` steps is kept (on a shared
machine foreign load only adds time).

Next to each measurement: the event simulation of the same schedule's plan
(``npu_dsv3.schedules.simulate``) and the closed-form formula
(``formula_bubble``), both with the same per-rank costs. Our DualPipeV executor
runs an FB pair as its forward then its backward, so the simulator's comparable
setting is FB = F + B (``overlap="sum"``); the case ``dualpipev-overlap`` runs
DualPipeV again with ``--moe-fb-overlap`` (each pair's halves on two threads: their
sleeps overlap, as a device's compute and communication would), simulated with
FB = max(F, B).

    python benchmarks/pipeline.py                       # PP=2 and PP=4, PNGs in docs/
    python benchmarks/pipeline.py --pp 2 --micro-batches 4 --unit-ms 5 --no-plot

The last line is ``bubble: 1f1b=<f> interleaved=<f> dualpipev=<f>`` for the largest P.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# Importing npu_dsv3 (any part) applies the CPU patches megatron needs; megatron is imported after it.
from npu_dsv3.ops import weight_grad
from npu_dsv3.schedules import Costs, formula_bubble, plan, simulate

SCHEDULES = ("1f1b", "interleaved", "dualpipev")
# DualPipeV once more with --moe-fb-overlap: each FB pair's forward and backward at the same time.
CASES = SCHEDULES + ("dualpipev-overlap",)
SEQ, HIDDEN = 128, 256
# Per-rank costs in units: F = 1, full backward B = 2 of which W = 1.
COSTS = Costs(f=1.0, b=2.0, w=1.0, overlap="sum")
TARGET = 0.6
CASE_PREFIX = "CASE "  # marks rank 0's result lines among whatever megatron prints
COLORS = {"F": "#4878cf", "B": "#d65f5f", "W": "#6acc65"}


# --------------------------------------------------------------------------- worker side

class _TimedLinear(torch.autograd.Function):
    """y = x W^T whose forward, input gradient and weight gradient each take a calibrated time."""

    @staticmethod
    def forward(ctx, x, weight, stage, microbatch):
        start = time.time()
        y = x @ weight.t()
        stage.spend("F", microbatch, start, stage.cost["F"])
        ctx.save_for_backward(x, weight)
        ctx.stage, ctx.microbatch = stage, microbatch
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stage, microbatch = ctx.stage, ctx.microbatch
        start = time.time()
        grad_x = grad @ weight
        stage.spend("B", microbatch, start, stage.cost["B"])

        def weight_gradient():
            w_start = time.time()
            weight_grad.accumulate(weight, grad.flatten(0, -2).t() @ x.flatten(0, -2))
            stage.spend("W", microbatch, w_start, stage.cost["W"])

        if weight_grad.defer(weight_gradient):
            stage.deferred += 1
        else:
            weight_gradient()
        return grad_x, None, None, None


def _chunk_class():
    """A megatron model chunk (``config``, ``model_type``, ``set_input_tensor``) of one timed linear layer.
    Built on demand: megatron is only imported by the workers."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class Chunk(MegatronModule):
        model_type = ModelType.encoder_or_decoder

        def __init__(self, config, chunk: int, chunk_cost_s: float, timeline: list):
            super().__init__(config)
            self.chunk, self.timeline, self.deferred = chunk, timeline, 0
            self.cost = {"F": chunk_cost_s, "B": chunk_cost_s, "W": chunk_cost_s}
            self.weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN ** 0.5)
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x, microbatch: int):
            h = x if self.input_tensor is None else self.input_tensor
            return _TimedLinear.apply(h, self.weight, self, microbatch)

        def spend(self, kind: str, microbatch: int, start: float, cost_s: float):
            """Sleep out the rest of the op's calibrated cost, then record its interval."""
            time.sleep(max(0.0, start + cost_s - time.time()))
            self.timeline.append((kind, microbatch, self.chunk, start, time.time()))

    return Chunk


def _forward_step(data_iterator, model):
    microbatch, x = next(data_iterator)

    def loss_func(output):
        return output.mean(), {}

    return model(x, microbatch), loss_func


def _schedule_function(case: str):
    from megatron.core.pipeline_parallel import schedules as megatron_schedules

    from npu_dsv3.schedules.dualpipev import forward_backward_dualpipev

    return {"1f1b": megatron_schedules.forward_backward_pipelining_without_interleaving,
            "interleaved": megatron_schedules.forward_backward_pipelining_with_interleaving,
            "dualpipev": forward_backward_dualpipev, "dualpipev-overlap": forward_backward_dualpipev}[case]


def run_case(case: str, pp: int, microbatches: int, unit_s: float, steps: int) -> dict:
    """This rank's timelines of ``steps`` measured steps (after one warm-up) of ``case``."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from npu_dsv3.training.step import pipeline_p2p

    chunks = 1 if case == "1f1b" else 2
    vpp = None if chunks == 1 else 2
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    config = TransformerConfig(num_layers=pp * chunks, hidden_size=HIDDEN, num_attention_heads=1,
                               pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                               pipeline_dtype=torch.float32)
    config.moe_fb_overlap = case == "dualpipev-overlap"
    pipeline_p2p(config)  # interleaved at PP=2: separate activation and gradient exchanges (see its docstring)
    timeline: list = []
    Chunk = _chunk_class()
    model = [Chunk(config, c, unit_s / chunks, timeline) for c in range(chunks)]
    batches = [(m, torch.randn(SEQ, 1, HIDDEN)) for m in range(microbatches)]
    forward_backward = _schedule_function(case)
    measured = []
    for step in range(1 + steps):
        timeline.clear()
        for chunk in model:
            chunk.deferred, chunk.weight.grad = 0, None
        dist.barrier()
        start = time.time()
        forward_backward(forward_step_func=_forward_step, data_iterator=[iter(batches) for _ in model],
                         model=model, num_microbatches=microbatches, seq_length=SEQ, micro_batch_size=1)
        end = time.time()
        if step:  # step 0 warms up gloo's connections and the allocator
            measured.append({"start": start, "end": end, "ops": list(timeline),
                             "deferred": sum(chunk.deferred for chunk in model)})
    parallel_state.destroy_model_parallel()
    return {"steps": measured}


def worker(args) -> None:
    """One pipeline rank: every schedule in turn; rank 0 prints each case's gathered result."""
    import torch.distributed as dist

    # A short timeout: when one rank dies the others fail instead of waiting 30 minutes in a receive.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for case in CASES:
        result = run_case(case, args.worker_pp, args.worker_microbatches, args.unit_ms / 1000, args.steps)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(result, gathered, dst=0)
        if dist.get_rank() == 0:
            print(CASE_PREFIX + json.dumps({"case": case, "ranks": gathered}), flush=True)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- driver side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(pp: int, microbatches: int, args):
    """Start ``pp`` worker processes and yield each case's gathered result as rank 0 prints it."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(pp),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.abspath(__file__), "--worker-pp", str(pp),
               "--worker-microbatches", str(microbatches), "--unit-ms", str(args.unit_ms), "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory() as logs:
        errs = [open(os.path.join(logs, f"rank{r}.err"), "w+") for r in range(pp)]
        procs = [subprocess.Popen(command, env={**env, "RANK": str(r)}, stderr=errs[r], text=True,
                                  stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL) for r in range(pp)]
        try:
            for line in procs[0].stdout:
                if line.startswith(CASE_PREFIX):
                    yield json.loads(line[len(CASE_PREFIX):])
            for r, proc in enumerate(procs):
                if proc.wait(timeout=600):
                    errs[r].seek(0)
                    tail = [line for line in errs[r].read().splitlines() if line.strip()][-1:]
                    sys.exit(f"error: pp={pp} worker rank {r} failed (exit {proc.returncode}): {' '.join(tail)}")
        finally:
            for proc in procs:
                proc.kill()
            for err in errs:
                err.close()


def _covered(intervals) -> float:
    """Length of the union of intervals (an overlapped pair's two halves count once)."""
    total, reach = 0.0, float("-inf")
    for t0, t1 in sorted(intervals):
        if t1 > reach:
            total += t1 - max(t0, reach)
            reach = t1
    return total


def measure(case: dict) -> dict:
    """The fastest step's per-rank timelines relative to its start, makespan and bubble fraction."""
    steps = [[rank["steps"][i] for rank in case["ranks"]] for i in range(len(case["ranks"][0]["steps"]))]

    def span(step):
        return max(r["end"] for r in step) - min(r["start"] for r in step)

    step = min(steps, key=span)
    start, makespan = min(r["start"] for r in step), span(step)
    busy = [_covered([(t0, t1) for _, _, _, t0, t1 in r["ops"]]) for r in step]
    return {"makespan": makespan, "busy": busy,
            "bubble": sum(1 - b / makespan for b in busy) / len(busy),
            "deferred": sum(r["deferred"] for r in step),
            "timelines": [[(k, m, c, t0 - start, t1 - start) for k, m, c, t0, t1 in r["ops"]] for r in step]}


def predicted(case: str, pp: int, microbatches: int) -> dict:
    """Simulated and closed-form bubble fractions and the simulated makespan in units; an FB pair
    costs F + B, or max(F, B) when its halves overlap."""
    schedule = "dualpipev" if case.startswith("dualpipev") else case
    costs = replace(COSTS, overlap="max") if case == "dualpipev-overlap" else COSTS
    sim = simulate(plan(schedule, pp, microbatches), costs)
    idle = formula_bubble(schedule, pp, costs, 1 if schedule == "1f1b" else 2)
    # The formula counts idle time per rank; every rank is busy M x (F + B).
    return {"simulated": sim.bubble_fraction, "sim_makespan": sim.makespan,
            "formula": idle / (idle + microbatches * (costs.f + costs.b))}


def check_sizes(pp: int, microbatches: int) -> None:
    """Exit with one line for sizes a schedule cannot run."""
    if pp < 2:
        sys.exit(f"error: --pp values must be >= 2 (got {pp})")
    if microbatches % pp:
        sys.exit(f"error: interleaved needs --micro-batches ({microbatches}) to be a multiple of PP ({pp})")
    if microbatches < 2 * pp:
        sys.exit(f"error: dualpipev needs --micro-batches ({microbatches}) >= 2 x PP = {2 * pp}")


def plot(pp: int, microbatches: int, results: dict, unit_ms: float, path: Path) -> None:
    """One figure: a panel per schedule, a row per rank, F/B/W bars (chunk 1 hatched), idle left blank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(CASES), 1, figsize=(15, 1.2 + len(CASES) * (0.45 * pp + 0.9)), sharex=True)
    for ax, case in zip(axes, CASES):
        r = results[case]
        for rank, ops in enumerate(r["timelines"]):
            for kind, m, chunk, t0, t1 in ops:
                ax.barh(rank, (t1 - t0) * 1e3, left=t0 * 1e3, height=0.8, color=COLORS[kind], edgecolor="black",
                        linewidth=0.3, hatch="//" if chunk else None)
                if (t1 - t0) * 1e3 >= 0.4 * unit_ms:  # label the micro-batch where the bar has room
                    ax.text((t0 + t1) / 2 * 1e3, rank, str(m), ha="center", va="center", fontsize=6)
        ax.set_yticks(range(pp), [f"rank {i}" for i in range(pp)])
        ax.invert_yaxis()
        ax.set_title(f"{case}  P={pp} M={microbatches}: measured bubble {r['bubble']:.3f} "
                     f"(simulated {r['simulated']:.3f}, formula {r['formula']:.3f})", fontsize=10)
    axes[-1].set_xlabel(f"time since the step started (ms; 1 unit = {unit_ms:g} ms per rank and micro-batch)")
    legend = [Patch(color=COLORS[k], label=label) for k, label in
              (("F", "F forward"), ("B", "B input gradient"), ("W", "W weight gradient"))]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="chunk 1 (bars: micro-batch)"))
    fig.legend(handles=legend, loc="upper center", fontsize=8, ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # room for the legend above the panels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", default="2,4", help="pipeline sizes, comma-separated (default 2,4)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per step (default 4 x PP)")
    # 40 ms: each op's communication and Python overhead (~1-2 ms, more under foreign load) stays small
    # next to a chunk op (half a unit); at 5 ms it swamps the schedules' differences.
    p.add_argument("--unit-ms", type=float, default=40.0,
                   help="one cost unit: a rank's forward of one micro-batch (default 40)")
    p.add_argument("--steps", type=int, default=3,
                   help="measured steps after the warm-up; the fastest is kept (default 3)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG timelines")
    p.add_argument("--plot-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                   help="where pipeline-pp<P>.png go (default docs/)")
    # Internal: the command each worker process runs.
    p.add_argument("--worker-pp", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-microbatches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.pp = [int(x) for x in args.pp.split(",")]
    except ValueError:
        p.error(f"--pp takes comma-separated integers, e.g. 2,4 (got {args.pp!r})")
    if args.unit_ms <= 0 or args.steps < 1:
        p.error("--unit-ms must be > 0 and --steps >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker_pp:
        worker(args)
        return
    sizes = {pp: args.micro_batches or 4 * pp for pp in args.pp}
    for pp, microbatches in sizes.items():
        check_sizes(pp, microbatches)
    print(f"costs per rank and micro-batch: F = B = W = 1 unit = {args.unit_ms:g} ms (full backward 2 units); "
          f"chunks cost 1/2 with 2 per rank; simulator: f=1 b=2 w=1, an FB pair costs F + B (its forward then "
          f"its backward), or max(F, B) for dualpipev-overlap (--moe-fb-overlap)", flush=True)
    results = {}
    for pp, microbatches in sizes.items():
        results[pp] = {}
        for gathered in launch(pp, microbatches, args):
            case = gathered["case"]
            r = measure(gathered)
            r.update(predicted(case, pp, microbatches))
            results[pp][case] = r
            note = f" [{r['deferred']} weight gradients deferred to W steps]" if r["deferred"] else ""
            print(f"pp={pp} {case} M={microbatches}: measured bubble {r['bubble']:.3f}, simulated "
                  f"{r['simulated']:.3f}, formula {r['formula']:.3f} (makespan {r['makespan'] * 1e3:.0f} ms, "
                  f"simulated {r['sim_makespan'] * args.unit_ms:.0f} ms)"
                  + note, flush=True)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNG timelines (pip install matplotlib)")
        else:
            for pp, microbatches in sizes.items():
                path = args.plot_dir / f"pipeline-pp{pp}.png"
                plot(pp, microbatches, results[pp], args.unit_ms, path)
                print(f"timeline: {path}")
    final = results[max(sizes)]
    print(f"dualpipev/1f1b = {final['dualpipev']['bubble'] / final['1f1b']['bubble']:.3f} (target <= {TARGET}); "
          f"with --moe-fb-overlap: dualpipev={final['dualpipev-overlap']['bubble']:.3f}, ratio "
          f"{final['dualpipev-overlap']['bubble'] / final['1f1b']['bubble']:.3f}")
    print("bubble: " + " ".join(f"{s}={final[s]['bubble']:.3f}" for s in SCHEDULES))


if __name__ == "__main__":
    main()
