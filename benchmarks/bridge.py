"""The RL bridge's weight sync and load, on gloo processes of one machine (TP2 x EP2 by default), in one run.

A DeepSeek-V3-shaped model (``--hidden``, ``--layers``, ``--experts`` routed experts per layer: many tensors) is
written as an HF checkpoint; then every rank:

- load: ``Bridge.get_model`` straight from HF, against the disk route (``convert hf2mcore --save-format
  torch_dist``, then megatron's load of it);
- export: ``export_hf_weights`` (bucketed and pipelined: per bucket one broadcast per sending process, each
  piece sent once) against the per-tensor pattern of verl's legacy weight sync and mbridge 0.15, written here
  as the baseline (``_per_tensor_export``: each parameter all-gathered over its tensor-parallel group, each
  routed expert over the expert-parallel group, one collective per tensor); against our exporter with one HF
  tensor per bucket (the bucketing's own share of the speed-up); and against the disk route (a torch_dist save
  of the trained model, then ``convert mcore2hf``);
- the exporter's own live buffer bytes (``Bridge.export_buffer_bytes``) against the bound it states.

    python benchmarks/bridge.py                      # 1.22 GB fp32, 64 experts x 5 MoE layers, 4 ranks
    python benchmarks/bridge.py --hidden 128 --layers 2 --experts 8     # a smoke run

Target (docs/benchmarks.md): export >= 3x faster than the per-tensor pattern; memory within the bound.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _model_config(args) -> dict:
    heads = max(args.hidden // 128, 2)
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers + 1, first_k_dense_replace=1,
                num_attention_heads=heads, num_key_value_heads=heads, n_routed_experts=args.experts,
                num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=args.hidden // 2,
                kv_lora_rank=args.hidden // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def _per_tensor_export(chunks):
    """The baseline: verl's legacy weight sync (``per_tensor_generator``) and mbridge 0.15, one collective per
    tensor. A parameter split over tensor parallelism is all-gathered over its tensor-parallel group and joined;
    a routed expert's weight goes one local expert at a time (TEGroupedMLP's ``weight{j}``) over the
    expert-parallel group, which gives that expert of every expert rank; fc1 is then cut into gate and up. Only
    tensor-parallel x expert-parallel layouts (one pipeline stage, expert-TP 1). The HF renaming and the
    reordering of fused tensors are left out and experts go out as views, which favours the baseline."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group, ep_group = ps.get_tensor_model_parallel_group(), ps.get_expert_model_parallel_group()
    tp, ep = dist.get_world_size(tp_group), dist.get_world_size(ep_group)
    for chunk in chunks:
        local = chunk.config.num_moe_experts // ep
        for name, param in chunk.named_parameters():
            param = param.detach()
            if name.endswith(("experts.weight1", "experts.weight2")):
                hidden = chunk.config.hidden_size
                for rows in param.view(local, -1):
                    every = [torch.empty_like(rows) for _ in range(ep)]
                    dist.all_gather(every, rows, group=ep_group)
                    for expert in every:  # HF's [out, in] orientation, as views
                        if name.endswith("weight1"):
                            yield from expert.view(hidden, -1).t().chunk(2)
                        else:
                            yield expert.view(-1, hidden).t()
            elif getattr(param, "tensor_model_parallel", False) and tp > 1:
                every = [torch.empty_like(param) for _ in range(tp)]
                dist.all_gather(every, param, group=tp_group)
                yield torch.cat(every, dim=param.partition_dim)
            else:
                yield param


