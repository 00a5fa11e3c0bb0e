#!/usr/bin/env python
"""Benchmark checkpoint conversion (``npu-dsv3 convert hf2mcore`` / ``mcore2hf``) against a plain copy.

    python benchmarks/convert.py            # 1x, 2x, 4x model size (a few minutes on 2 cores)
    python benchmarks/convert.py --quick    # smoke run: 1x with fewer layers (< 1 minute)
    python benchmarks/convert.py --profile  # also cProfile the conversions at the largest scale

What is measured, in ONE run, per scale:

- A synthetic HF checkpoint of DeepSeek-V3 ARCHITECTURE (MLA with q_lora, a
  first dense layer, sigmoid-routed MoE layers with 32 routed experts + 1 shared
  expert, untied head, the MTP layer ``model.layers.{L}.*`` stored as released
  checkpoints store it, with its ``embed_tokens`` / ``shared_head.head`` equal to
  the main ones), random bf16 (``e_score_correction_bias`` fp32), written directly
  with safetensors in 128 MiB shards + index + config.json. Scales grow the number
  of LAYERS only, so the largest tensor (the 16384 x 1024 embedding / head,
  32 MiB) is the same at every scale and the model size grows ~1x, 2x, 4x.
- ``npu-dsv3 convert hf2mcore`` into TP2 PP2 EP4 grouped-GEMM, with ``--workers 1``
  and ``--workers 2``, then ``npu-dsv3 convert mcore2hf`` of that checkpoint back
  to HF, for both output formats: the legacy per-rank files (``--save-format
  torch``, which repeat weights over ranks) and ``--save-format torch_dist``
  (megatron's dist_checkpointing, each tensor once). Each is a subprocess started
  exactly as users start it (the ``npu-dsv3`` console script, ``--no-progress``),
  under ``/usr/bin/time -v``.
- A plain copy of each conversion's INPUT directory on the same disk, with the
  converter's durability semantics: every file is written to a temp name,
  fsync'ed, renamed, and its directory fsync'ed (``npu_dsv3.checkpoint.io.atomic_write``
  does exactly this for every output file). It runs as a fresh Python
  subprocess, like the converter.

Before every timed step ``sync`` flushes dirty pages, so no step pays for the
previous one's writeback. Inputs are in the page cache for the converter and for
the copy alike (the machine has far more RAM than the data), so both read from
memory and the comparison is about the write side and the CPU work.

Throughput = bytes of the step's input directory / wall seconds of the subprocess
(what a user waits for, Python start-up and imports included), and the same
bytes over the converter's own "in X s" figure (start-up excluded: the rate
that governs a 1.3 TB job). The copy's start-up is a bare interpreter (~0.05 s).
Every timed step is run ``--repeat`` times (copies once more): best time.

Peak memory: ``Maximum resident set size`` from GNU time (``ru_maxrss``: the
largest single process, i.e. with ``--workers N`` the largest of the main process
and its workers), plus a 20 ms sampler of ``/proc/<pid>/status`` over the whole
process tree that gives the peak of the SUM over processes, total and anonymous
(``RssAnon``: heap, what the kernel cannot drop; ``RssFile`` is memory-mapped
checkpoint pages, reclaimable page cache). Pages forked workers still share with
their parent count once per process in that sum (an upper bound). The sampler
costs CPU, so with ``--repeat`` >= 2 only the first run of a step is sampled and
the reported time is the best run; memory is the worst run.

Targets (``target <name>: <value> (<bound>) PASS|MISS``): conversion throughput
>= 0.7 x copy throughput at the largest scale, wall and in-process, in-process both
per byte READ and per byte WRITTEN (legacy hf2mcore writes 2.3 x what it reads: the legacy
layout repeats weights over ranks, so per byte read it cannot reach copy speed; torch_dist
writes about what it reads);
peak RSS (ru_maxrss) flat from 1x to 4x (growth <= one largest tensor). The diagnostics
after the table say how many bytes each conversion writes per byte it reads (the
training layout repeats weights over ranks) and what part is start-up; with
``--profile`` a cProfile breakdown of both conversions follows. Each timed step also records the CPU time other processes used meanwhile
(a shared 2-core machine), flagged when it exceeds 0.25 cores.

``--json FILE`` writes every number; the 671B projection at the end is computed
from the measured rates and memory fit and is labelled PROJECTION.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from machine import OtherLoad, cpu_model, usable_cores

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

MIB = 1 << 20
GB = 1e9
THROUGHPUT_BOUND = 0.7
LOAD_LIMIT = 0.25  # cores of foreign work above which a timed step is flagged
SHARD_BYTES = 128 * MIB

# The synthetic model: DeepSeek-V3's architecture at hidden 1024. Released
# DeepSeek-V3: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope/rope/v
# 128/64/128, 256 experts of ffn 2048, dense ffn 18432, vocab 129280.
MODEL = dict(
    vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=384,
    kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    num_nextn_predict_layers=1, tie_word_embeddings=False, max_position_embeddings=4096,
)
SCALES = {1: 4, 2: 12, 4: 24}  # model-size multiple -> decoder layers (MTP layer extra)
QUICK_LAYERS = 2
LAYOUT = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
          "--target-expert-parallel-size", "4", "--moe-grouped-gemm"]
SOURCE_LAYOUT = [flag.replace("--target-", "--source-") for flag in LAYOUT]
# Output formats and the hf2mcore flags that select them: legacy per-rank files (`--save-format torch`,
# the default) and megatron's dist_checkpointing format, which stores each tensor once.
FORMATS = {"legacy": [], "torch_dist": ["--save-format", "torch_dist"]}


# --------------------------------------------------------------------------- machine


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / MIB
    except OSError:
        pass
    return float("nan")


def disk_of(path: str) -> str:
    """``device fstype`` of the mount holding ``path`` (longest mount-point prefix)."""
    path = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}, mounted on {best[0]})"


def machine_info(workdir: str) -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": usable_cores(), "mem_gib": round(mem_total_gib(), 1),
            "disk": disk_of(workdir), "python": platform.python_version(), "torch": torch.__version__}


# --------------------------------------------------------------------------- synthetic checkpoint


def hf_config(num_layers: int):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(num_hidden_layers=num_layers, **MODEL)
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def tensor_specs(c) -> list:
    """``(HF name, shape, dtype)`` of every tensor of a DeepSeek-V3 checkpoint, MTP layers included,
    named as the released checkpoint (experts per expert). ``c``: an HF config (object or dict)."""
    g = (lambda k: c[k]) if isinstance(c, dict) else (lambda k: getattr(c, k))
    h, v = g("hidden_size"), g("vocab_size")
    heads, nope, rope, vdim = g("num_attention_heads"), g("qk_nope_head_dim"), g("qk_rope_head_dim"), g("v_head_dim")
    ql, kvl, experts = g("q_lora_rank"), g("kv_lora_rank"), g("n_routed_experts")
    moe_f, dense_f = g("moe_intermediate_size"), g("intermediate_size")
    shared_f = g("n_shared_experts") * moe_f
    layers, mtp = g("num_hidden_layers"), g("num_nextn_predict_layers") or 0
    bf16, fp32 = "bf16", "fp32"

    def mlp(prefix, f):
        return [(prefix + "gate_proj.weight", (f, h), bf16), (prefix + "up_proj.weight", (f, h), bf16),
                (prefix + "down_proj.weight", (h, f), bf16)]

    def layer(i):
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", (h,), bf16)]
        if ql:
            out += [(p + "self_attn.q_a_proj.weight", (ql, h), bf16), (p + "self_attn.q_a_layernorm.weight", (ql,), bf16),
                    (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), ql), bf16)]
        else:
            out.append((p + "self_attn.q_proj.weight", (heads * (nope + rope), h), bf16))
        out += [(p + "self_attn.kv_a_proj_with_mqa.weight", (kvl + rope, h), bf16),
                (p + "self_attn.kv_a_layernorm.weight", (kvl,), bf16),
                (p + "self_attn.kv_b_proj.weight", (heads * (nope + vdim), kvl), bf16),
                (p + "self_attn.o_proj.weight", (h, heads * vdim), bf16),
                (p + "post_attention_layernorm.weight", (h,), bf16)]
        if i < g("first_k_dense_replace"):
            return out + mlp(p + "mlp.", dense_f)
        out += [(p + "mlp.gate.weight", (experts, h), bf16), (p + "mlp.gate.e_score_correction_bias", (experts,), fp32)]
        out += mlp(p + "mlp.shared_experts.", shared_f)
        for e in range(experts):
            out += mlp(f"{p}mlp.experts.{e}.", moe_f)
        return out

    specs = [("model.embed_tokens.weight", (v, h), bf16)]
    for i in range(layers):
        specs += layer(i)
    specs += [("model.norm.weight", (h,), bf16), ("lm_head.weight", (v, h), bf16)]
    for d in range(mtp):
        p = f"model.layers.{layers + d}."
        specs += [(p + "embed_tokens.weight", (v, h), bf16), (p + "enorm.weight", (h,), bf16),
                  (p + "hnorm.weight", (h,), bf16), (p + "eh_proj.weight", (h, 2 * h), bf16)]
        specs += layer(layers + d)
        specs += [(p + "shared_head.norm.weight", (h,), bf16), (p + "shared_head.head.weight", (v, h), bf16)]
    return specs


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * (4 if dtype == "fp32" else 2)


def write_hf_checkpoint(path: str, num_layers: int, seed: int = 0) -> dict:
    """A random bf16 checkpoint of ``num_layers`` (+ MTP), ~SHARD_BYTES shards, index, config.json.

    Values come from one random pool (sliced at random offsets, then cloned), so
    writing 1 GB costs a memcpy rather than 500M Gaussian draws; norms are around 1,
    the expert bias is fp32 and non-zero. The MTP copies of the embedding and head
    are clones of the main tensors (the converter refuses copies that differ).
    """
    import torch
    from safetensors.torch import save_file

    from npu_dsv3.checkpoint.io import pack_shards

    os.makedirs(path, exist_ok=True)
    config = hf_config(num_layers)
    config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    gen = torch.Generator().manual_seed(seed)
    specs = tensor_specs(config)
    largest = max(nbytes(s, t) // 2 for _, s, t in specs)
    pool = (0.02 * torch.randn(largest + (1 << 20), generator=gen)).to(torch.bfloat16)
    main = {}

    def make(name, shape, dtype):
        numel = nbytes(shape, dtype) // (4 if dtype == "fp32" else 2)
        if name.endswith("embed_tokens.weight") and name != "model.embed_tokens.weight":
            tensor = main["model.embed_tokens.weight"].clone()
        elif name.endswith("shared_head.head.weight"):
            tensor = main["lm_head.weight"].clone()
        elif dtype == "fp32":
            tensor = 0.2 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # norms
            tensor = (1.0 + 0.3 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        else:
            start = int(torch.randint(0, pool.numel() - numel + 1, (1,), generator=gen))
            tensor = pool[start:start + numel].view(shape).clone()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            main[name] = tensor
        return tensor

    by_name = {name: (shape, dtype) for name, shape, dtype in specs}
    # The converter's own packing rule (HF's): consecutive tensors, at most SHARD_BYTES per shard.
    shards = pack_shards(((name, nbytes(shape, dtype)) for name, shape, dtype in specs), SHARD_BYTES)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: make(name, *by_name[name]) for name in names}, os.path.join(path, file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    total = sum(nbytes(shape, dtype) for _, shape, dtype in specs)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return {"layers": num_layers, "tensor_bytes": total, "shards": len(shards), "tensors": len(specs),
            "largest_tensor_bytes": max(nbytes(s, t) for _, s, t in specs), "dir_bytes": dir_bytes(path)}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def largest_file(path: str) -> int:
    return max(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


# --------------------------------------------------------------------------- measuring a subprocess

# The copy baseline, run as `python -c COPY_SCRIPT SRC DST`: the converter's atomic_write
# semantics per file (temp name, fsync, rename, fsync of the directory).
COPY_SCRIPT = r"""
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
def fsync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
for root, dirs, names in os.walk(src):
    out = os.path.join(dst, os.path.relpath(root, src))
    os.makedirs(out, exist_ok=True)
    for name in sorted(names):
        tmp = os.path.join(out, "." + name + ".tmp")
        shutil.copyfile(os.path.join(root, name), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out, name))
        fsync_dir(out)
