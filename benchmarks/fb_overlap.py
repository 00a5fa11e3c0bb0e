"""DualPipeV's F&B overlap (``--moe-fb-overlap``) on real training: the timeline of the overlapped
pairs, how much of each lane's communication ran beside the other lane's compute, and the
iteration time with and without the overlap.

What runs: a tiny DeepSeek-V3 (random init, ``--hf-config`` of a model made by
``npu_dsv3.tiny_model``, MoE layers after the first) trains for ``--iters`` iterations on
4 gloo processes, PP 2 x DP 2 with EP 2 over the data-parallel ranks, under
``--schedules-method dualpipev``, once with ``--moe-fb-overlap`` and once without (same flags
otherwise). Each worker process is this script (``--worker``) calling
``npu_dsv3.pretrain.main`` inside ``npu_dsv3.schedules.fb_overlap.record()``, which collects,
for every steady-state FB pair, the forward lane (main thread) and the backward lane (second
thread) as ``Interval(lane, kind, start, end)``: kind "lane" (the whole forward or backward),
"comm" (one collective, from issue to completion: the MoE EP all-to-alls and whatever else the
pair's forward or backward communicates) and "wait" (waiting for the lane's turn to issue). A
lane's time outside its comm and wait intervals is compute. Times are ``time.perf_counter()``.

Figures, per rank: the number of overlapped pairs, each lane's total comm and wait time, and
the overlap fraction: the share of a lane's comm time during which the OTHER lane was computing (inside its
"lane" span and in none of its own "comm" or "wait" intervals), by plain interval arithmetic.
The overall fraction is the sum of overlapped comm time over the sum of comm time, all ranks and
lanes together. Iteration time: the mean ``ms_per_iter`` of the ``--log-jsonl`` records. Both
leave the first iteration out when there are more (it warms up gloo and the allocator). The
ratio is with / without overlap (< 1: the overlap is faster). A collective's interval runs from
its issue to its completion, so it includes waiting for the slowest member of its group.

On a CPU the two lanes compete for the same cores: the overlap of communication and compute is
real, the speed-up says little about an NPU / GPU, where the lanes' kernels run on streams.

    python benchmarks/fb_overlap.py                          # default sizes, PNG in docs/
    python benchmarks/fb_overlap.py --hidden 128 --seq-length 32 --iters 1 --no-plot

The last line is ``fb-overlap: comm overlapped with the other lane's compute <fraction>;
iteration time with/without overlap <ratio>``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORLD = 4
TRAIN_FLAGS = ["--mock-data", "--micro-batch-size", "1", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1",
               "--pipeline-model-parallel-size", "2", "--schedules-method", "dualpipev",
               "--expert-model-parallel-size", "2"]
COLORS = {"compute": "#4878cf", "comm": "#ee854a", "wait": "#bbbbbb"}
DOCS = Path(__file__).resolve().parent.parent / "docs"
LANE_NAMES = {"F": "forward lane", "B": "backward lane"}


# --------------------------------------------------------------------------- worker side

def worker(out: str, flags: list) -> None:
    """One rank: train with ``flags`` while recording the overlapped pairs; write them to ``out``."""
    from npu_dsv3 import pretrain
    from npu_dsv3.schedules import fb_overlap

    start = time.perf_counter()
    with fb_overlap.record() as intervals:
        code = pretrain.main(flags)
    seconds = time.perf_counter() - start
    if code:
        sys.exit(code)
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "intervals": [[i.lane, i.kind, i.start, i.end] for i in intervals]}, f)


# --------------------------------------------------------------------------- driver side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: str, hidden: int, layers: int, experts: int) -> str:
    """A random tiny DeepSeek-V3 saved as an HF directory under ``root``; returns its path."""
    from transformers.utils import logging as transformers_logging

    from npu_dsv3.tiny_model import make_hf_model, save_hf

    transformers_logging.disable_progress_bar()
    model = make_hf_model(seed=0, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                          n_routed_experts=experts, num_experts_per_tok=4, n_group=4, topk_group=2,
                          q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32)
    return save_hf(model, os.path.join(root, "hf"))


def run_training(root: str, name: str, flags: list) -> dict:
    """Train on ``WORLD`` worker processes; return each rank's recording and the JSONL records."""
    run_dir = Path(root) / name
    run_dir.mkdir()
    log = run_dir / "iterations.jsonl"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}
    procs, errs = [], []
    for rank in range(WORLD):
        errs.append(run_dir / f"rank{rank}.err")
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(run_dir / f"rank{rank}.json"),
                   "--log-jsonl", str(log), *flags]
        with open(errs[-1], "w") as err, open(run_dir / f"rank{rank}.out", "w") as out:
            procs.append(subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=out, stderr=err))
    codes = _wait(procs, timeout=900)
    failed = [r for r, c in enumerate(codes) if c]
    if failed:
        rank = failed[0]
        tail = [line for line in errs[rank].read_text().splitlines() if line.strip()][-1:]
        sys.exit(f"error: {name} run: rank {rank} failed (exit {codes[rank]}): {' '.join(tail)}")
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"ranks": ranks, "records": [json.loads(line) for line in log.read_text().splitlines()]}


