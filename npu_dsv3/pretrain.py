"""``torchrun --nproc-per-node N -m npu_dsv3.pretrain <flags>``: DeepSeek-V3 pretraining on Megatron-Core.

The flags are Megatron / MindSpeed-LLM's (``npu_dsv3.arguments``). Each process
builds its (tensor, pipeline, expert) share of the model as the pipeline layout
places it, runs megatron's schedule, DDP and optimizer one step at a time
(``npu_dsv3.training.step``), logs a Megatron-style line every
``--log-interval`` and, with ``--log-jsonl``, one JSON record per iteration,
stops on a non-finite loss, and saves / resumes through
``npu_dsv3.training.checkpointing``.

Every data-parallel rank reads its own slice of each global batch, in the same
order whatever the layout, so a run of any layout sees the data a single
process would see.
"""

import os
import sys
import time
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist

from npu_dsv3 import backend


def initialize(args, parallel, config) -> None:
    """The process group (torchrun's environment, or a world of one) and megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    from npu_dsv3.model.placement import dualpipev_embedding_ranks

    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(args.distributed_backend or backend.dist_backend())
        else:
            dist.init_process_group(args.distributed_backend or backend.dist_backend(), store=dist.HashStore(),
                                    rank=0, world_size=1)
    extra = {"get_embedding_ranks": dualpipev_embedding_ranks} if config.schedules_method == "dualpipev" else {}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size, **extra)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def build_chunks(config, padded_vocab: int) -> List:
    from npu_dsv3.model.builder import build_model

    chunks = config.virtual_pipeline_model_parallel_size
    if not chunks:
        return [build_model(config, padded_vocab=padded_vocab)]
    return [build_model(config, vp_stage=i, padded_vocab=padded_vocab) for i in range(chunks)]


def mock_microbatches(args, iteration: int) -> Iterator[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of iteration ``iteration``: the global batch is drawn
    from a generator seeded by (seed, iteration), so every layout trains on the same tokens."""
    from megatron.core import parallel_state

    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + iteration)
    vocab = args.hf["vocab_size"]
    ids = torch.randint(0, vocab, (args.global_batch_size, args.seq_length + 1), generator=generator)
    per_rank = args.micro_batch_size * args.num_microbatches
    rank = parallel_state.get_data_parallel_rank()
    ids = ids[rank * per_rank:(rank + 1) * per_rank]
    positions = torch.arange(args.seq_length).expand(args.micro_batch_size, args.seq_length)
    for m in range(args.num_microbatches):
        chunk = ids[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]
        yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "position_ids": positions,
               "loss_mask": torch.ones(args.micro_batch_size, args.seq_length)}


def dataset_microbatches(args, dataset, iteration: int) -> Iterator[Dict[str, torch.Tensor]]:
    """The same slicing over megatron's GPTDataset: sample ``iteration * global_batch + i``."""
    from megatron.core import parallel_state

    per_rank = args.micro_batch_size * args.num_microbatches
    first = iteration * args.global_batch_size + parallel_state.get_data_parallel_rank() * per_rank
    for m in range(args.num_microbatches):
        samples = [dataset[first + m * args.micro_batch_size + i] for i in range(args.micro_batch_size)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in
                 ("tokens", "labels", "loss_mask", "position_ids")}
        yield batch


