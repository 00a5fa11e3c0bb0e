#!/usr/bin/env python
"""Benchmark every portable op in ``npu_dsv3.ops`` against the baseline it replaces.

    python benchmarks/ops.py            # default sizes (a few minutes on 2 CPU cores)
    python benchmarks/ops.py --quick    # smoke run (well under a minute of compute)

What is compared (DeepSeek-V3 shapes scaled to the machine, see ``--help``):

- ``gmm`` (grouped GEMM over experts) against megatron-core's ``SequentialMLP``
  loop (``tokens_per_expert.tolist()``, ``torch.split``, one matmul per expert,
  ``torch.cat``) and against ONE dense GEMM with the same FLOPs
  (``x [T, K] @ w [K, N]``), the compute limit of the machine. Balanced and
  skewed (Zipf, with zero-token experts) routing, forward and forward+backward,
  fp32 and bf16. Achieved GFLOP/s are printed for all three, with a roofline
  bound from the dense GEMM rate and the measured copy bandwidth.
- ``mla_attention`` against ``reference_attention`` (materialised scores): time
  and PEAK MEMORY, each measurement in a fresh subprocess (see ``_peak_memory``).
- ``rms_norm``, ``swiglu``, ``apply_rotary``, ``permute``/``unpermute`` against
  the megatron-core code they replace. On CPU several portable paths ARE the
  unfused expression: the ratio is then ~1.0 by construction and the fused gain
  exists only on NPU through torch_npu. The table says so per row.

Timing: warmup, then interleaved rounds (every candidate once per round, in a
rotating order, so drift on a shared machine hits all of them alike); the
reported time is the median over rounds and a ratio is the median of the
per-round ratios. Threads: ``torch.set_num_threads(<usable cores>)``.

Targets (printed as ``target <name>: <value> (<= <bound>) PASS|MISS``):

- ``gmm<=loop``: gmm is never slower than the per-expert loop. On CPU both run
  one GEMM per expert, so the bound carries a stated timing tolerance
  (``--loop-tolerance``, default 5%).
- ``gmm<=1.5x dense`` at ~128 rows/expert.
- ``attention peak memory`` at seq 4096 <= 0.25 x the materialised fp32 scores
  (s*s*h*4 bytes).
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings

from machine import OtherLoad, cpu_model, usable_cores

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1024 * 1024


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import megatron.core

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def load_line(load: dict) -> str:
    return (f"other processes used {load['other_core_s']:.0f} core-s in {load['wall_s']:.0f} s "
            f"(avg {load['other_cores_avg']:.2f} of {usable_cores()} cores busy with work that is not this benchmark)"
            + (" -- WARNING: timings contaminated by other load; memory figures are not" if
               load["other_cores_avg"] > LOAD_LIMIT else ""))


LOAD_LIMIT = 0.25  # cores of foreign work above which a timing row is flagged


def wait_idle(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < LOAD_LIMIT cores over a 1 s window; seconds waited."""
    start = time.perf_counter()
    while max_wait > 0:
        probe = OtherLoad()
        time.sleep(1.0)
        if probe.cores() < LOAD_LIMIT or time.perf_counter() - start >= max_wait:
            break
    return time.perf_counter() - start


# --------------------------------------------------------------------------- timing


def _once(fn, number: int = 1) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (garbage collector off, like timeit)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        if enabled:
            gc.enable()