"""


def _children_map() -> dict:
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _rss_kib(pid: int):
    """(anon, file + shmem) resident KiB of ``pid`` from /proc/<pid>/status (cheap: ~20 us)."""
    anon = file_ = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:") or line.startswith("RssShmem:"):
                    file_ += int(line.split()[1])
    except OSError:
        pass
    return anon, file_


class TreeSampler(threading.Thread):
    """Peak over time of the SUM of RSS (anon, file) over a process and all its descendants.

    /proc/<pid>/status, not smaps_rollup: PSS would split the pages forked workers share with their
    parent, but reading smaps_rollup of a 1 GiB process takes ~20 ms of CPU, which on a 2-core machine
    slows the measured converter. So with --workers the sum counts the shared (copy-on-write) pages once
    per process: an upper bound."""

    def __init__(self, root_pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.peak_total = self.peak_anon = 0
        self.max_procs = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            children = _children_map()
            pids, todo = [], [self.root]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += children.get(pid, [])
            anon = file_ = 0
            for pid in pids:
                a, f = _rss_kib(pid)
                anon, file_ = anon + a, file_ + f
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_total = max(self.peak_total, anon + file_)
            self.max_procs = max(self.max_procs, len(pids))
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join()


def _time_v(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    out["maxrss_kib"] = int(m.group(1)) if m else None
    m = re.search(r"Percent of CPU this job got: (\d+)%", text)
    out["cpu_percent"] = int(m.group(1)) if m else None
    m = re.search(r"Exit status: (\d+)", text)
    out["exit"] = int(m.group(1)) if m else None
    return out


def wait_idle(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < LOAD_LIMIT cores over 1 s; seconds waited."""
    start = time.perf_counter()
    while max_wait > 0:
        probe = OtherLoad()
        time.sleep(1.0)
        if probe.cores() < LOAD_LIMIT or time.perf_counter() - start >= max_wait:
            break
    return time.perf_counter() - start