def _wait(procs, timeout: float) -> list:
    """Exit codes of ``procs``; when one fails (or time runs out) the others are killed, so that
    no rank is left waiting in a collective."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    return [p.returncode for p in procs]


def mean_iteration_ms(records: list) -> float:
    """Mean ms per iteration, the first (warm-up) iteration left out when there are more."""
    times = [r["ms_per_iter"] for r in records]
    times = times[1:] if len(times) > 1 else times
    return sum(times) / len(times)


# --------------------------------------------------------------------------- interval arithmetic

def merge(intervals) -> list:
    """The union of ``(start, end)`` intervals as sorted, disjoint intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def subtract(a: list, b: list) -> list:
    """``a`` minus ``b``, both sorted and disjoint (as ``merge`` returns them)."""
    result = []
    for start, end in a:
        for b_start, b_end in b:
            if b_end <= start or b_start >= end:
                continue
            if b_start > start:
                result.append([start, b_start])
            start = max(start, b_end)
        if start < end:
            result.append([start, end])
    return result


def intersection_length(a: list, b: list) -> float:
    """Total length of the intersection of ``a`` and ``b``, both sorted and disjoint."""
    return sum(max(0.0, min(a_end, b_end) - max(a_start, b_start)) for a_start, a_end in a for b_start, b_end in b)


def length(intervals: list) -> float:
    return sum(end - start for start, end in intervals)


def pair_spans(intervals: list) -> list:
    """Each pair's (start, end), in order: pairs run one after another, so the i-th forward lane and
    the i-th backward lane (by start) form pair i."""
    lanes = [sorted((s, e) for l, k, s, e in intervals if l == lane and k == "lane") for lane in LANE_NAMES]
    return [(min(f[0], b[0]), max(f[1], b[1])) for f, b in zip(*lanes)]