def _scheduler(args, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = args.lr_decay_iters or args.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")


def _is_logging_rank(losses_here: bool) -> bool:
    from megatron.core import parallel_state

    return (losses_here and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def train(args) -> dict:
    """The run ``args`` describes; returns the last iteration's metrics (on every rank)."""
    from megatron.core.optimizer import get_megatron_optimizer

    from npu_dsv3.arguments import build_configs
    from npu_dsv3.training import train_step, wrap_model
    from npu_dsv3.training.checkpointing import load_checkpoint, save_checkpoint
    from npu_dsv3.training.metrics import (IterationMetrics, JsonlLog, check_finite, format_line, peak_memory_gb,
                                           throughput)

    configs = build_configs(args)
    config, parallel = configs.model, configs.parallel
    if parallel.vpp:
        # Measured: PP2 with 2 chunks trains, but its loss and grad norm differ from the single process.
        raise ValueError("--num-layers-per-virtual-pipeline-stage: interleaved pipeline training does not yet "
                         "match the single-process run; train without it for now")
    initialize(args, parallel, config)
    if dist.get_rank() == 0:
        for note in args.notes:
            print(f"note: {note}", file=sys.stderr)
    chunks = [wrap_model(m, configs.optimizer.use_distributed_optimizer)[0]
              for m in build_chunks(config, args.padded_vocab_size)]
    optimizer = get_megatron_optimizer(configs.optimizer, chunks)
    scheduler = _scheduler(args, optimizer)
    iteration = 0
    if args.load:
        iteration = load_checkpoint(args.load, chunks, optimizer, scheduler, finetune=args.finetune,
                                    load_optim=args.load_optim, load_rng=args.load_rng)
    dataset = None if args.mock_data else _train_dataset(args)
    log = JsonlLog(args.log_jsonl) if args.log_jsonl else None
    last = {}
    while iteration < args.train_iters:
        batches = (mock_microbatches(args, iteration) if dataset is None
                   else dataset_microbatches(args, dataset, iteration))
        start = time.perf_counter()
        result = train_step(chunks, optimizer, batches, args.num_microbatches, args.seq_length,
                            args.micro_batch_size)
        scheduler.step(increment=1)
        seconds = time.perf_counter() - start
        iteration += 1
        here = "lm_loss" in result  # the loss exists on the last pipeline stage only
        tokens_per_sec, tflops = throughput(config, args.seq_length, args.global_batch_size, seconds,
                                            dist.get_world_size(), vocab_size=args.padded_vocab_size)
        metrics = IterationMetrics(
            iteration=iteration, train_iters=args.train_iters, consumed_samples=iteration * args.global_batch_size,
            global_batch_size=args.global_batch_size, lm_loss=result.get("lm_loss"),
            grad_norm=None if result["grad_norm"] is None else float(result["grad_norm"]),
            lr=optimizer.param_groups[0]["lr"], ms_per_iter=seconds * 1e3, tokens_per_sec=tokens_per_sec,
            tflops_per_device=tflops, memory_gb=peak_memory_gb(),
            mtp_loss=(sum(result["mtp_loss"]) if result.get("mtp_loss") else None),
            load_balancing_loss=result.get("seq_load_balancing_loss", result.get("load_balancing_loss")))
        if here:
            check_finite(metrics)
        if _is_logging_rank(here):
            if log is not None:
                log.write(metrics)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                print(format_line(metrics), flush=True)
        last = {"lm_loss": metrics.lm_loss, "grad_norm": metrics.grad_norm}
        if args.save and (iteration % (args.save_interval or args.train_iters) == 0
                          or iteration == args.train_iters):
            save_checkpoint(args.save, iteration, chunks, optimizer, scheduler, args=_saved_args(args),
                            ckpt_format=args.ckpt_format)
    if log is not None:
        log.close()
    return last


def _train_dataset(args):
    from npu_dsv3.data.dataset import build_pretrain_datasets
    from npu_dsv3.data.tokenizer import load_tokenizer

    sizes = [args.train_iters * args.global_batch_size, 0, 0]
    train, _, _ = build_pretrain_datasets(
        args.data_path, seq_length=args.seq_length, sizes=sizes, seed=args.seed, split=args.split,
        tokenizer=load_tokenizer(args.tokenizer_type, args.tokenizer_name_or_path, vocab_size=args.hf["vocab_size"]),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        create_attention_mask=False)
    return train


def _saved_args(args) -> dict:
    """The flags, as plain values (checkpoints are read back with weights_only=True)."""
    plain = (int, float, str, bool, type(None))
    return {k: v for k, v in vars(args).items() if isinstance(v, plain)
            or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}


def main(argv=None) -> int:
    from npu_dsv3.arguments import parse_args
    from npu_dsv3.checkpoint.hf_reader import CheckpointError
    from npu_dsv3.training.metrics import NonFiniteLossError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, world_size=world, mode="pretrain")
        train(args)
    except (ValueError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"npu_dsv3.pretrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