WAIT_IDLE = [10.0]  # set from --wait-idle


def measure(cmd: list, workdir: str, label: str, sample: bool = True, env=None) -> dict:
    """Run ``cmd`` under GNU time (and the tree sampler if ``sample``); wall seconds, memory, foreign load."""
    wait_idle(WAIT_IDLE[0])
    os.sync()  # nobody pays for the previous step's writeback
    time_file = os.path.join(workdir, f".time-{label}.txt")
    load = OtherLoad()
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", time_file, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    if sample:
        sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if sample:
        sampler.stop()
    other = load.cores()
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed ({proc.returncode}):\n{' '.join(cmd)}\n{out}\n{err}")
    result = {"wall_s": wall, "other_cores": other, **_time_v(time_file), "sampled": sample}
    if sample:
        result.update(tree_peak_total_kib=sampler.peak_total, tree_peak_anon_kib=sampler.peak_anon,
                      processes=sampler.max_procs - 1)  # minus GNU time itself
    m = re.search(r" in ([0-9.]+) s", err)
    result["inproc_s"] = float(m.group(1)) if m else None
    os.remove(time_file)
    return result


def npu_dsv3_command() -> list:
    exe = shutil.which("npu-dsv3")
    if exe is None:
        raise SystemExit("the npu-dsv3 console script is not on PATH: pip install -e . first")
    return [exe]


# --------------------------------------------------------------------------- one scale


def best_of(repeat: int, run_once) -> dict:
    """``run_once(i)`` ``repeat`` times: the run with the least wall time (other processes only ever add
    time), with the memory peaks of the worst run (memory is not helped by luck)."""
    runs = [run_once(i) for i in range(repeat)]
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    for key in ("maxrss_kib", "tree_peak_total_kib", "tree_peak_anon_kib", "processes"):
        best[key] = max(r[key] for r in runs if key in r)
    best["walls"] = [round(r["wall_s"], 2) for r in runs]
    return best


def copy_baseline(src: str, root: str, label: str, repeat: int) -> dict:
    """The fsync'ed copy of ``src``, best of ``repeat`` + 1 (cheap, and the disk's rate varies most)."""
    def once(i):
        dst = os.path.join(root, f"copy-{label}-{i}")
        r = measure([sys.executable, "-c", COPY_SCRIPT, src, dst], root, f"copy-{label}", sample=i == 0)
        r["input_bytes"] = r["output_bytes"] = dir_bytes(src)
        if dir_bytes(dst) != r["input_bytes"]:
            raise RuntimeError(f"the copy baseline {dst} is incomplete")
        shutil.rmtree(dst)
        return r

    return best_of(repeat + 1, once)