def bench(candidates: dict, rounds: int, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Interleaved timing: ``{name: [seconds per call, one entry per round]}``.

    Each candidate is warmed up, then gets an inner loop long enough that one
    measurement lasts ``min_time`` (sub-millisecond ops are otherwise at the
    mercy of the timer and of scheduler hiccups); every round times every
    candidate once, in a rotating order.
    """
    names = list(candidates)
    number = {}
    for name in names:
        for _ in range(warmup):
            candidates[name]()
        number[name] = max(1, math.ceil(min_time / max(_once(candidates[name]), 1e-7))) if min_time else 1
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_once(candidates[name], number[name]))
    return times


def med(values) -> float:
    return statistics.median(values)


def paired_ratio(a, b) -> float:
    """Median of per-round ratios a/b (robust to drift shared by both)."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(values) -> float:
    """Relative half-range of the middle runs: a rough noise figure."""
    if len(values) < 3:
        return float("nan")
    s = sorted(values)
    lo, hi = s[len(s) // 4], s[-1 - len(s) // 4]
    return (hi - lo) / 2 / statistics.median(s)


COMPUTE_OPS = ("_grouped_mm", "bmm", "mm", "addmm", "matmul", "_scaled_dot_product", "_softmax", "index_copy",
               "index_select", "clone")


def kernels_of(fn) -> str:
    """The aten ops ``fn`` dispatches to (read from a dispatch mode, not assumed), e.g. ``_grouped_mm x3, clone x3``.

    Only the outermost op of each call is seen (``_grouped_mm``, not the
    per-group ``mm`` its CPU kernel runs); ``clone`` counts ``.contiguous()``
    copies, the usual hidden cost.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.seen[name] = self.seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Recorder() as rec:
        fn()
    names = [n for n in rec.seen if any(n == p or (p.startswith("_scaled") and n.startswith(p)) for p in COMPUTE_OPS)]
    return ", ".join(f"{n} x{rec.seen[n]}" if rec.seen[n] > 1 else n for n in names) or "-"


def copy_bandwidth(nbytes: int = 256 * MIB, rounds: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write): the memory roofline."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = med(bench({"copy": lambda: dst.copy_(src)}, rounds)["copy"])
    return 2 * nbytes / t


# --------------------------------------------------------------------------- gmm


def balanced_counts(experts: int, total: int) -> list:
    base, extra = divmod(total, experts)
    return [base + (1 if e < extra else 0) for e in range(experts)]


def skewed_counts(experts: int, total: int, zero_fraction: float = 0.125, seed: int = 0) -> list:
    """Zipf(1) over the active experts, ``zero_fraction`` of experts get no token; deterministic order."""
    zero = max(1, int(experts * zero_fraction))
    active = experts - zero
    weights = [1.0 / (i + 1) for i in range(active)]
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(active), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    counts += [0] * zero
    perm = torch.randperm(experts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [counts[p] for p in perm]


def sequential_mlp_loop(x, weights, tokens_per_expert):
    """What megatron-core's SequentialMLP runs for one expert GEMM (experts.py, forward)."""
    counts = tokens_per_expert.tolist()
    return torch.cat([xi @ w for xi, w in zip(torch.split(x, counts), weights)], dim=0)


def bench_gmm(cfg, dtype_name, dist, rows_per_expert, mode, rounds, bandwidth, min_time=0.05):
    from npu_dsv3.ops import gmm

    dtype = DTYPES[dtype_name]
    E, K, N = cfg["experts"], cfg["hidden"], cfg["ffn2"]
    T = E * rows_per_expert
    counts = balanced_counts(E, T) if dist == "balanced" else skewed_counts(E, T)
    tpe = torch.tensor(counts, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(E, K, N, generator=g) / math.sqrt(K)).to(dtype)
    w_list = [w[e].clone() for e in range(E)]  # SequentialMLP: one parameter per expert
    w_dense = w[0].clone()
    backward = mode == "fwd+bwd"
    grad = torch.randn(T, N, generator=g).to(dtype) if backward else None

    if backward:
        x.requires_grad_(True)
        w.requires_grad_(True)
        for t in w_list:
            t.requires_grad_(True)
        w_dense.requires_grad_(True)

    def run(fn, leaves):
        def step():
            for t in leaves:
                t.grad = None
            out = fn()
            if backward:
                out.backward(grad)
            return out

        return step

    cands = {
        "gmm": run(lambda: gmm(x, w, tpe), [x, w]),
        "loop": run(lambda: sequential_mlp_loop(x, w_list, tpe), [x] + w_list),
        "dense": run(lambda: x @ w_dense, [x, w_dense]),
    }
    # Correctness guard: gmm must equal the loop before its time means anything.
    with torch.no_grad():
        ref = sequential_mlp_loop(x.detach(), [t.detach() for t in w_list], tpe).float()
        got = gmm(x.detach(), w.detach(), tpe).float()
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    kern = kernels_of(cands["gmm"])
    load = OtherLoad()
    times = bench(cands, rounds, min_time=min_time)
    other = load.cores()
    flops = 2 * T * K * N * (3 if backward else 1)
    t_gmm, t_loop, t_dense = (med(times[k]) for k in ("gmm", "loop", "dense"))
    elt = torch.empty((), dtype=dtype).element_size()
    # Minimum traffic: weights (+ their gradient written, read again for dx), activations in/out.
    weight_bytes = E * K * N * elt * (3 if backward else 1)
    act_bytes = (T * K + T * N) * elt * (3 if backward else 1)
    rate_dense = flops / t_dense
    limit = max(flops / rate_dense, (weight_bytes + act_bytes) / bandwidth)
    return {
        "op": "gmm",
        "case": f"{dist} {rows_per_expert}r/e",
        "dtype": dtype_name,
        "mode": mode,
        "shape": f"E={E} T={T} K={K} N={N} max_rows={max(counts)} zero_experts={counts.count(0)}",
        "kernel": kern,
        "rel_err_vs_loop": err,
        "ms": {k: 1e3 * med(v) for k, v in times.items()},
        "noise": {k: spread(v) for k, v in times.items()},
        "gflops": {"gmm": flops / t_gmm / 1e9, "loop": flops / t_loop / 1e9, "dense": flops / t_dense / 1e9},
        "ms_min": {k: 1e3 * min(v) for k, v in times.items()},
        "ratio_vs_loop": paired_ratio(times["gmm"], times["loop"]),
        "ratio_vs_loop_min": min(times["gmm"]) / min(times["loop"]),
        "ratio_vs_dense_min": min(times["gmm"]) / min(times["dense"]),
        "ratio_vs_dense": paired_ratio(times["gmm"], times["dense"]),
        "limit_ms": 1e3 * limit,
        "ratio_vs_limit": t_gmm / limit,
        "rows_per_expert": rows_per_expert,
        "other_load": other,
    }


# --------------------------------------------------------------------------- attention (subprocess)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_memory(fn) -> tuple:
    """Peak RSS growth (bytes) while ``fn`` runs, the first time at this size, in this fresh process.

    Baseline = RSS after the inputs exist (and freed memory went back to the
    OS); the high-water mark VmHWM is reset to it through /proc/self/clear_refs,
    so the delta counts exactly the pages the op touched on top of its inputs:
    its outputs, saved activations, gradients and every transient buffer.
    """
    _malloc_trim()
    base = _status_kib("VmRSS")
    method = "VmHWM reset via /proc/self/clear_refs"
    if not _reset_peak():
        method = "VmHWM without reset (lower bound)"
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return max(0, peak - base) * 1024, elapsed, method


def attention_worker(spec: dict) -> dict:
    """One (implementation, dtype, mode) in a fresh process: peak memory of the first run, then timing."""
    torch.set_num_threads(spec["threads"])
    from npu_dsv3.ops import mla_attention, reference_attention

    fn = {"mla_attention": mla_attention, "reference_attention": reference_attention}[spec["impl"]]
    dtype = DTYPES[spec["dtype"]]
    heads, dqk, dv = spec["heads"], spec["dqk"], spec["dv"]
    backward = spec["mode"] == "fwd+bwd"
    scale = dqk ** -0.5

    def inputs(seq):
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(seq, 1, heads, dqk, generator=g).to(dtype) for _ in range(2))
        v = torch.randn(seq, 1, heads, dv, generator=g).to(dtype)
        grad = torch.randn(seq, 1, heads * dv, generator=g).to(dtype) if backward else None
        if backward:
            for t in (q, k, v):
                t.requires_grad_(True)
        return q, k, v, grad

    def step(q, k, v, grad):
        def run():
            for t in (q, k, v):
                t.grad = None
            out = fn(q, k, v, scale, causal=True)
            if backward:
                out.backward(grad)
            return out

        return run

    # Warm the libraries (OpenMP pool, kernels) on a small problem that still
    # goes past the portable path's query chunk; record which kernel runs.
    small = step(*inputs(min(spec["seq"], 640)))
    kern = kernels_of(small)
    del small
    q, k, v, grad = inputs(spec["seq"])
    run = step(q, k, v, grad)
    peak, first, method = _peak_memory(run)
    extra = max(0, min(spec["repeats"] - 1, int(spec["budget_s"] // max(first, 1e-6))))
    times = [_once(run) for _ in range(extra)]
    return {
        "peak_bytes": peak,
        "method": method,
        "kernel": kern,
        "first_s": first,
        "times_s": times or [first],
        "runs": 1 + extra,
    }


def run_attention_worker(spec: dict) -> dict:
    env = dict(os.environ)
    # Fixed mmap threshold: every large buffer is its own mapping, returned to
    # the OS on free, so RSS follows the live tensors (no glibc heap reuse).
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--attention-worker", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"attention worker {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def attention_accuracy(cfg, dtype_name) -> float:
    """Relative max error of mla_attention vs reference_attention at a small size."""
    from npu_dsv3.ops import mla_attention, reference_attention

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    seq = 640
    q, k = (torch.randn(seq, 1, cfg["heads"], cfg["dqk"], generator=g).to(dtype) for _ in range(2))
    v = torch.randn(seq, 1, cfg["heads"], cfg["dv"], generator=g).to(dtype)
    a = mla_attention(q, k, v, cfg["dqk"] ** -0.5).float()
    b = reference_attention(q, k, v, cfg["dqk"] ** -0.5).float()
    return ((a - b).abs().max() / b.abs().max()).item()


def bench_attention(cfg, dtype_name, mode, threads, log):
    res = {}
    load = OtherLoad()
    for impl in ("mla_attention", "reference_attention"):
        spec = dict(
            impl=impl, dtype=dtype_name, mode=mode, threads=threads, seq=cfg["seq"], heads=cfg["heads"],
            dqk=cfg["dqk"], dv=cfg["dv"], repeats=cfg["attn_repeats"], budget_s=cfg["attn_budget_s"],
        )
        res[impl] = run_attention_worker(spec)
        log(f"    {impl:<20} {dtype_name} {mode:<7} peak {res[impl]['peak_bytes'] / MIB:8.1f} MiB  "
            f"median {1e3 * med(res[impl]['times_s']):9.1f} ms over {len(res[impl]['times_s'])} run(s)  "
            f"[{res[impl]['kernel']}]")
    s, h = cfg["seq"], cfg["heads"]
    scores = s * s * h * 4
    elt = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    # What any implementation must hold: its output, and in backward the input gradients.
    floor = s * h * cfg["dv"] * elt + (s * h * (2 * cfg["dqk"] + cfg["dv"]) * elt if mode == "fwd+bwd" else 0)
    ours, base = res["mla_attention"], res["reference_attention"]
    t_ours, t_base = med(ours["times_s"]), med(base["times_s"])
    return {
        "op": "mla_attention",
        "case": f"s={s} h={h} qk={cfg['dqk']} v={cfg['dv']} causal",
        "dtype": dtype_name,
        "mode": mode,
        "kernel": ours["kernel"],
        "baseline_kernel": base["kernel"],
        "ms": {"ours": 1e3 * t_ours, "reference": 1e3 * t_base},
        "ratio_time": t_ours / t_base,
        "peak_mib": {"ours": ours["peak_bytes"] / MIB, "reference": base["peak_bytes"] / MIB},
        "scores_mib": scores / MIB,
        "floor_mib": floor / MIB,
        "peak_vs_scores": ours["peak_bytes"] / scores,
        "ref_peak_vs_scores": base["peak_bytes"] / scores,
        "ratio_peak": ours["peak_bytes"] / max(base["peak_bytes"], 1),
        "method": ours["method"],
        "runs": {"ours": ours["runs"], "reference": base["runs"]},
        "rel_err_vs_reference": attention_accuracy(cfg, dtype_name),
        "other_load": load.cores(),
    }


# --------------------------------------------------------------------------- small ops


def _grad_step(fn, leaves, grad):
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        if grad is not None:
            out.backward(grad)
        return out

    return step


def _rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_small_ops(cfg, dtype_name, mode, rounds, min_time=0.05):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer.moe import moe_utils

    from npu_dsv3.ops import apply_rotary, permute, rms_norm, swiglu, unpermute

    dtype = DTYPES[dtype_name]
    backward = mode == "fwd+bwd"
    g = torch.Generator().manual_seed(2)
    rows = []

    def case(op, case_name, ours, base, leaves, out_shape, baseline_name, note, extra_baselines=()):
        grad = torch.randn(out_shape, generator=g).to(dtype) if backward else None
        for t in leaves:
            t.requires_grad_(backward)
        cands = {"ours": _grad_step(ours, leaves, grad), "base": _grad_step(base, leaves, grad)}
        for name, fn in extra_baselines:
            cands[name] = _grad_step(fn, leaves, grad)
        with torch.no_grad():
            err = _rel_err(ours(), base())
        load = OtherLoad()
        times = bench(cands, rounds, min_time=min_time)
        row = {
            "other_load": load.cores(),
            "op": op, "case": case_name, "dtype": dtype_name, "mode": mode,
            "baseline": baseline_name, "note": note,
            "ms": {k: 1e3 * med(v) for k, v in times.items()},
            "ms_min": {k: 1e3 * min(v) for k, v in times.items()},
            "ratio": paired_ratio(times["ours"], times["base"]),
            "ratio_min": min(times["ours"]) / min(times["base"]),
            "rel_err_vs_baseline": err,
        }
        for name, _ in extra_baselines:
            row.setdefault("extra", {})[name] = paired_ratio(times["ours"], times[name])
        rows.append(row)

    # rms_norm: [seq, hidden], megatron's unfused expression; torch.nn.RMSNorm (what
    # megatron's WrappedTorchNorm builds) as context.
    T, H = cfg["seq"], cfg["hidden"]
    x = torch.randn(T, H, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    eps = 1e-6

    def unfused_rms():
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    case("rms_norm", f"[{T},{H}]", lambda: rms_norm(x, weight, eps), unfused_rms, [x, weight], (T, H),
         "unfused fp32-stat expression",
         "CPU portable path IS this expression (ratio ~1 by construction); fused gain only on NPU (npu_rms_norm)",
         extra_baselines=[("torch.nn.functional.rms_norm", lambda: torch.nn.functional.rms_norm(x, (H,), weight, eps))])

    # swiglu: [T*topk, 2*ffn] as the experts see it; megatron MLP's glu().
    R, F2 = cfg["experts"] * cfg["rows_main"], cfg["ffn2"]
    y = torch.randn(R, F2, generator=g).to(dtype)

    def megatron_glu():
        a, b = torch.chunk(y, 2, dim=-1)
        return torch.nn.functional.silu(a) * b

    case("swiglu", f"[{R},{F2}]", lambda: swiglu(y), megatron_glu, [y], (R, F2 // 2),
         "megatron MLP glu (chunk, silu, mul)",
         "CPU portable path IS megatron's expression (ratio ~1 by construction); fused gain only on NPU (npu_swiglu)")

    # apply_rotary: q_pe [seq, 1, heads, rope_dim], megatron's MLA rope (de-interleave, rotate_half).
    h, d = cfg["heads"], cfg["rope_dim"]
    t = torch.randn(T, 1, h, d, generator=g).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(T).float(), inv)
    freqs = torch.cat((ang, ang), dim=-1)[:, None, None, :]
    mscale = 1.2
    case("apply_rotary", f"[{T},1,{h},{d}]", lambda: apply_rotary(t, freqs, mscale),
         lambda: _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=True,
                                            mscale=mscale),
         [t], (T, 1, h, d), "megatron _apply_rotary_pos_emb_bshd (MLA)",
         "same unfused arithmetic on CPU; fused gain only on NPU (npu_rotary_mul)")

    # permute / unpermute: tokens [tokens, hidden], top-k of E experts.
    E, k = cfg["experts"], cfg["topk"]
    ntok = E * cfg["rows_main"] // k
    tokens = torch.randn(ntok, H, generator=g).to(dtype)
    logits = torch.randn(ntok, E, generator=g)
    idx = logits.topk(k, dim=-1).indices
    routing_map = torch.zeros(ntok, E, dtype=torch.bool).scatter_(1, idx, True)
    probs = torch.softmax(logits, -1)
    case("permute", f"tokens={ntok} E={E} top{k}", lambda: permute(tokens, routing_map, probs)[0],
         lambda: moe_utils.permute(tokens, routing_map, probs=probs)[0], [tokens], (ntok * k, H),
         "megatron moe_utils.permute", "CPU portable path CALLS moe_utils.permute (ratio ~1 by construction)")
    permuted, _, sorted_idx = moe_utils.permute(tokens.detach(), routing_map)
    permuted = permuted.clone()
    case("unpermute", f"tokens={ntok} E={E} top{k}",
         lambda: unpermute(permuted, sorted_idx, tokens.shape, routing_map=routing_map),
         lambda: moe_utils.unpermute(permuted, sorted_idx, tokens.shape, routing_map=routing_map), [permuted],
         (ntok, H), "megatron moe_utils.unpermute",
         "CPU portable path CALLS moe_utils.unpermute (ratio ~1 by construction)")
    return rows


# --------------------------------------------------------------------------- report


def fmt_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep] + body)


def summary_rows(results) -> list:
    """One row per (op, case, dtype, mode, baseline); ``load`` = cores of foreign work while it ran (* = flagged)."""

    def load(r):
        value = r.get("other_load", float("nan"))
        return f"{value:.2f}" + ("*" if value > LOAD_LIMIT else "")

    rows = []
    for r in results["gmm"]:
        rows.append(["gmm", r["case"], r["dtype"], r["mode"], f"{r['ms']['gmm']:.2f}", "SequentialMLP loop",
                     f"{r['ms']['loop']:.2f}", f"{r['ratio_vs_loop']:.3f}", load(r),
                     f"gmm {r['gflops']['gmm']:.0f} GF/s; {r['kernel']}"])
        rows.append(["gmm", r["case"], r["dtype"], r["mode"], f"{r['ms']['gmm']:.2f}", "dense GEMM same FLOPs",
                     f"{r['ms']['dense']:.2f}", f"{r['ratio_vs_dense']:.3f}", load(r),
                     f"dense {r['gflops']['dense']:.0f} GF/s; roofline {r['limit_ms']:.2f} ms "
                     f"(gmm {r['ratio_vs_limit']:.2f}x)"])
    for r in results["attention"]:
        rows.append(["mla_attention", r["case"], r["dtype"], r["mode"], f"{r['ms']['ours']:.0f}",
                     "reference_attention", f"{r['ms']['reference']:.0f}", f"{r['ratio_time']:.3f}", load(r),
                     f"peak {r['peak_mib']['ours']:.0f} vs {r['peak_mib']['reference']:.0f} MiB "
                     f"(x{r['ratio_peak']:.3f}); {r['peak_vs_scores']:.3f}x scores; floor {r['floor_mib']:.0f} MiB"])
    for r in results["small"]:
        extra = "; ".join(f"vs {k}: {v:.3f}" for k, v in r.get("extra", {}).items())
        rows.append([r["op"], r["case"], r["dtype"], r["mode"], f"{r['ms']['ours']:.3f}", r["baseline"],
                     f"{r['ms']['base']:.3f}", f"{r['ratio']:.3f}", load(r), extra or "-"])
    return rows


def targets(results, cfg) -> list:
    """``(name, value, bound, PASS|MISS, note)``; note flags timings taken under foreign load."""
    out = []
    tol = cfg["loop_tolerance"]

    def note(r, timing=True):
        load = r.get("other_load", 0.0)
        return f"  # timed under foreign load ({load:.2f} cores)" if timing and load > LOAD_LIMIT else ""

    for r in results["gmm"]:
        out.append((f"gmm<=loop [{r['case']} {r['dtype']} {r['mode']}]", r["ratio_vs_loop"], 1.0 + tol, note(r)))
    for r in results["gmm"]:
        if r["rows_per_expert"] == cfg["rows_main"]:
            out.append((f"gmm<=1.5x dense [{r['case']} {r['dtype']} {r['mode']}]", r["ratio_vs_dense"], 1.5, note(r)))
    for r in results["attention"]:
        out.append((f"attention peak/scores [s={cfg['seq']} {r['dtype']} {r['mode']}]", r["peak_vs_scores"], 0.25,
                    note(r, timing=False)))
    return [(name, value, bound, "PASS" if value <= bound else "MISS", n) for name, value, bound, n in out]


# --------------------------------------------------------------------------- main


def config(args) -> dict:
    if args.quick:
        cfg = dict(experts=16, topk=4, hidden=256, ffn2=256, rows_main=64, rows_small=8, seq=1024, heads=4,
                   dqk=192, dv=128, rope_dim=64, rounds=5, small_rounds=9, min_time=0.02, small_min_time=0.005, attn_repeats=2, attn_budget_s=5.0, dtypes=["fp32", "bf16"])
    else:
        cfg = dict(experts=64, topk=8, hidden=1024, ffn2=1024, rows_main=128, rows_small=16, seq=4096, heads=16,
                   dqk=192, dv=128, rope_dim=64, rounds=11, small_rounds=21, min_time=0.05, small_min_time=0.01, attn_repeats=3, attn_budget_s=25.0,
                   dtypes=["fp32", "bf16"])
    for key in ("rounds", "seq", "attn_repeats"):
        if getattr(args, key, None):
            cfg[key] = getattr(args, key)
    if args.dtypes:
        cfg["dtypes"] = args.dtypes.split(",")
    cfg["loop_tolerance"] = args.loop_tolerance
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (default: usable cores)")
    p.add_argument("--only", default="gmm,attention,small", help="comma list of gmm,attention,small")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (default both)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per case (gmm and small ops)")
    p.add_argument("--seq", type=int, default=None, help="attention / token sequence length (default 4096)")
    p.add_argument("--attn-repeats", type=int, default=None, help="attention runs per measurement, first included")
    p.add_argument("--loop-tolerance", type=float, default=0.05,
                   help="timing tolerance of the gmm<=loop target (both are one GEMM per expert on CPU)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each case, wait up to this long for other processes to go idle (shared machines)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--attention-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.attention_worker:
        print(json.dumps(attention_worker(json.loads(args.attention_worker))))
        return 0

    torch.set_num_threads(args.threads)
    cfg = config(args)
    only = set(args.only.split(","))
    started = time.perf_counter()
    overall = OtherLoad()

    def log(msg):
        print(msg, flush=True)

    info = machine_info()
    log(f"machine: {info['cpu']}, {info['cores']} usable cores, torch {info['torch']} "
        f"({info['cpu_capability']}), megatron-core {info['megatron_core']}, python {info['python']}")
    log(f"torch.set_num_threads({args.threads}) -> torch.get_num_threads() = {torch.get_num_threads()}")
    log(f"mode: {'QUICK (smoke sizes: target lines are indicative only)' if args.quick else 'default'}; "
        f"config: {json.dumps({k: v for k, v in cfg.items()})}")
    log("timing: warmup, then interleaved rounds; time = median, ratio = median of per-round ratios "
        "(best-of = ratio of the fastest rounds, shown where other load makes medians noisy)")

    results = {"machine": info, "config": cfg, "quick": args.quick, "gmm": [], "attention": [], "small": []}

    if "gmm" in only:
        load = OtherLoad()
        bw = copy_bandwidth()
        results["copy_bandwidth_GBs"] = bw / 1e9
        log(f"\n== gmm: E={cfg['experts']} K={cfg['hidden']} N={cfg['ffn2']}; memory copy bandwidth "
            f"{bw / 1e9:.1f} GB/s (roofline bound = max(FLOPs / dense GFLOP/s, min bytes / bandwidth))")
        for dtype_name in cfg["dtypes"]:
            for rows in (cfg["rows_main"], cfg["rows_small"]):
                for dist in ("balanced", "skewed"):
                    for mode in ("fwd", "fwd+bwd"):
                        wait_idle(args.wait_idle)
                        r = bench_gmm(cfg, dtype_name, dist, rows, mode, cfg["rounds"], bw, cfg["min_time"])
                        results["gmm"].append(r)
                        log(f"  {dtype_name} {r['case']:<17} {mode:<7} gmm {r['ms']['gmm']:8.2f} ms "
                            f"loop {r['ms']['loop']:8.2f} dense {r['ms']['dense']:8.2f} | gmm/loop "
                            f"{r['ratio_vs_loop']:.3f} gmm/dense {r['ratio_vs_dense']:.3f} (best-of: {r['ratio_vs_loop_min']:.3f}, "
                            f"{r['ratio_vs_dense_min']:.3f}) | GF/s gmm "
                            f"{r['gflops']['gmm']:.0f} dense {r['gflops']['dense']:.0f} | noise "
                            f"±{100 * r['noise']['gmm']:.1f}% | {r['kernel']} | err {r['rel_err_vs_loop']:.1e}"
                            f" | {r['shape']}")
        results["load_gmm"] = load.report()
        log("  " + load_line(results["load_gmm"]))

    if "attention" in only:
        log(f"\n== mla_attention vs reference_attention: seq {cfg['seq']}, batch 1, heads {cfg['heads']}, "
            f"qk {cfg['dqk']}, v {cfg['dv']}, causal")
        log("  peak memory: each (impl, dtype, mode) in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=131072 so "
            "freed buffers leave RSS); inputs allocated, libraries warmed on a small size, VmHWM reset to the "
            "current RSS via /proc/self/clear_refs, one run; peak = VmHWM - baseline RSS (outputs, saved "
            "activations, grads and transients; not the inputs). Times: median of the runs after that one.")
        load = OtherLoad()
        for dtype_name in cfg["dtypes"]:
            for mode in ("fwd", "fwd+bwd"):
                wait_idle(args.wait_idle)
                r = bench_attention(cfg, dtype_name, mode, args.threads, log)
                results["attention"].append(r)
                log(f"  {dtype_name} {mode:<7} time ours/ref {r['ratio_time']:.3f}  peak ours/ref "
                    f"{r['ratio_peak']:.3f}  peak ours/scores {r['peak_vs_scores']:.3f} "
                    f"(ref {r['ref_peak_vs_scores']:.2f}x; scores {r['scores_mib']:.0f} MiB) "
                    f"err {r['rel_err_vs_reference']:.1e}; floor (out + input grads) {r['floor_mib']:.0f} MiB")
        results["load_attention"] = load.report()
        log("  " + load_line(results["load_attention"]))

    if "small" in only:
        log(f"\n== rms_norm / swiglu / apply_rotary / permute / unpermute vs the megatron-core code they replace")
        load = OtherLoad()
        for dtype_name in cfg["dtypes"]:
            for mode in ("fwd", "fwd+bwd"):
                wait_idle(args.wait_idle)
                for r in bench_small_ops(cfg, dtype_name, mode, cfg["small_rounds"], cfg["small_min_time"]):
                    results["small"].append(r)
                    extra = "".join(f"; ours/{k} {v:.3f}" for k, v in r.get("extra", {}).items())
                    log(f"  {r['op']:<12} {dtype_name} {mode:<7} ours {r['ms']['ours']:8.3f} ms  base "
                        f"{r['ms']['base']:8.3f} ms  ratio {r['ratio']:.3f} (best-of {r['ratio_min']:.3f}){extra}  err "
                        f"{r['rel_err_vs_baseline']:.1e}  ({r['note']})")
        results["load_small"] = load.report()
        log("  " + load_line(results["load_small"]))

    log("\n== summary (times in ms; ratio = ours / baseline, < 1 is faster)")
    header = ["op", "case", "dtype", "mode", "ours ms", "baseline", "base ms", "ratio", "load", "context"]
    log(fmt_table(header, summary_rows(results)))

    tlines = targets(results, cfg)
    results["targets"] = [dict(name=n, value=v, bound=b, status=s, note=t) for n, v, b, s, t in tlines]
    log("")
    if args.quick:
        log("(quick sizes: the targets are defined at the default sizes; these lines are indicative only)")
    for name, value, bound, status, note in tlines:
        if args.quick:
            note += "  # quick sizes, not the size the target is defined at"
        log(f"target {name}: {value:.3f} (<= {bound:g}) {status}{note}")
    misses = sum(t[3] == "MISS" for t in tlines)
    total = overall.report()
    results["load_total"] = total
    log(f"\n{len(tlines) - misses}/{len(tlines)} targets PASS; total wall time {time.perf_counter() - started:.0f} s; "
        + load_line(total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
