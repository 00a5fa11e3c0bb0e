#!/usr/bin/env python
"""Benchmark ``npu-dsv3 convert fp8-to-bf16`` against an fsync'ed copy, and its dequantisation kernel.

    python benchmarks/fp8.py            # 0.5 GB and 1 GB of FP8 weights (~3 minutes on 2 cores)
    python benchmarks/fp8.py --quick    # 0.5 GB only, one run per step (< 1 minute)

What is measured, in ONE run:

- Kernel: ``dequantize_fp8_block`` on DeepSeek-V3 weight shapes, in GB/s of FP8
  read, against the implementation it replaced (torch's fp8 -> fp32 cast times the
  expanded scale, then bf16) and against the other table variant tried (an fp32
  table, scaled and cast per chunk). Every variant's output is checked bit for bit
  against the old one.
- Conversion, at two model sizes: a synthetic FP8 checkpoint shaped like
  DeepSeek-V3's release (hidden 7168: MLA projections, the 7168 x 16384 o_proj as
  largest tensor, kv_a_proj_with_mqa's 576 rows as ragged blocks, experts of
  2048 x 7168 and 7168 x 2048, bf16 norms and router, fp32 expert bias; random
  FP8 bytes without NaN, fp32 128 x 128 block scales) in shards of at most a
  quarter of the model, so the larger model also has 2x larger shards. ``npu-dsv3 convert fp8-to-bf16`` runs with
  ``--workers 1`` and ``2``, as users start it, under GNU time (benchmarks/convert.py's
  ``measure``: ``sync`` first, memory of the whole process tree sampled).
- Baselines: benchmarks/convert.py's fsync'ed copy (temp name, fsync, rename,
  fsync of the directory, as the converter writes) of the conversion's INPUT
  directory and of its OUTPUT directory. The converter reads N bytes and writes
  about 2N (bf16 is twice FP8), so it is compared per byte read with the input
  copy and per byte written with the output copy.

Throughput ratios use the converter's own "in X s" (start-up excluded: the rate
that governs a 640 GB job); wall-clock ratios are shown too. Peak RSS is GNU
time's maxrss (the largest single process), reported above the start-up RSS of
``npu-dsv3 convert fp8-to-bf16 --help`` in units of the largest tensor.

Targets: in-process throughput >= 0.7 x copy per byte read and per byte written
(--workers 1 and 2, larger size); maxrss growth from the smaller to the larger
model <= one largest tensor. The last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from convert import (COPY_SCRIPT, GB, LOAD_LIMIT, MIB, THROUGHPUT_BOUND, WAIT_IDLE, best_of, dir_bytes, machine_info,
                     measure, npu_dsv3_command)

HIDDEN = 7168
EXPERT_FFN = 2048
BLOCK = 128
SHARDS = 4
# Model size -> (decoder layers, routed experts per layer): ~0.54 GB and ~1.08 GB of FP8 weights.
SIZES = {1: (1, 8), 2: (2, 8)}
KERNEL_SHAPES = [(7168, 2048), (2048, 7168), (576, 7168), (7168, 16384)]


# --------------------------------------------------------------------------- synthetic FP8 checkpoint


def layer_specs(i: int, experts: int) -> list:
    """``(name, shape, kind)`` of one DeepSeek-V3 MoE layer; kind is fp8, bf16 or fp32."""
    p = f"model.layers.{i}."
    specs = [(p + "input_layernorm.weight", (HIDDEN,), "bf16"),
             (p + "self_attn.q_a_proj.weight", (1536, HIDDEN), "fp8"),
             (p + "self_attn.q_a_layernorm.weight", (1536,), "bf16"),
             (p + "self_attn.q_b_proj.weight", (128 * 192, 1536), "fp8"),
             (p + "self_attn.kv_a_proj_with_mqa.weight", (512 + 64, HIDDEN), "fp8"),  # 4.5 row blocks
             (p + "self_attn.kv_a_layernorm.weight", (512,), "bf16"),
             (p + "self_attn.kv_b_proj.weight", (128 * 256, 512), "fp8"),
             (p + "self_attn.o_proj.weight", (HIDDEN, 128 * 128), "fp8"),
             (p + "post_attention_layernorm.weight", (HIDDEN,), "bf16"),
             (p + "mlp.gate.weight", (256, HIDDEN), "bf16"),
             (p + "mlp.gate.e_score_correction_bias", (256,), "fp32")]
    for e in range(experts):
        q = f"{p}mlp.experts.{e}."
        specs += [(q + "gate_proj.weight", (EXPERT_FFN, HIDDEN), "fp8"),
                  (q + "up_proj.weight", (EXPERT_FFN, HIDDEN), "fp8"),
                  (q + "down_proj.weight", (HIDDEN, EXPERT_FFN), "fp8")]
    return specs


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_fp8_checkpoint(path: str, layers: int, experts: int, seed: int = 0) -> dict:
    """The FP8 release's layout: weights and their ``_scale_inv`` in shards of at most 1 / ``SHARDS`` of the
    model, index, config.

    FP8 bytes come from one random pool sliced at random offsets (writing 1 GB costs
    a memcpy, not a billion draws); 0x7f and 0xff (NaN) are replaced by +-448.
    """
    import torch
    from safetensors.torch import save_file

    from npu_dsv3.checkpoint.io import pack_shards

    gen = torch.Generator().manual_seed(seed)
    specs = [s for i in range(layers) for s in layer_specs(i, experts)]
    largest = max(numel(shape) for _, shape, kind in specs if kind == "fp8")
    pool = torch.randint(0, 256, (largest + (1 << 20),), dtype=torch.uint8, generator=gen)
    pool[(pool & 0x7F) == 0x7F] -= 1

    def tensors(name, shape, kind):
        if kind == "bf16":
            return {name: (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)}
        if kind == "fp32":
            return {name: 0.1 * torch.randn(shape, generator=gen)}
        start = int(torch.randint(0, pool.numel() - numel(shape) + 1, (1,), generator=gen))
        blocks = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
        scale = torch.rand(blocks, generator=gen) * 2.0 ** -8 + 2.0 ** -12
        return {name: pool[start:start + numel(shape)].clone().view(torch.float8_e4m3fn).view(shape),
                name + "_scale_inv": scale}

    made = {}
    for spec in specs:
        made.update(tensors(*spec))
    sizes = [(name, t.numel() * t.element_size()) for name, t in made.items()]
    total = sum(size for _, size in sizes)
    os.makedirs(path, exist_ok=True)
    weight_map = {}
    shards = pack_shards(sizes, -(-total // SHARDS))
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: made[name] for name in names}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "deepseek_v3", "hidden_size": HIDDEN, "torch_dtype": "bfloat16",
                   "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [BLOCK, BLOCK]}}, f, indent=2)
    fp8 = [numel(shape) for _, shape, kind in specs if kind == "fp8"]
    return {"layers": layers, "experts": experts, "fp8_bytes": sum(fp8), "largest_fp8_bytes": max(fp8),
            "largest_bf16_bytes": 2 * max(fp8), "shards": len(shards), "shard_bytes": max(
                os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values())), "dir_bytes": dir_bytes(path)}


# --------------------------------------------------------------------------- kernel


def old_dequantize(weight, scale_inv, block=BLOCK):
    """The implementation ``dequantize_fp8_block`` replaced: torch's fp8 -> fp32 cast, expanded scale."""
    import torch

    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    out = weight.float()
    out.mul_(scale)
    return out.to(torch.bfloat16)