def to_mcore(fmt: str, hf: str, out: str, workers: int, root: str, sample: bool) -> dict:
    """One ``hf2mcore`` run in format ``fmt`` into ``out``."""
    r = measure([*npu_dsv3_command(), "convert", "hf2mcore", "--load-dir", hf, "--save-dir", out, *LAYOUT,
                 *FORMATS[fmt], "--workers", str(workers), "--no-progress"], root, f"hf2mcore-{fmt}-w{workers}",
                sample=sample)
    release = os.path.join(out, "release")
    r.update(input_bytes=dir_bytes(hf), output_bytes=dir_bytes(out), largest_output_file=largest_file(release),
             output_files=sum(len(names) for _, _, names in os.walk(release)))
    return r


def to_hf(fmt: str, mcore: str, back: str, root: str, sample: bool) -> dict:
    """One ``mcore2hf`` run from the ``fmt`` checkpoint ``mcore`` into ``back`` (a torch_dist checkpoint
    carries its layout: no --source-* flags)."""
    shutil.rmtree(back, ignore_errors=True)
    r = measure([*npu_dsv3_command(), "convert", "mcore2hf", "--load-dir", mcore, "--save-dir", back,
                 *(SOURCE_LAYOUT if fmt == "legacy" else ()), "--no-progress"], root, f"mcore2hf-{fmt}",
                sample=sample)
    r.update(input_bytes=dir_bytes(mcore), output_bytes=dir_bytes(back))
    return r


def check_round_trip(hf: str, back: str) -> None:
    """The way back has every tensor and the same tensor bytes (the tests check bit-exactness)."""
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        a = json.load(f)
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        b = json.load(f)
    if set(a["weight_map"]) != set(b["weight_map"]) or a["metadata"]["total_size"] != b["metadata"]["total_size"]:
        raise RuntimeError(f"mcore2hf output {back} does not hold the tensors of {hf}")


def run_format(fmt: str, hf: str, hf_copy: dict, root: str, layers: int, repeat: int, keep: bool):
    """hf2mcore with --workers 1 and 2, then mcore2hf of the --workers 1 output: the steps and that output."""
    steps, mcore = {}, os.path.join(root, f"{fmt}-{layers}L")
    for workers in (1, 2):
        def once(i, workers=workers):
            out = os.path.join(root, f"{fmt}-w{workers}-{layers}L-{i}")
            r = to_mcore(fmt, hf, out, workers, root, sample=i == 0)
            if workers == 1 and not os.path.exists(mcore):
                os.replace(out, mcore)  # the input of mcore2hf
            else:
                shutil.rmtree(out)
            return r

        steps[f"{fmt} hf2mcore --workers {workers}"] = {**best_of(repeat, once), "copy": hf_copy}
    mcore_copy = copy_baseline(mcore, root, f"{fmt}-{layers}L", repeat)
    back = os.path.join(root, f"hf-back-{fmt}-{layers}L")
    steps[f"{fmt} mcore2hf"] = {**best_of(repeat, lambda i: to_hf(fmt, mcore, back, root, sample=i == 0)),
                                "copy": mcore_copy}
    check_round_trip(hf, back)
    if not keep:
        shutil.rmtree(back)
    return steps, mcore


def run_scale(scale, layers: int, root: str, keep: bool, repeat: int) -> dict:
    hf = os.path.join(root, f"hf-{layers}L")
    t0 = time.perf_counter()
    info = write_hf_checkpoint(hf, layers)
    info["scale"] = scale
    info["generate_s"] = time.perf_counter() - t0
    hf_copy = copy_baseline(hf, root, f"hf-{layers}L", repeat)
    info["steps"], info["paths"] = {}, {"hf": hf}
    for fmt in FORMATS:
        steps, info["paths"][fmt] = run_format(fmt, hf, hf_copy, root, layers, repeat, keep)
        info["steps"].update(steps)
    return info


def startup(root: str, repeat: int) -> dict:
    """The fixed cost of every run: ``npu-dsv3 convert hf2mcore --help`` (interpreter, torch, megatron-core
    and npu_dsv3 imported, nothing converted)."""
    return best_of(repeat, lambda i: measure([*npu_dsv3_command(), "convert", "hf2mcore", "--help"], root, "startup",
                                             sample=i == 0))


# --------------------------------------------------------------------------- report


def rate(r, what: str = "input_bytes") -> float:
    return r[what] / r["wall_s"] / GB


def inproc_ratio(r, what: str) -> float:
    """Converter bytes (``what``: read or written) per in-process second over the copy's bytes per second."""
    return r[what] / r["inproc_s"] / GB / rate(r["copy"]) if r["inproc_s"] else float("nan")