def _rank(args) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    import npu_dsv3  # noqa: F401  (the patches)
    from npu_dsv3.bridge import Bridge

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             expert_model_parallel_size=args.ep, expert_tensor_parallel_size=1)
    bridge = Bridge.from_hf_pretrained(args.hf_dir, dtype=torch.float32)
    out = {}

    def timed(name, fn):
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        dist.barrier()
        out[name] = time.perf_counter() - start
        return result

    overrides = dict(moe_grouped_gemm=True, sequence_parallel=args.tp > 1)
    chunks = timed("load_bridge", lambda: bridge.get_model(**overrides))
    model = chunks[0]
    timed("load_disk", lambda: dist_checkpointing.load({"model": model.sharded_state_dict()},
                                                       os.path.join(args.dist_dir, "release")))
    count = [0]

    def drain(bucket):
        count[0] = sum(1 for _ in bridge.export_hf_weights(chunks, bucket_bytes=bucket))

    timed("export_first", lambda: drain(args.bucket_mb << 20))  # makes the model's export plan
    timed("export_bucketed", lambda: drain(args.bucket_mb << 20))  # every weight sync after the first
    out["buffer_bytes"], out["tensors"] = bridge.export_buffer_bytes, count[0]
    out["received_bytes"] = received = bridge.export_received_bytes
    # the floor on this machine: the same bytes in plain all-to-alls of a bucket each (buffers reused), nothing
    # joined or handed out
    world, bucket = dist.get_world_size(), args.bucket_mb << 20
    share = [0 if r == dist.get_rank() else bucket // (world - 1) for r in range(world)]
    into, send = torch.empty(sum(share), dtype=torch.uint8), torch.ones(sum(share), dtype=torch.uint8)
    timed("raw_exchange", lambda: [dist.all_to_all_single(into, send, share, share)
                                   for _ in range(-(-received // bucket))])
    timed("export_one_per_bucket", lambda: drain(1))
    timed("export_per_tensor", lambda: sum(1 for _ in _per_tensor_export(chunks)))
    from npu_dsv3.training.checkpointing import save_checkpoint

    timed("export_disk_save", lambda: save_checkpoint(os.path.join(args.work, "save"), 1, chunks, None, None,
                                                      save_optim=False, save_rng=False, hf_config=bridge.hf_config))
    out["largest_bytes"] = max(t.numel() * t.element_size() for _, t in bridge.export_hf_weights(chunks))
    print(json.dumps({"rank": dist.get_rank(), **out}), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=5, help="MoE layers (after one dense layer)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=32, help="the export bucket (the bridge's default: 32 MiB)")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    p.add_argument("--dist-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank:
        return _rank(args)
    import socket

    from npu_dsv3.cli import main as cli
    from npu_dsv3.tiny_model import make_hf_model, save_hf

    world = args.tp * args.ep
    with tempfile.TemporaryDirectory() as work:
        hf_dir = save_hf(make_hf_model(seed=0, **_model_config(args)), os.path.join(work, "hf"))
        size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        dist_dir = os.path.join(work, "dist")
        start = time.perf_counter()
        assert cli(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", dist_dir, "--save-format",
                    "torch_dist", "--no-progress"]) == 0
        convert_in = time.perf_counter() - start
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1"}
        flags = [*(argv or sys.argv[1:]), "--rank", "--hf-dir", hf_dir, "--dist-dir", dist_dir, "--work", work]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *flags], env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outputs = [proc.communicate() for proc in procs]
        for proc, (_, err) in zip(procs, outputs):
            if proc.returncode:
                sys.exit(f"a rank failed:\n{err[-3000:]}")
        ranks = [json.loads(o.strip().splitlines()[-1]) for o, _ in outputs]
        start = time.perf_counter()
        assert cli(["convert", "mcore2hf", "--load-dir", os.path.join(work, "save"), "--save-dir",
                    os.path.join(work, "back"), "--no-progress"]) == 0
        disk_out = time.perf_counter() - start
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}
    print(f"model: {size / 1e9:.2f} GB fp32 HF, {worst['tensors']} HF tensors, {args.experts} experts x "
          f"{args.layers} MoE layers; {world} gloo ranks (TP{args.tp} x EP{args.ep}); bucket {args.bucket_mb} MiB")
    print(f"load: bridge {worst['load_bridge']:.2f} s; disk route: hf2mcore {convert_in:.2f} s + load "
          f"{worst['load_disk']:.2f} s = {convert_in + worst['load_disk']:.2f} s, ratio "
          f"{worst['load_bridge'] / (convert_in + worst['load_disk']):.3f}")
    disk = worst["export_disk_save"] + disk_out
    print(f"export: bucketed {worst['export_bucketed']:.2f} s (the first, which makes the plan, "
          f"{worst['export_first']:.2f} s), per-tensor {worst['export_per_tensor']:.2f} s, "
          f"speed-up {worst['export_per_tensor'] / worst['export_bucketed']:.2f}x; one HF tensor per bucket "
          f"{worst['export_one_per_bucket']:.2f} s, speed-up "
          f"{worst['export_one_per_bucket'] / worst['export_bucketed']:.2f}x; disk route: save "
          f"{worst['export_disk_save']:.2f} s + mcore2hf {disk_out:.2f} s = {disk:.2f} s, "
          f"speed-up {disk / worst['export_bucketed']:.2f}x")
    print(f"export traffic: {worst['received_bytes'] / 1e9:.3f} GB received per rank; the same bytes in plain "
          f"bucket-sized all-to-alls take {worst['raw_exchange']:.2f} s (the floor here)")
    print(f"export buffer: {worst['buffer_bytes'] / 1e6:.1f} MB live per rank; bound 2 x (bucket + 2 x "
          f"largest tensor) = {2 * ((args.bucket_mb << 20) + 2 * worst['largest_bytes']) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
