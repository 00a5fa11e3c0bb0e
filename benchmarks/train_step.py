#!/usr/bin/env python
"""Benchmark one training step of our DeepSeek-V3 model against megatron-core's own local path.

    python benchmarks/train_step.py                       # default size (about a minute on 2 idle CPU cores)
    python benchmarks/train_step.py --threads 1           # on a busy machine: one thread per contender
    python benchmarks/train_step.py --hidden 512 --layers 6 --seq-length 256 --repeats 20

Both contenders train the same tiny DeepSeek-V3-architecture model (MLA with
q/kv LoRA and YaRN RoPE, a first dense layer, then MoE layers with one shared
expert and sigmoid, group-limited, expert-bias routing; no MTP) on the same
random tokens, in fp32, one full step each: forward, backward and the
optimizer step, through megatron's DistributedDataParallel, pipeline schedule
and Adam (``npu_dsv3.training.step.train_step`` for both).

- **ours**: ``npu_dsv3.model.build_model``: our spec (``MLACoreAttention`` over
  ``ops.mla_attention``, our RMSNorm, SwiGLU and RoPE ops, ``DeepSeekV3Router``,
  ``GroupedExperts`` over ``ops.gmm``, ``ops.permute``), every fused-op switch on
  and every ``npu_dsv3`` patch applied.
- **megatron**: ``GPTModel`` with megatron-core's own local modules from
  ``get_gpt_decoder_block_spec(use_transformer_engine=False)`` (i.e.
  ``get_gpt_layer_local_spec(num_experts, moe_grouped_gemm=False,
  qk_layernorm=True, multi_latent_attention=True, normalization="RMSNorm")``
  for the MoE layers, ``num_experts=None`` for the dense one): ``torch.nn.RMSNorm``,
  ``MLASelfAttention`` with ``DotProductAttention`` (materialised scores),
  megatron's RoPE, ``TopKRouter``, the alltoall dispatcher's own permute,
  ``SequentialMLP`` experts (the local ``GroupedMLP`` needs the CUDA
  ``grouped_gemm`` package). Its process keeps only what megatron-core 0.16.1
  needs to run on CPU without TransformerEngine: the ``backend-cpu`` patches,
  ``mla.have_te`` and ``moe.te_general_gemm`` (megatron's own TE-absence
  checks, which crash without them), and a ``DotProductAttention`` that accepts
  MLA's ``k_channels``/``v_channels`` (0.16.1's local class has no such
  arguments; the computation is unchanged). Every other ``npu_dsv3`` patch is
  unregistered (reverted) before the model is built.

Routing: megatron's ``TopKRouter`` scores a group by the sum of its top
``topk / group_topk`` biased scores and always renormalises the chosen sigmoid
scores; DeepSeek-V3 (our router) sums the top 2 and renormalises only with
``norm_topk_prob``. Here, as in DeepSeek-V3 itself, topk / group_topk = 2 and
``norm_topk_prob`` is true, so both select and weight experts alike.

Each contender lives in its own worker process (one model each; peak RSS is
that process's). Steps alternate between them, in ABBA order, after
``--warmup`` untimed steps each; a step's time is wall-clock around
``train_step``, and each worker also records the CPU time other processes used
meanwhile (``machine.OtherLoad``), flagged above ``LOAD_LIMIT`` cores
(``--wait-idle`` waits for a quiet moment before each repeat). Reported:
median step seconds, tokens/s from it, the noise (half the interquartile range
over the median), CPU seconds per step, and the ratio ours/megatron of tokens/s
(> 1: ours is faster) as the median of the per-repeat ratios (robust to drift
shared by both; the final line's ``ratio``) and as the ratio of the medians.
Both train on one fixed batch, so the loss must fall: the run fails unless
every loss is finite and each contender's last loss is below its first.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from machine import OtherLoad
from ops import LOAD_LIMIT, machine_info, paired_ratio, spread, wait_idle

CONTENDERS = ("ours", "megatron")
VOCAB = 4096
# What megatron-core 0.16.1 cannot run without on CPU besides the backend adapter: MLA's
# isinstance check against TE's (absent) TELinear, and the router reading an undefined TE name.
MEGATRON_SHIMS = ("mla.have_te", "moe.te_general_gemm")


# --------------------------------------------------------------------------- model (worker side)


def hf_config(hidden: int, layers: int, seq_length: int) -> dict:
    """DeepSeek-V3's architecture and proportions at ``hidden``: 8 expert groups, top-4 groups,
    top-8 experts (so topk / group_topk = 2 as in the release), one shared expert, one dense layer."""
    from npu_dsv3.tiny_model import yarn

    max_positions = 4 * seq_length
    return dict(
        model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
        intermediate_size=hidden * 5 // 2, moe_intermediate_size=hidden // 2,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        first_k_dense_replace=1, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
        tie_word_embeddings=False, initializer_range=0.02, max_position_embeddings=max_positions,
        rope_scaling=yarn(factor=4.0, original=seq_length),
    )


def build_ours(config):
    from npu_dsv3.model import build_model

    return build_model(config)


def megatron_only() -> list:
    """Unregister every npu_dsv3 patch but the CPU backend and MEGATRON_SHIMS; returns what stays applied."""
    from npu_dsv3.patching import patch_status, unregister

    for p in patch_status():
        if p["feature"] != "backend-cpu" and p["name"] not in MEGATRON_SHIMS:
            unregister(p["name"])
    applied = [p["name"] for p in patch_status() if p["status"] == "applied"]
    assert all(n in MEGATRON_SHIMS or n.startswith("backend-cpu.") for n in applied), applied
    assert set(MEGATRON_SHIMS) <= set(applied), applied
    return applied


def _mla_dot_product_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        """megatron's local core attention; MLA passes its q/k and v head widths, and the output is
        heads x v width (Attention builds it once without them, MLA again with them)."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