def print_table(results: list) -> list:
    rows = []
    header = ("| scale | model MB | step | in MB | out MB | wall s | in-proc s | GB/s (in) | copy GB/s | conv/copy "
              "| in-proc in/copy | in-proc out/copy | maxrss MiB | tree anon MiB | tree RSS MiB | other load |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for res in results:
        for step, r in res["steps"].items():
            c = r["copy"]
            other = max(r["other_cores"], c["other_cores"])
            row = (f"| {res['scale']}x ({res['layers']}L) | {res['dir_bytes'] / 1e6:.0f} | {step} | "
                   f"{r['input_bytes'] / 1e6:.0f} | {r['output_bytes'] / 1e6:.0f} | {r['wall_s']:.2f} | "
                   f"{r['inproc_s'] if r['inproc_s'] is not None else float('nan'):.2f} | {rate(r):.3f} | "
                   f"{rate(c):.3f} | {rate(r) / rate(c):.2f} | {inproc_ratio(r, 'input_bytes'):.2f} | "
                   f"{inproc_ratio(r, 'output_bytes'):.2f} | {r['maxrss_kib'] / 1024:.0f} | "
                   f"{r['tree_peak_anon_kib'] / 1024:.0f} | {r['tree_peak_total_kib'] / 1024:.0f} | "
                   f"{other:.2f}{' !' if other > LOAD_LIMIT else ''} |")
            print(row)
            rows.append(row)
    return [header] + rows


def diagnostics(results: list, boot: dict) -> list:
    """Where the time goes, from the measurements: start-up, bytes written vs read, rate per byte written."""
    lines = [f"start-up (npu-dsv3 convert hf2mcore --help: interpreter + torch + megatron-core + npu_dsv3 imports): "
             f"{boot['wall_s']:.1f} s wall, maxrss {boot['maxrss_kib'] / 1024:.0f} MiB"]
    big = results[-1]
    for step, r in big["steps"].items():
        c = r["copy"]
        startup_s = r["wall_s"] - r["inproc_s"] if r["inproc_s"] is not None else float("nan")
        written = rate(r, "output_bytes") / rate(c)
        inproc_w = r["output_bytes"] / r["inproc_s"] / GB / rate(c) if r["inproc_s"] else float("nan")
        lines.append(f"{big['scale']}x {step}: writes {r['output_bytes'] / r['input_bytes']:.2f} x the bytes it reads "
                     f"(a copy writes 1.00 x); start-up (wall - in-process) {startup_s:.1f} s of {r['wall_s']:.1f} s; "
                     f"per byte WRITTEN: {written:.2f} x copy (wall), {inproc_w:.2f} x copy (in-process)")
        if r["output_bytes"] > r["input_bytes"]:
            lines.append(f"  -> even at copy speed per byte written, {step} reaches at most "
                         f"{r['input_bytes'] / r['output_bytes']:.2f} x copy in input bytes/s")
    return lines


def target_lines(results: list, boot: dict) -> list:
    lines = []
    big = results[-1]
    largest = big["largest_tensor_bytes"]
    for step in big["steps"]:
        r = big["steps"][step]
        ratio = rate(r) / rate(r["copy"])
        lines.append(f"target {step} throughput at {big['scale']}x (wall, incl. start-up): {ratio:.2f} x copy "
                     f"(>= {THROUGHPUT_BOUND}) {'PASS' if ratio >= THROUGHPUT_BOUND else 'MISS'}")
    for what, label in (("input_bytes", "per byte read"), ("output_bytes", "per byte written")):
        for step in big["steps"]:
            ratio = inproc_ratio(big["steps"][step], what)
            lines.append(f"target {step} throughput {label} at {big['scale']}x (in-process, start-up excluded): "
                         f"{ratio:.2f} x copy (>= {THROUGHPUT_BOUND}) {'PASS' if ratio >= THROUGHPUT_BOUND else 'MISS'}")
    if len(results) > 1:
        for step in big["steps"]:
            lo, hi = results[0]["steps"][step], big["steps"][step]
            growth = (hi["maxrss_kib"] - lo["maxrss_kib"]) * 1024
            anon = (hi["tree_peak_anon_kib"] - lo["tree_peak_anon_kib"]) * 1024
            lines.append(f"target {step} peak RSS flat {results[0]['scale']}x->{big['scale']}x: "
                         f"{lo['maxrss_kib'] / 1024:.0f} -> {hi['maxrss_kib'] / 1024:.0f} MiB = +{growth / MIB:.0f} MiB "
                         f"(tree anon +{anon / MIB:.0f} MiB) for +{(big['dir_bytes'] - results[0]['dir_bytes']) / MIB:.0f}"
                         f" MiB of model (<= +{largest / MIB:.0f} MiB = 1 largest tensor) "
                         f"{'PASS' if growth <= largest else 'MISS'}; at {big['scale']}x "
                         f"{(hi['maxrss_kib'] * 1024 - boot['maxrss_kib'] * 1024) / largest:.1f} x the largest "
                         f"tensor above start-up ({boot['maxrss_kib'] * 1024 / MIB:.0f} MiB)")
    else:
        for step in big["steps"]:
            lines.append(f"target {step} peak RSS flat: needs several scales (run without --quick) SKIP")
    return lines


# --------------------------------------------------------------------------- 671B projection


def real_rank_file_bytes(flags: dict) -> dict:
    """Bytes of every rank file the converter would write for the released DeepSeek-V3 in ``flags``'
    layout: the converter's own mapping run on meta tensors (no memory, no data)."""
    import torch

    from npu_dsv3.checkpoint.sources import model_config
    from npu_dsv3.checkpoint.rank_state import chunk_state_dict
    from npu_dsv3.layout import ParallelLayout

    # The released DeepSeek-V3 config.json, as the tests keep it.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures",
                        "deepseek_v3_config.json")
    with open(path) as f:
        hf = json.load(f)
    specs = {n: (s, t) for n, s, t in tensor_specs(hf)}
    config = model_config(hf, flags.get("moe_grouped_gemm", True))
    par = ParallelLayout.from_flags(config, **flags)

    def get(name):
        shape, dtype = specs[name]
        return torch.empty(shape, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, device="meta")

    sizes = {}
    for ranks in par.ranks():
        total = 0
        for chunk in range(par.pipeline.num_chunks):
            for t in chunk_state_dict(config, par, get, *ranks, chunk).values():
                total += t.numel() * t.element_size()
        sizes[ranks] = total
    largest = max(nbytes(s, t) for s, t in specs.values())
    tensor_bytes = sum(nbytes(s, t) for s, t in specs.values())
    # torch_dist stores each tensor once: the model less the MTP layer's copies of the embedding and head
    # (megatron shares the main ones), plus the vocabulary padding to a multiple of 128 x TP.
    copies = sum(nbytes(*specs[n]) for n in specs if n.startswith(f"model.layers.{hf['num_hidden_layers']}.")
                 and n.endswith(("embed_tokens.weight", "shared_head.head.weight")))
    vocab, multiple = hf["vocab_size"], 128 * flags["tensor_model_parallel_size"]
    pad_rows = -vocab % multiple
    tables = 1 if hf.get("tie_word_embeddings") else 2
    return {"files": len(sizes), "largest": max(sizes.values()), "total": sum(sizes.values()),
            "tensor_bytes": tensor_bytes, "largest_tensor": largest,
            "dist_total": tensor_bytes - copies + tables * pad_rows * hf["hidden_size"] * 2}