def fp32_table_dequantize(weight, scale_inv, block=BLOCK, chunk_rows=8):
    """The other table variant tried: fp32 value of each byte gathered per chunk of rows, scaled in
    place by the band's expanded scale, cast to bf16 (three passes over the chunk instead of one gather)."""
    import torch

    rows, cols = weight.shape
    fp8_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    codes = weight.view(torch.uint8)
    index = torch.empty(chunk_rows, cols, dtype=torch.int64)
    values = torch.empty(chunk_rows, cols)
    for band, first in enumerate(range(0, rows, block)):
        scale = scale_inv[band].float().repeat_interleave(block)[:cols]
        for start in range(first, min(first + block, rows), chunk_rows):
            stop = min(start + chunk_rows, first + block, rows)
            n = stop - start
            index[:n].copy_(codes[start:stop])
            torch.index_select(fp8_values, 0, index[:n].view(-1), out=values[:n].view(-1))
            values[:n].mul_(scale)
            out[start:stop].copy_(values[:n])
    return out


def kernel_benchmark(repeat: int) -> list:
    """GB/s of FP8 read per variant and shape, best of ``repeat``; each output checked against the old one."""
    import torch

    from npu_dsv3.checkpoint.fp8 import dequantize_fp8_block

    gen = torch.Generator().manual_seed(1)
    rows = []
    before = torch.get_num_threads()
    for shape in KERNEL_SHAPES:
        codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        codes[(codes & 0x7F) == 0x7F] -= 1
        weight = codes.view(torch.float8_e4m3fn)
        scale = torch.rand((-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)), generator=gen) * 2.0 ** -8
        reused = torch.empty(shape, dtype=torch.bfloat16)
        variants = [("old: fp8->fp32 cast x expanded scale", 1, lambda: old_dequantize(weight, scale)),
                    ("fp32 table, scale, cast per chunk", 1, lambda: fp32_table_dequantize(weight, scale)),
                    ("bf16 table gather (new)", 1, lambda: dequantize_fp8_block(weight, scale)),
                    ("bf16 table gather, out= reused", 1, lambda: dequantize_fp8_block(weight, scale, out=reused)),
                    (f"bf16 table gather, out= reused, {before} threads", before,
                     lambda: dequantize_fp8_block(weight, scale, out=reused))]
        expected = old_dequantize(weight, scale).view(torch.int16)
        for label, threads, run in variants:
            torch.set_num_threads(threads)
            if not torch.equal(run().view(torch.int16), expected):
                raise RuntimeError(f"{label} is not bit-exact with the old implementation on {shape}")
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            rows.append({"shape": shape, "variant": label, "gb_s": numel(shape) / best / GB})
        torch.set_num_threads(before)
    return rows