def build_megatron(config):
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(MLATransformerConfig) if f.init}
    # use_te_activation_func makes megatron's MLP take its activation from the spec (ours: SwiGLU);
    # the local spec has none, so megatron's own GLU path must apply config.activation_func.
    fields.update(use_te_activation_func=False, moe_grouped_gemm=False)
    mcore_config = MLATransformerConfig(**fields)
    spec = get_gpt_decoder_block_spec(mcore_config, use_transformer_engine=False, normalization="RMSNorm")
    attention = _mla_dot_product_attention()
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = attention
    return GPTModel(mcore_config, spec, vocab_size=VOCAB, max_sequence_length=config.max_position_embeddings,
                    position_embedding_type="none")


def batch(seq_length: int, micro_batch_size: int) -> dict:
    import torch

    ids = torch.randint(0, VOCAB, (micro_batch_size, seq_length + 1), generator=torch.Generator().manual_seed(0))
    return dict(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(micro_batch_size, seq_length),
                position_ids=torch.arange(seq_length).expand(micro_batch_size, seq_length))


def build(args):
    """This worker's contender, in train mode, with a description of what it is made of."""
    import torch

    import npu_dsv3  # noqa: F401  (backend + patches)

    applied = megatron_only() if args.worker == "megatron" else None
    from npu_dsv3.config import hf_to_mcore_config_dpskv3
    from npu_dsv3.distributed import ensure_single_process_group

    torch.set_num_threads(args.threads)
    ensure_single_process_group()
    torch.manual_seed(0)
    config = hf_to_mcore_config_dpskv3(hf_config(args.hidden, args.layers, args.seq_length),
                                       use_cpu_initialization=True)
    model = (build_megatron if args.worker == "megatron" else build_ours)(config).train()
    moe_layer = model.decoder.layers[-1]
    return model, {
        "params": sum(p.numel() for p in model.parameters()),
        "patches": applied,
        "attention": type(moe_layer.self_attention.core_attention).__name__,
        "router": type(moe_layer.mlp.router).__name__,
        "experts": type(moe_layer.mlp.experts).__name__,
        "norm": type(moe_layer.input_layernorm).__name__,
    }