def memory_line(step: str, small: dict, big: dict, boot: dict, real: dict) -> str:
    """Peak memory of ``step`` from the smallest to the largest scale, and its bound at 671B: ALL of the
    measured peak above start-up charged to tensors (k largest tensors), scaled to 671B's largest tensor."""
    lo, hi = small["steps"][step], big["steps"][step]
    largest, start_rss, start_anon = big["largest_tensor_bytes"], boot["maxrss_kib"] * 1024, \
        boot["tree_peak_anon_kib"] * 1024
    k = (hi["maxrss_kib"] * 1024 - start_rss) / largest
    k_anon = (hi["tree_peak_anon_kib"] * 1024 - start_anon) / largest
    flat = (hi["maxrss_kib"] - lo["maxrss_kib"]) * 1024 <= largest
    return (f"  {step} memory: peak RSS {lo['maxrss_kib'] / 1024:.0f} -> {hi['maxrss_kib'] / 1024:.0f} MiB and "
            f"anonymous {lo['tree_peak_anon_kib'] / 1024:.0f} -> {hi['tree_peak_anon_kib'] / 1024:.0f} MiB from "
            f"{small['scale']}x to {big['scale']}x (model {big['dir_bytes'] / small['dir_bytes']:.1f} x larger); at "
            f"{big['scale']}x start-up + {k:.1f} x largest tensor ({largest / MIB:.0f} MiB) in RSS, + {k_anon:.1f} x "
            f"in anonymous memory => at 671B per process <= "
            + (f"{(start_rss + k * real['largest_tensor']) / GB:.1f} GB RSS, " if flat else
               "? GB RSS (not flat: it grows with the model), ")
            + f"{(start_anon + k_anon * real['largest_tensor']) / GB:.1f} GB anonymous")


def projection(results: list, boot: dict) -> list:
    big = results[-1]
    steps = big["steps"]
    lines = ["PROJECTION (computed, not measured): DeepSeek-V3 671B from the rates and memory measured above"]
    try:
        flags = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=8, expert_model_parallel_size=32,
                     expert_tensor_parallel_size=1, num_layers=64, noop_layers="61,62,63", schedules_method="dualpipev",
                     moe_grouped_gemm=True)
        real = real_rank_file_bytes(flags)
    except Exception as e:  # the projection must not sink the measurement
        return lines + [f"  (the 671B layout could not be computed: {e})"]
    # In-process rates at the largest scale: start-up excluded, everything else the converter does included.
    written = {k: r["output_bytes"] / r["inproc_s"] / GB for k, r in steps.items()}
    read = {k: r["input_bytes"] / r["inproc_s"] / GB for k, r in steps.items()}
    per_worker = written["legacy hf2mcore --workers 2"] / 2
    copy_rate = rate(steps["legacy hf2mcore --workers 1"]["copy"])
    legacy, dist = real["total"], real["dist_total"]
    lines.append(f"  model: {real['tensor_bytes'] / 1e12:.2f} TB of BF16 tensors (MTP included; the FP8 release is "
                 f"~0.69 TB); largest tensor {real['largest_tensor'] / GB:.2f} GB (embedding / lm_head 129280 x 7168)")
    lines.append(f"  legacy, the A3 recipe layout TP2 PP8 EP32 dualpipev, noop 61,62,63 (sizes from the converter's "
                 f"own mapping on meta tensors): {real['files']} rank files, {legacy / 1e12:.2f} TB in all "
                 f"({legacy / real['tensor_bytes']:.2f} x the model: non-expert weights repeat in every EP rank, "
                 f"experts in both TP ranks with ETP 1), largest {real['largest'] / GB:.2f} GB")
    lines.append(f"  torch_dist (any layout with TP 2): each tensor once, {dist / 1e12:.2f} TB (the model less the "
                 f"MTP copies of embedding and head)")
    lines.append(f"  rates (in-process at {big['scale']}x, bytes written for hf2mcore, read for mcore2hf): legacy "
                 f"hf2mcore {per_worker:.3f} GB/s per single-threaded worker (--workers 2 on {usable_cores()} cores, "
                 f"/ 2); torch_dist hf2mcore {written['torch_dist hf2mcore --workers 1']:.3f} GB/s (--workers 1), "
                 f"{written['torch_dist hf2mcore --workers 2']:.3f} GB/s (--workers 2: threads of one process); "
                 f"mcore2hf legacy {read['legacy mcore2hf']:.3f}, torch_dist {read['torch_dist mcore2hf']:.3f} GB/s; "
                 f"fsync'ed copy {copy_rate:.2f} GB/s")
    cells = [f"{n} workers {legacy / (per_worker * GB * n) / 3600:.1f} h" for n in (1, 8, 16, 32, 64)]
    lines.append("  legacy hf2mcore, BF16 input: " + ", ".join(cells) + f" if the CPU is the limit; writing "
                 f"{legacy / 1e12:.2f} TB needs {legacy / copy_rate / GB / 3600:.1f} h at this disk's copy rate, so "
                 f"beyond ~{copy_rate / per_worker:.0f} workers the disk decides")
    best_dist = max(written["torch_dist hf2mcore --workers 1"], written["torch_dist hf2mcore --workers 2"])
    lines.append(f"  torch_dist hf2mcore, BF16 input, one process: {dist / (best_dist * GB) / 3600:.1f} h; at this "
                 f"disk's copy rate {dist / copy_rate / GB / 3600:.1f} h")
    lines.append("  hf2mcore, FP8 input: the same bytes are written; the dequantisation (not measured here) comes on top")
    lines.append(f"  mcore2hf (one process): legacy reads {legacy / 1e12:.2f} TB = "
                 f"{legacy / (read['legacy mcore2hf'] * GB) / 3600:.1f} h; torch_dist reads {dist / 1e12:.2f} TB = "
                 f"{dist / (read['torch_dist mcore2hf'] * GB) / 3600:.1f} h")
    if len(results) > 1:
        for step in ("legacy hf2mcore --workers 1", "legacy mcore2hf", "torch_dist hf2mcore --workers 1",
                     "torch_dist hf2mcore --workers 2", "torch_dist mcore2hf"):
            lines.append(memory_line(step, results[0], big, boot, real))
    return lines


