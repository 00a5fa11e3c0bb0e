"""``npu-dsv3 demo``: the main job on the embedded default, on any machine.

Builds a tiny random DeepSeek-V3 (MLA, grouped sigmoid router with expert bias,
shared experts, dense first layer, YaRN, MTP) as an HF checkpoint, checks that
our megatron-core model gives transformers' logits, then trains it for a few
steps through megatron-core's DDP, optimizer and schedule. Exit code 0 only if
parity holds and the loss went down.
"""

import json
import os
import time

import torch

from npu_dsv3.tiny_model import make_hf_model, save_hf, yarn
from npu_dsv3.verify import verify_hf_dir


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="tiny DeepSeek-V3: HF parity check, then a few training steps")
    p.add_argument("--workdir", default="runs/demo", help="where the tiny HF checkpoint is written")
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    return p


def _fixed_batches(vocab, seq, mbs, count, seed):
    ids = torch.randint(0, vocab, (mbs * count, seq + 1), generator=torch.Generator().manual_seed(seed))
    full = dict(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(mbs * count, seq),
                position_ids=torch.arange(seq).expand(mbs * count, seq))
    return [{k: v[i * mbs:(i + 1) * mbs] for k, v in full.items()} for i in range(count)]


def run(args) -> int:
    from npu_dsv3.model import load_hf
    from npu_dsv3.training import build_optimizer, train_step, wrap_model

    os.makedirs(args.workdir, exist_ok=True)
    hf_dir = save_hf(make_hf_model(seed=args.seed, rope_parameters=yarn()), args.workdir, with_mtp=True)
    print(f"[demo] tiny DeepSeek-V3 written to {hf_dir}", flush=True)
    parity = verify_hf_dir(hf_dir)
    print(f"[demo] parity with transformers: {json.dumps(parity)}", flush=True)

    model = load_hf(hf_dir).train()
    chunks = wrap_model(model)
    optimizer = build_optimizer(chunks, lr=args.lr)
    batches = _fixed_batches(model.config.vocab_size, args.seq_length, args.micro_batch_size,
                             args.num_microbatches, args.seed)
    losses = []
    for iteration in range(1, args.train_iters + 1):
        start = time.perf_counter()
        result = train_step(chunks, optimizer, iter(batches), args.num_microbatches, args.seq_length,
                            args.micro_batch_size)
        losses.append(result["lm_loss"])
        print(
            f"[demo] iteration {iteration:3d}/{args.train_iters} | lm loss {result['lm_loss']:.4f} | "
            f"mtp loss {result['mtp_loss'][0]:.4f} | grad norm {result['grad_norm']:.3f} | "
            f"{(time.perf_counter() - start) * 1000:.0f} ms",
            flush=True,
        )
    decreased = losses[-1] < losses[0]
    print(f"[demo] loss {losses[0]:.4f} -> {losses[-1]:.4f}; parity {'passed' if parity['passed'] else 'FAILED'}",
          flush=True)
    return 0 if parity["passed"] and decreased else 1