def after_warmup(intervals: list, iterations: int) -> list:
    """The intervals of the pairs after the first iteration's (all of them for a single iteration)."""
    spans = pair_spans(intervals)
    if iterations == 1 or not spans:
        return intervals
    begin = spans[len(spans) // iterations][0]
    return [i for i in intervals if i[2] >= begin]


def lane_sets(intervals: list) -> dict:
    """Per lane: its merged "lane", "comm" and "wait" intervals and its compute time (lane minus the others)."""
    sets = {}
    for lane in LANE_NAMES:
        sets[lane] = {kind: merge((s, e) for l, k, s, e in intervals if l == lane and k == kind)
                      for kind in ("lane", "comm", "wait")}
        sets[lane]["compute"] = subtract(sets[lane]["lane"], merge(sets[lane]["comm"] + sets[lane]["wait"]))
    return sets


def overlap_figures(intervals: list) -> dict:
    """Pairs, per-lane comm and wait seconds and the comm seconds that ran beside the other lane's compute."""
    sets = lane_sets(intervals)
    figures = {"pairs": len(pair_spans(intervals)), "comm": {}, "wait": {}, "overlapped": {}}
    for lane, other in (("F", "B"), ("B", "F")):
        figures["comm"][lane] = length(sets[lane]["comm"])
        figures["wait"][lane] = length(sets[lane]["wait"])
        figures["overlapped"][lane] = intersection_length(sets[lane]["comm"], sets[other]["compute"])
    return figures


def fraction(overlapped: float, comm: float) -> float:
    return overlapped / comm if comm else 0.0


def rank_fraction(figures: dict) -> float:
    """A rank's overlap fraction, both lanes together."""
    return fraction(sum(figures["overlapped"].values()), sum(figures["comm"].values()))


def rank_line(rank: int, recorded: int, figures: dict) -> str:
    lanes = [f"{lane} comm {figures['comm'][lane] * 1e3:.0f} ms "
             f"({fraction(figures['overlapped'][lane], figures['comm'][lane]):.2f} beside {other} compute), "
             f"{lane} wait {figures['wait'][lane] * 1e3:.0f} ms"
             for lane, other in (("F", "B"), ("B", "F"))]
    return (f"rank {rank}: {recorded} overlapped pairs recorded, {figures['pairs']} measured; {', '.join(lanes)}; "
            f"overlap fraction {rank_fraction(figures):.2f}")


# --------------------------------------------------------------------------- timeline

def window(intervals: list, iterations: int, size: int) -> list:
    """The intervals of ``size`` consecutive pairs in the middle of the last iteration's pairs."""
    spans = pair_spans(intervals)
    last = spans[len(spans) - len(spans) // iterations:]
    first = max(0, (len(last) - size) // 2)
    begin, end = last[first][0], last[min(len(last), first + size) - 1][1]
    return [i for i in intervals if i[2] >= begin and i[3] <= end]


def plot(intervals: list, rank: int, overlap: float, path: Path) -> None:
    """Two rows (forward lane, backward lane): compute, comm and wait bars over a window of pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    origin = min(s for _, _, s, _ in intervals)
    sets = lane_sets(intervals)
    fig, ax = plt.subplots(figsize=(15, 3.8))
    for row, lane in enumerate(LANE_NAMES):
        for kind in ("compute", "comm", "wait"):
            bars = [((s - origin) * 1e3, (e - s) * 1e3) for s, e in sets[lane][kind]]
            ax.broken_barh(bars, (row - 0.38, 0.76), facecolors=COLORS[kind], edgecolor="black", linewidth=0.2,
                           hatch="///" if kind == "wait" else None)
    ax.set_yticks(range(len(LANE_NAMES)), list(LANE_NAMES.values()))
    ax.invert_yaxis()
    ax.set_xlabel("time since the window started (ms)")
    pairs = len(pair_spans(intervals))
    ax.set_title(f"DualPipeV --moe-fb-overlap, rank {rank}: {pairs} consecutive FB pairs of the last iteration "
                 f"(forward of one micro-batch beside the backward of another)\n"
                 f"share of comm time overlapped with the other lane's compute: {overlap:.2f} "
                 f"(this rank's overlap fraction, as printed)", fontsize=10)
    legend = [Patch(color=COLORS["compute"], label="compute"),
              Patch(color=COLORS["comm"], label="collective (EP all-to-all, ...), issue to completion"),
              Patch(facecolor=COLORS["wait"], edgecolor="black", hatch="///", label="waiting for the lane's turn")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=9, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--hidden", type=int, default=256, help="model hidden size, a multiple of 64 (default 256)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers, a multiple of 4 (default 8)")
    p.add_argument("--experts", type=int, default=16, help="routed experts, a multiple of 4, >= 8 (default 16)")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--global-batch-size", type=int, default=16,
                   help="samples per iteration; micro-batches per DP rank = this / 2, at least 4 (default 16)")
    p.add_argument("--iters", type=int, default=4,
                   help="training iterations per run; the first is left out of the figures when there are more "
                   "(default 4)")
    p.add_argument("--pairs-shown", type=int, default=3, help="consecutive pairs in the timeline, 2-4 (default 3)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG timeline")
    p.add_argument("--plot", type=Path, default=DOCS / "fb-overlap-timeline.png",
                   help="where the timeline goes (default docs/fb-overlap-timeline.png)")
    args = p.parse_args(argv)
    if args.hidden < 64 or args.hidden % 64:
        sys.exit(f"error: --hidden must be a positive multiple of 64 (got {args.hidden})")
    if args.layers < 4 or args.layers % 4:
        sys.exit(f"error: --layers must be a positive multiple of 4: 2 pipeline ranks x 2 chunks (got {args.layers})")
    if args.experts < 8 or args.experts % 4:
        sys.exit(f"error: --experts must be a multiple of 4 and >= 8: 4 expert groups, top-4 experts from the best 2 "
                 f"(got {args.experts})")
    if args.seq_length < 8 or args.seq_length > 512:
        sys.exit(f"error: --seq-length must be in 8..512 (got {args.seq_length})")
    if args.global_batch_size < 8 or args.global_batch_size % 2:
        sys.exit(f"error: --global-batch-size must be even and >= 8: dualpipev needs >= 4 micro-batches per DP rank "
                 f"(got {args.global_batch_size})")
    if args.iters < 1:
        sys.exit(f"error: --iters must be >= 1 (got {args.iters})")
    if not 2 <= args.pairs_shown <= 4:
        sys.exit(f"error: --pairs-shown must be 2, 3 or 4 (got {args.pairs_shown})")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2:])
        return
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        hf_dir = make_model(root, args.hidden, args.layers, args.experts)
        flags = ["--hf-config", hf_dir, *TRAIN_FLAGS, "--global-batch-size", str(args.global_batch_size),
                 "--seq-length", str(args.seq_length), "--train-iters", str(args.iters)]
        print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts (top-4); seq "
              f"{args.seq_length}, global batch {args.global_batch_size}, {args.iters} iterations; {WORLD} ranks: "
              f"PP 2 x DP 2, EP 2, dualpipev", flush=True)
        runs = {}
        for name, extra in (("overlap", ["--moe-fb-overlap"]), ("no-overlap", [])):
            start = time.perf_counter()
            runs[name] = run_training(root, name, [*flags, *extra])
            times = ", ".join(f"{r['ms_per_iter']:.0f}" for r in runs[name]["records"])
            training = max(r["seconds"] for r in runs[name]["ranks"])
            print(f"run {name}: {time.perf_counter() - start:.1f} s wall, {training:.1f} s in pretrain.main; "
                  f"iterations {times} ms; mean {mean_iteration_ms(runs[name]['records']):.0f} ms", flush=True)
    ranks = [r["intervals"] for r in runs["overlap"]["ranks"]]
    if any(r["intervals"] for r in runs["no-overlap"]["ranks"]):
        sys.exit("error: the run without --moe-fb-overlap recorded overlapped pairs")
    recorded = [len(pair_spans(intervals)) for intervals in ranks]
    if not all(recorded):
        sys.exit(f"error: rank {recorded.index(0)} recorded no overlapped pair")
    figures = [overlap_figures(after_warmup(intervals, args.iters)) for intervals in ranks]
    if args.iters > 1:
        print(f"figures over the pairs of iterations 2-{args.iters} (the first warms up)")
    for rank, f in enumerate(figures):
        print(rank_line(rank, recorded[rank], f))
    overall = fraction(sum(sum(f["overlapped"].values()) for f in figures),
                       sum(sum(f["comm"].values()) for f in figures))
    with_overlap, without = (mean_iteration_ms(runs[n]["records"]) for n in ("overlap", "no-overlap"))
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNG timeline (pip install matplotlib)")
        else:
            rank = max(range(WORLD), key=lambda r: figures[r]["pairs"])
            plot(window(ranks[rank], args.iters, args.pairs_shown), rank, rank_fraction(figures[rank]), args.plot)
            print(f"timeline: {args.plot}")
    print(f"mean iteration: {with_overlap:.0f} ms with --moe-fb-overlap, {without:.0f} ms without")
    print(f"fb-overlap: comm overlapped with the other lane's compute {overall:.3f}; "
          f"iteration time with/without overlap {with_overlap / without:.3f}")


if __name__ == "__main__":
    main()