# --------------------------------------------------------------------------- profile


PROFILE_KEYS = [
    ("torch.save of the skeleton (skip_data)", "serialization.py", "save"),
    ("torch.load (rank-file pickles, meta tensors)", "serialization.py", "load"),
    ("streamed rank files (save_torch_streamed)", "writers.py", "save_torch_streamed"),
    ("streamed safetensors (save_safetensors_streamed)", "writers.py", "save_safetensors_streamed"),
    ("rank plan (meta pass: chunk_state_dict on shapes)", "mcore_legacy.py", "rank_plan"),
    ("torch_dist plan (meta model, sharded_state_dict)", "mcore_dist.py", "plan_pieces"),
    ("DCP write_data (the .distcp files)", "mcore_dist.py", "write_data"),
    ("DCP _write_item (one torch.save per tensor)", "filesystem.py", "_write_item"),
    ("DCP collectives on one process (pickled plans)", "distributed_c10d.py", "gather_object"),
    ("os.pwrite", "~", "<built-in method posix.pwrite>"),
    ("file write", "~", "<method 'write' of '_io.BufferedWriter' objects>"),
    ("zlib.crc32 (zip CRCs and manifest digest)", "~", "<built-in method zlib.crc32>"),
    ("torch.cat", "~", "<built-in method torch.cat>"),
    ("contiguous (transposing copies)", "~", "<method 'contiguous' of 'torch._C.TensorBase' objects>"),
    ("os.fsync", "~", "<built-in method posix.fsync>"),
    ("HF tensor read (pread)", "sources.py", "get"),
    ("rank-file tensor read (pread)", "mcore_legacy.py", "_read_tensor"),
    ("torch_dist tensor read (one DCP load each)", "mcore_dist.py", "get"),
    ("MTP copy check (torch.equal)", "sources.py", "check_mtp_copies"),
    ("conversion total (convert_*)", "mcore_legacy.py", "convert_hf_to_legacy"),
    ("conversion total (convert_*)", "mcore_legacy.py", "convert_legacy_to_hf"),
    ("conversion total (convert_*)", "mcore_dist.py", "convert_to_dist"),
    ("conversion total (convert_*)", "mcore_dist.py", "convert_dist_to_hf"),
]
# cProfile sees one thread: torch_dist's writer pool runs in the calling thread under it.
PROFILE_SCRIPT = r"""
import concurrent.futures, sys
class Inline:
    def __init__(self, max_workers=1):
        pass
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def map(self, fn, items):
        return list(map(fn, items))
concurrent.futures.ThreadPoolExecutor = Inline
from npu_dsv3.cli import main
sys.exit(main(sys.argv[1:]))
"""