def worker(args) -> None:
    """Build one contender, then run one train step per "step" line on stdin, answering JSON lines."""
    # Replies go to the original stdout; anything the libraries print goes to stderr instead.
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj):
        reply_to.write(json.dumps(obj) + "\n")

    import resource

    model, description = build(args)
    from npu_dsv3.training import build_optimizer, train_step, wrap_model

    chunks = wrap_model(model)
    optimizer = build_optimizer(chunks, lr=1e-3)
    data = batch(args.seq_length, args.micro_batch_size)
    reply(description)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        load = OtherLoad()
        cpu, start = time.process_time(), time.perf_counter()
        result = train_step(chunks, optimizer, iter([data]), 1, args.seq_length, args.micro_batch_size)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        reply({"wall_s": wall, "cpu_s": cpu, "loss": result["lm_loss"], "other_cores": load.cores()})
    reply({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


# --------------------------------------------------------------------------- driver


class Contender:
    """A worker process holding one model; ``step()`` runs one timed train step in it."""

    def __init__(self, name: str, args):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--seq-length", str(args.seq_length),
               "--micro-batch-size", str(args.micro_batch_size), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=env)
        self.info = self._read()
        self.steps = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"{self.name} worker exited (rc {self.proc.returncode}):\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        result = self._read()
        self.steps.append(result)
        return result

    def finish(self) -> float:
        self.proc.stdin.write("quit\n")
        peak = self._read()["peak_rss_mib"]
        self.proc.wait()
        return peak


def check_loss(name: str, steps: list) -> None:
    losses = [s["loss"] for s in steps]
    if not all(map(math.isfinite, losses)) or losses[-1] >= losses[0]:
        raise SystemExit(f"{name}: the loss must be finite and fall over the steps, got {losses}")


def run(args) -> None:
    tokens = args.seq_length * args.micro_batch_size
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} usable cores, torch threads {args.threads}; torch {info['torch']} "
          f"({info['cpu_capability']}), megatron-core {info['megatron_core']}, python {info['python']}")
    print(f"model: hidden {args.hidden}, {args.layers} layers (1 dense), {args.hidden // 32} heads, 32 experts "
          f"top-8 in 8 groups (top-4 groups) + 1 shared, vocab {VOCAB}; fp32; seq {args.seq_length} x "
          f"micro-batch {args.micro_batch_size} = {tokens} tokens per step, one micro-batch")
    contenders = {}
    for name in CONTENDERS:
        start = time.perf_counter()
        contenders[name] = Contender(name, args)
        i = contenders[name].info
        print(f"{name}: built in {time.perf_counter() - start:.1f} s; {i['params']:,} parameters; attention "
              f"{i['attention']}, router {i['router']}, experts {i['experts']}, norm {i['norm']}")
    ours, base = contenders["ours"], contenders["megatron"]
    print(f"megatron process patches: {len([n for n in base.info['patches'] if n.startswith('backend-cpu.')])} "
          f"backend-cpu + {', '.join(n for n in base.info['patches'] if not n.startswith('backend-cpu.'))}")
    if ours.info["params"] != base.info["params"]:
        raise SystemExit(f"the contenders differ in size: {ours.info['params']} vs {base.info['params']} parameters")

    for w in range(args.warmup):
        print(f"warmup {w + 1}/{args.warmup}: " + "  ".join(
            f"{c.name} {c.step()['wall_s']:.3f} s" for c in contenders.values()), flush=True)
    timed = {name: [] for name in CONTENDERS}
    for r in range(args.repeats):
        waited = wait_idle(args.wait_idle) if args.wait_idle else 0.0
        order = CONTENDERS if r % 4 in (0, 3) else CONTENDERS[::-1]  # ABBA: A-first and B-first balance
        for name in order:
            timed[name].append(contenders[name].step())
        o, m = timed["ours"][-1], timed["megatron"][-1]
        flag = " *" if max(o["other_cores"], m["other_cores"]) > LOAD_LIMIT else ""
        print(f"repeat {r + 1}/{args.repeats}: ours {o['wall_s']:.3f} s (loss {o['loss']:.3f})  megatron "
              f"{m['wall_s']:.3f} s (loss {m['loss']:.3f})  ours/megatron speed {m['wall_s'] / o['wall_s']:.3f}  "
              f"other load {o['other_cores']:.2f} / {m['other_cores']:.2f} cores{flag}"
              + (f" (waited {waited:.0f} s for idle)" if waited >= 1.5 else ""), flush=True)

    peaks = {name: c.finish() for name, c in contenders.items()}
    walls = {name: [s["wall_s"] for s in steps] for name, steps in timed.items()}
    rate = {name: tokens / statistics.median(w) for name, w in walls.items()}
    print(f"\n{'contender':<10} {'median s':>9} {'min s':>8} {'noise':>6} {'cpu s':>7} {'tokens/s':>9} "
          f"{'peak RSS MiB':>12} {'other load':>10}  loss first -> last")
    for name in CONTENDERS:
        steps = timed[name]
        load = statistics.median(s["other_cores"] for s in steps)
        losses = [s["loss"] for s in contenders[name].steps]
        print(f"{name:<10} {statistics.median(walls[name]):9.3f} {min(walls[name]):8.3f} {spread(walls[name]):6.1%} "
              f"{statistics.median(s['cpu_s'] for s in steps):7.3f} {rate[name]:9.0f} {peaks[name]:12.0f} "
              f"{load:10.2f}  {losses[0]:.3f} -> {losses[-1]:.3f}")
    for name, c in contenders.items():
        check_loss(name, c.steps)
    ratio = paired_ratio(walls["megatron"], walls["ours"])
    loads = [s["other_cores"] for steps in timed.values() for s in steps]
    print(f"loss finite and falling for both; ours/megatron tokens/s: median of per-repeat ratios {ratio:.3f}, "
          f"ratio of the medians {rate['ours'] / rate['megatron']:.3f}")
    if statistics.median(loads) > LOAD_LIMIT:
        print(f"WARNING: other processes kept a median {statistics.median(loads):.2f} cores busy during the "
              f"timed steps: the timings are contaminated by foreign load")
    print(f"train_step: ours={rate['ours']:.0f} megatron={rate['megatron']:.0f} ratio={ratio:.3f}")


def main() -> None:
    from machine import usable_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, the first dense (default 4)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 32 (default 256)")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per contender (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (default 2)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="torch threads per contender (default: the usable cores)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each repeat, wait up to this long for other processes to go idle (default 0)")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hidden % 32:
        parser.error("--hidden must be a multiple of 32 (32-wide attention heads)")
    if args.layers < 2:
        parser.error("--layers must be at least 2 (the first layer is dense, the others MoE)")
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