def print_kernel(rows: list) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print("| dequantize variant, GB/s of FP8 | " + " | ".join(f"{r} x {c}" for r, c in KERNEL_SHAPES) + " |")
    print("|---|" + "---|" * len(KERNEL_SHAPES))
    for variant in variants:
        cells = [f"{r['gb_s']:.2f}" for r in rows if r["variant"] == variant]
        print(f"| {variant} | " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------- conversion


def copy_baseline(src: str, root: str, name: str, repeat: int) -> dict:
    def once(i):
        dst = os.path.join(root, f"copy-{name}-{i}")
        r = measure([sys.executable, "-c", COPY_SCRIPT, src, dst], root, f"copy-{name}", sample=i == 0)
        r["bytes"] = dir_bytes(src)
        if dir_bytes(dst) != r["bytes"]:
            raise RuntimeError(f"the copy baseline {dst} is incomplete")
        shutil.rmtree(dst)
        return r

    return best_of(repeat + 1, once)  # cheap, and the disk's rate varies most


def run_size(size: int, root: str, repeat: int) -> dict:
    layers, experts = SIZES[size]
    fp8_dir = os.path.join(root, f"fp8-{size}x")
    t0 = time.perf_counter()
    info = write_fp8_checkpoint(fp8_dir, layers, experts)
    info.update(size=size, generate_s=time.perf_counter() - t0, steps={})
    info["copy_in"] = copy_baseline(fp8_dir, root, "in", repeat)
    first_output = os.path.join(root, f"bf16-{size}x")  # the input of the output copy

    for workers in (1, 2):
        def once(i, workers=workers):
            out = first_output if (workers, i) == (1, 0) else os.path.join(root, "bf16-other")
            r = measure([*npu_dsv3_command(), "convert", "fp8-to-bf16", "--input-fp8-hf-path", fp8_dir,
                         "--output-bf16-hf-path", out, "--workers", str(workers), "--no-progress"], root,
                        f"fp8-w{workers}", sample=i == 0)
            r.update(input_bytes=dir_bytes(fp8_dir), output_bytes=dir_bytes(out))
            if out != first_output:
                shutil.rmtree(out)
            return r

        info["steps"][f"--workers {workers}"] = best_of(repeat, once)
    info["copy_out"] = copy_baseline(first_output, root, "out", repeat)
    shutil.rmtree(first_output)
    shutil.rmtree(fp8_dir)
    return info


def ratios(res: dict, r: dict) -> dict:
    """Converter rate over copy rate, per byte read (input copy) and per byte written (output copy)."""
    copy_in = res["copy_in"]["bytes"] / res["copy_in"]["wall_s"]
    copy_out = res["copy_out"]["bytes"] / res["copy_out"]["wall_s"]
    inproc = r["inproc_s"] or float("nan")
    return {"read": r["input_bytes"] / inproc / copy_in, "written": r["output_bytes"] / inproc / copy_out,
            "read_wall": r["input_bytes"] / r["wall_s"] / copy_in,
            "written_wall": r["output_bytes"] / r["wall_s"] / copy_out,
            "copy_in_gb_s": copy_in / GB, "copy_out_gb_s": copy_out / GB}


def print_conversions(results: list, boot: dict) -> None:
    print("| size | FP8 GB | shard MB | step | in-proc s | wall s | read GB/s | written GB/s | copy in / out GB/s "
          "| x copy per byte read (wall) | x copy per byte written (wall) | maxrss MiB | above start-up, x largest "
          "bf16 tensor | other load |")
    print("|" + "---|" * 14)
    for res in results:
        for step, r in res["steps"].items():
            q = ratios(res, r)
            other = max(r["other_cores"], res["copy_in"]["other_cores"], res["copy_out"]["other_cores"])
            above = (r["maxrss_kib"] - boot["maxrss_kib"]) * 1024
            print(f"| {res['size']}x | {res['fp8_bytes'] / GB:.2f} | {res['shard_bytes'] / 1e6:.0f} | {step} | "
                  f"{r['inproc_s']:.2f} | {r['wall_s']:.2f} | {r['input_bytes'] / r['inproc_s'] / GB:.2f} | "
                  f"{r['output_bytes'] / r['inproc_s'] / GB:.2f} | "
                  f"{q['copy_in_gb_s']:.2f} / {q['copy_out_gb_s']:.2f} | "
                  f"{q['read']:.2f} ({q['read_wall']:.2f}) | {q['written']:.2f} ({q['written_wall']:.2f}) | "
                  f"{r['maxrss_kib'] / 1024:.0f} | {above / MIB:.0f} MiB, {above / res['largest_bf16_bytes']:.2f} | "
                  f"{other:.2f}{' !' if other > LOAD_LIMIT else ''} |")


def target_lines(results: list) -> list:
    big = results[-1]
    lines = []
    for step, r in big["steps"].items():
        q = ratios(big, r)
        for what in ("read", "written"):
            lines.append(f"target {step} throughput per byte {what} at {big['size']}x (in-process): {q[what]:.2f} x "
                         f"copy (>= {THROUGHPUT_BOUND}) {'PASS' if q[what] >= THROUGHPUT_BOUND else 'MISS'}")
    if len(results) > 1:
        small = results[0]
        for step, r in big["steps"].items():
            growth = (r["maxrss_kib"] - small["steps"][step]["maxrss_kib"]) * 1024
            lines.append(f"target {step} peak RSS flat {small['size']}x->{big['size']}x (model and shards 2x): "
                         f"{growth / MIB:+.0f} MiB (<= +{big['largest_bf16_bytes'] / MIB:.0f} MiB, one largest tensor) "
                         f"{'PASS' if growth <= big['largest_bf16_bytes'] else 'MISS'}")
    return lines


def summary_line(results: list, boot: dict, kernel: list) -> str:
    big = results[-1]
    w1, w2 = big["steps"]["--workers 1"], big["steps"]["--workers 2"]
    q1, q2 = ratios(big, w1), ratios(big, w2)
    speedup = [new["gb_s"] / old["gb_s"] for old, new in zip(
        (r for r in kernel if r["variant"].startswith("old")), (r for r in kernel if r["variant"].endswith("(new)")))]
    rss = "->".join(f"{res['steps']['--workers 1']['maxrss_kib'] / 1024:.0f}" for res in results)
    return (f"summary fp8-to-bf16 {big['fp8_bytes'] / GB:.2f} GB FP8: --workers 1 {q1['read']:.2f}x copy per byte "
            f"read, "
            f"{q1['written']:.2f}x per byte written; --workers 2 {q2['read']:.2f}x / {q2['written']:.2f}x; "
            f"maxrss {rss} MiB over sizes (start-up {boot['maxrss_kib'] / 1024:.0f} MiB, largest tensor "
            f"{big['largest_bf16_bytes'] / MIB:.0f} MiB bf16); kernel {min(speedup):.1f}-{max(speedup):.1f}x "
            f"the old one")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller size only, one run per step")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write every measured number to this file")
    parser.add_argument("--wait-idle", type=float, default=5.0, metavar="S",
                        help="before each timed step wait up to S s for other processes to go idle (default 5)")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else 2
    WAIT_IDLE[0] = args.wait_idle
    if not os.path.exists("/usr/bin/time"):
        raise SystemExit("GNU time is needed for peak RSS: apt-get install -y time")
    root = tempfile.mkdtemp(prefix="npu_dsv3-fp8-bench-", dir=args.workdir)
    started = time.perf_counter()
    try:
        machine = machine_info(root)
        print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB RAM, disk "
              f"{machine['disk']}; python {machine['python']}, torch {machine['torch']}")
        kernel = kernel_benchmark(repeat=3)
        print_kernel(kernel)
        print()
        boot = best_of(repeat, lambda i: measure([*npu_dsv3_command(), "convert", "fp8-to-bf16", "--help"], root,
                                                 "startup", sample=i == 0))
        results = []
        for size in ([1] if args.quick else SIZES):
            res = run_size(size, root, repeat)
            print(f"# {size}x: {res['layers']} layers x {res['experts']} experts, {res['fp8_bytes'] / GB:.2f} GB FP8 "
                  f"weights in {res['shards']} shards (largest {res['shard_bytes'] / 1e6:.0f} MB), largest tensor "
                  f"{res['largest_fp8_bytes'] / MIB:.0f} MiB FP8 (generated in {res['generate_s']:.1f} s)", flush=True)
            results.append(res)
        print(f"start-up (npu-dsv3 convert fp8-to-bf16 --help): {boot['wall_s']:.1f} s, maxrss "
              f"{boot['maxrss_kib'] / 1024:.0f} MiB; each step best of {repeat} (copies {repeat + 1})")
        print_conversions(results, boot)
        print()
        targets = target_lines(results)
        for line in targets:
            print(line)
        summary = summary_line(results, boot, kernel)
        print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
        print(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "kernel": kernel, "startup": boot, "results": results,
                           "targets": targets, "summary": summary}, f, indent=2, default=str)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