def profile(res: dict, root: str) -> list:
    """cProfile of both conversions (one process: --workers 1) on the scale ``res``; cumulative times."""
    import pstats

    lines = []
    hf, legacy, dist = (res["paths"][k] for k in ("hf", "legacy", "torch_dist"))
    to_mcore_args = ["hf2mcore", "--load-dir", hf, "--save-dir", os.path.join(root, "prof-mcore"), *LAYOUT]
    to_hf_args = ["mcore2hf", "--save-dir", os.path.join(root, "prof-hf")]
    jobs = [("legacy hf2mcore", to_mcore_args), ("legacy mcore2hf", [*to_hf_args, "--load-dir", legacy, *SOURCE_LAYOUT]),
            ("torch_dist hf2mcore", [*to_mcore_args, *FORMATS["torch_dist"]]),
            ("torch_dist mcore2hf", [*to_hf_args, "--load-dir", dist])]
    script = os.path.join(root, "profiled.py")
    with open(script, "w") as f:
        f.write(PROFILE_SCRIPT)
    for name, args in jobs:
        out = os.path.join(root, f"{name.replace(' ', '-')}.prof")
        os.sync()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cProfile", "-o", out, script, "convert", *args, "--no-progress"],
                       check=True, capture_output=True)
        wall = time.perf_counter() - start
        stats = pstats.Stats(out)
        lines.append(f"profile {name} at {res['scale']}x ({res['dir_bytes'] / 1e6:.0f} MB), wall {wall:.1f} s "
                     "under cProfile (cumulative s per part):")
        seen = set()
        for label, file_part, func in PROFILE_KEYS:
            total = sum(v[3] for (f, _, fn), v in stats.stats.items() if fn == func and f.endswith(file_part)
                        or (file_part == "~" and fn == func))
            if total > 0 and (label, total) not in seen:
                seen.add((label, total))
                lines.append(f"  {label:<48} {total:7.2f} s")
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]
        lines.append("  top self time: " + "; ".join(f"{fn} ({os.path.basename(f)}) {v[2]:.2f} s"
                                                    for (f, _, fn), v in top))
        for p in ("prof-mcore", "prof-hf"):
            shutil.rmtree(os.path.join(root, p), ignore_errors=True)
    # What-if runs: the SAME converter, with one cost switched off by a wrapper (the converter is not edited),
    # to size the fixes the profile suggests. Each prints the converter's in-process seconds.
    w1 = res["steps"]["legacy hf2mcore --workers 1"]
    lines.append(f"what-if legacy hf2mcore at {res['scale']}x (wrapper switches one cost off; converter unchanged; "
                 f"in-process s, one run each; the table's best --workers 1 run: {w1['inproc_s']:.1f} s):")
    for mode, extra in WHATIF_MODES:
        out = os.path.join(root, "whatif-mcore")
        r = measure([sys.executable, "-c", WHATIF_SCRIPT, mode, "convert", "hf2mcore", "--load-dir", hf, "--save-dir",
                     out, *LAYOUT, *extra, "--no-progress"], root, "whatif", sample=False)
        shutil.rmtree(out, ignore_errors=True)
        lines.append(f"  {mode + ' ' + ' '.join(extra):<32} {r['inproc_s']:6.1f} s (other load {r['other_cores']:.2f})")
    return lines


WHATIF_MODES = [("as-is", ()), ("torch-threads-2", ()), ("no-crc32", ()), ("as-is", ("--workers", "2"))]
# argv: MODE, then the npu-dsv3 arguments. torch-threads-2 undoes the converter's one-thread setting;
# no-crc32 replaces zlib.crc32 in the writers by a no-op (zip CRCs and digests then wrong: timing only).
WHATIF_SCRIPT = r"""
import sys
mode = sys.argv[1]
import torch
import npu_dsv3.checkpoint.io as io
import npu_dsv3.checkpoint.writers as writers
if mode == "torch-threads-2":
    import contextlib
    io.single_threaded_torch = contextlib.nullcontext
    torch.set_num_threads(2)
if mode == "no-crc32":
    class NoCrc:
        crc32 = staticmethod(lambda data, crc=0: crc)
    writers.zlib = NoCrc
from npu_dsv3.cli import main
sys.exit(main(sys.argv[2:]))
"""


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"1x only, {QUICK_LAYERS} layers (smoke run)")
    parser.add_argument("--profile", action="store_true", help="cProfile both conversions at the largest scale")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", default=None, help="write every measured number to this file")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="runs per timed step, best time / worst memory reported (default 2; 1 with --quick)")
    parser.add_argument("--wait-idle", type=float, default=None, metavar="S",
                        help="before each timed step wait up to S s for other processes to go idle "
                             "(default 5; 0 with --quick: never wait)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 2)
    WAIT_IDLE[0] = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 5.0)

    if not os.path.exists("/usr/bin/time"):
        raise SystemExit("GNU time is needed for peak RSS: apt-get install -y time")
    root = tempfile.mkdtemp(prefix="npu_dsv3-convert-bench-", dir=args.workdir)
    machine = machine_info(root)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB RAM, disk {machine['disk']}; "
          f"python {machine['python']}, torch {machine['torch']}")
    print(f"model: DeepSeek-V3 architecture, hidden {MODEL['hidden_size']}, {MODEL['n_routed_experts']} experts x "
          f"ffn {MODEL['moe_intermediate_size']}, vocab {MODEL['vocab_size']}, MTP 1, random bf16; layout "
          f"{' '.join(LAYOUT)}; each step best of {args.repeat or (1 if args.quick else 2)}")
    scales = {1: QUICK_LAYERS} if args.quick else SCALES
    results = []
    started = time.perf_counter()
    try:
        boot = startup(root, repeat)
        for scale, layers in scales.items():
            res = run_scale(scale, layers, root, keep=args.keep or args.profile, repeat=repeat)
            print(f"# {scale}x: {layers} layers + MTP, {res['dir_bytes'] / 1e6:.0f} MB in {res['shards']} shards, "
                  f"largest tensor {res['largest_tensor_bytes'] / MIB:.0f} MiB (generated in {res['generate_s']:.1f} s)",
                  flush=True)
            results.append(res)
            if not args.keep and not (args.profile and scale == list(scales)[-1]):
                for path in res["paths"].values():
                    shutil.rmtree(path)
        print()
        table = print_table(results)
        print()
        diag = diagnostics(results, boot)
        for line in diag:
            print(line)
        print()
        targets = target_lines(results, boot)
        for line in targets:
            print(line)
        print()
        proj = projection(results, boot)
        for line in proj:
            print(line)
        prof = []
        if args.profile:
            print()
            prof = profile(results[-1], root)
            for line in prof:
                print(line)
        print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s; work dir {root}"
              + (" (kept)" if args.keep else " (removed)"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "repeat": repeat, "startup": boot, "results": results,
                           "targets": targets, "diagnostics": diag,
                           "projection": proj,
                           "profile": prof, "table": table}, f, indent=2, default=str)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
