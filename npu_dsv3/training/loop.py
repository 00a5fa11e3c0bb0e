"""The training loop of ``python -m npu_dsv3.pretrain`` and ``.finetune`` (``train``).

Each process builds its (tensor, pipeline, expert) share of the model as the pipeline layout
places it, runs megatron's schedule, DDP and optimizer one step at a time
(``npu_dsv3.training.step``), logs a Megatron-style line every
``--log-interval`` and, with ``--log-jsonl``, one JSON record per iteration,
stops on a non-finite loss (on every rank, the tracker naming the last checkpoint whose next step
was finite), and saves / resumes through ``npu_dsv3.training.checkpointing`` (the data position by
the consumed samples the checkpoint stores, as Megatron-LM does). With ``--eval-iters K`` it evaluates K
validation batches every ``--eval-interval`` iterations and at the end. Pretraining and fine-tuning
differ only in the ``DataSource`` (``npu_dsv3.training.data``).
"""

import logging
import os
import time
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from npu_dsv3 import backend
from npu_dsv3.console import PROGRESS
from npu_dsv3.training.data import Batches, DataSource, data_source

_log = logging.getLogger(__name__)
_progress = logging.getLogger(PROGRESS)  # the per-iteration lines: stdout on a command line


def initialize(args, parallel, config) -> None:
    """The process group (torchrun's environment, or a world of one) and megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    from npu_dsv3.model.placement import dualpipev_embedding_ranks

    if not dist.is_initialized():
        backend.set_local_device()
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


def _evaluation_due(args, iteration: int) -> bool:
    return bool(args.eval_iters) and (iteration % args.eval_interval == 0 or iteration == args.train_iters)


def _validation_batches(args, source: DataSource, iteration: int) -> Iterator[Batches]:
    # Evaluation n (at iterations in (n * interval, (n + 1) * interval]) reads batches n*K .. n*K+K-1,
    # whatever iteration a resumed run started from.
    first = (-(-iteration // args.eval_interval) - 1) * args.eval_iters
    return (source.valid(first + k) for k in range(args.eval_iters))


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


def train(args, configs) -> dict:
    """The run ``args`` describes (fine-tuning when ``args.mode`` is "finetune") with the model, parallel and
    optimizer ``configs`` the entry point built from them (``arguments.build_configs``); returns the last
    iteration's metrics (on every rank)."""
    from megatron.core.optimizer import get_megatron_optimizer

    from npu_dsv3.training import train_step, wrap_model
    from npu_dsv3.training.checkpointing import publish_checkpoint, resume_checkpoint, save_checkpoint
    from npu_dsv3.training.metrics import (IterationMetrics, JsonlLog, eval_fields, format_eval_line, format_line,
                                           non_finite, peak_memory_gb, throughput)
    from npu_dsv3.training.step import evaluate

    config, parallel = configs.model, configs.parallel
    initialize(args, parallel, config)
    if dist.get_rank() == 0:
        for note in args.notes:
            _log.warning(f"note: {note}")
    source = data_source(args)  # before the model: bad data fails in seconds
    # Micro-batches padded to their longest sample differ in length: megatron's pipeline then
    # sends each activation's shape ahead of it.
    config.variable_seq_lengths = bool(args.variable_seq_lengths)
    chunks = [wrap_model(m, configs.optimizer.use_distributed_optimizer)[0]
              for m in build_chunks(config, args.padded_vocab_size)]
    optimizer = get_megatron_optimizer(configs.optimizer, chunks)
    scheduler = _scheduler(args, optimizer)
    iteration = consumed = 0
    if args.load:
        resumed = resume_checkpoint(args.load, chunks, optimizer, scheduler, finetune=args.finetune,
                                    load_optim=args.load_optim, load_rng=args.load_rng,
                                    lora_load=args.lora_load)
        iteration, consumed = resumed.iteration, consumed_samples(args, resumed)
        if consumed != iteration * args.global_batch_size:
            source = _resized_source(args, source, iteration, consumed)
    log = JsonlLog(args.log_jsonl) if args.log_jsonl else None
    last = {}
    pending = None  # a saved iteration the tracker names once the next step's loss is finite
    while iteration < args.train_iters:
        batches = source.train(consumed)
        start = time.perf_counter()
        result = train_step(chunks, optimizer, batches, args.num_microbatches, source.seq_length,
                            source.micro_batch_size)
        scheduler.step(increment=1)
        seconds = time.perf_counter() - start
        iteration += 1
        consumed += args.global_batch_size
        here = "lm_loss" in result  # the loss exists on the last pipeline stage only
        tokens_per_sec, tflops = throughput(config, args.seq_length, args.global_batch_size, seconds,
                                            dist.get_world_size(), vocab_size=args.padded_vocab_size)
        metrics = IterationMetrics(
            iteration=iteration, train_iters=args.train_iters, consumed_samples=consumed,
            global_batch_size=args.global_batch_size, lm_loss=result.get("lm_loss"),
            grad_norm=None if result["grad_norm"] is None else float(result["grad_norm"]),
            lr=optimizer.param_groups[0]["lr"], ms_per_iter=seconds * 1e3, tokens_per_sec=tokens_per_sec,
            tflops_per_device=tflops, memory_gb=peak_memory_gb(),
            mtp_loss=(sum(result["mtp_loss"]) if result.get("mtp_loss") else None),
            load_balancing_loss=result.get("seq_load_balancing_loss", result.get("load_balancing_loss")))
        if not _finite_everywhere(non_finite(metrics) is None):
            _stop_non_finite(args, metrics, pending)
        if pending is not None:  # its weights just gave a finite loss
            publish_checkpoint(args.save, pending)
            pending = None
        eval_loss = None
        if _evaluation_due(args, iteration):
            eval_loss = evaluate(chunks, _validation_batches(args, source, iteration), args.num_microbatches,
                                 source.seq_length, source.micro_batch_size)
            if eval_loss is not None:
                metrics.extra.update(eval_fields(eval_loss))
        if _is_logging_rank(here):
            if log is not None:
                log.write(metrics)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                _progress.info(format_line(metrics))
            if eval_loss is not None:
                _progress.info(format_eval_line(iteration, eval_loss))
        last = {"lm_loss": metrics.lm_loss, "grad_norm": metrics.grad_norm, **metrics.extra}
        if args.save and (iteration % (args.save_interval or args.train_iters) == 0
                          or iteration == args.train_iters):
            final = iteration == args.train_iters
            save_checkpoint(args.save, iteration, chunks, optimizer, scheduler,
                            args={**saved_args(args), "consumed_train_samples": consumed},
                            ckpt_format=args.ckpt_format, save_optim=args.save_optim, save_rng=args.save_rng,
                            hf_config=_saved_hf_config(args, config), tokenizer_dir=args.tokenizer_name_or_path,
                            publish=final, lora_only=args.lora_ckpt_filter, lora=lora_description(config),
                            qlora_dequantize=args.qlora_save_dequantize)
            pending = None if final else iteration
    if log is not None:
        log.close()
    return last


def _saved_hf_config(args, config) -> dict:
    """config.json beside the checkpoints: a QLoRA run's saves hold NF4 weights unless dequantized."""
    if config.qlora and not args.qlora_save_dequantize:
        from npu_dsv3.lora.nf4_base import NF4_KEY, NF4_RECORD

        return {**args.hf, NF4_KEY: NF4_RECORD}
    return args.hf


def _finite_everywhere(finite_here: bool) -> bool:
    """Whether every rank's loss and grad norm are finite: the loss exists on the last pipeline stage
    only, and every rank must agree on stopping and on publishing a checkpoint."""
    flag = torch.tensor([int(finite_here)], dtype=torch.int32, device=backend.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _stop_non_finite(args, metrics, pending: Optional[int]) -> None:
    """Raises NonFiniteLossError on every rank. The checkpoint saved one step before (``pending``), whose
    weights gave this loss, is removed unpublished: the tracker names the last checkpoint whose next step
    was finite, and the message says which."""
    from npu_dsv3.checkpoint.sources import tracker_tag
    from npu_dsv3.training.checkpointing import TRACKER_FILE, discard_checkpoint
    from npu_dsv3.training.metrics import NonFiniteLossError, check_finite

    if not args.save:
        where = "nothing was saved (no --save)"
    else:
        if pending is not None:
            discard_checkpoint(args.save, pending)
        tag = tracker_tag(args.save)
        tracker = os.path.join(args.save, TRACKER_FILE)
        where = (f"no checkpoint is published in {args.save}" if tag is None
                 else f"{tracker} names iteration {tag}: resume from it")
        if pending is not None:
            where += f"; iteration {pending}'s checkpoint was removed (its weights give this loss)"
    check_finite(metrics, where)  # the ranks that hold the value name it
    raise NonFiniteLossError(f"a loss is not finite at iteration {metrics.iteration} (on the last pipeline "
                             f"stage): stopping; {where}; lower --lr or check the data")


def lora_description(config) -> Optional[dict]:
    """What a LoRA run's checkpoints record of its adapters (None without LoRA)."""
    if not config.lora_rank:
        return None
    return {"r": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": list(config.lora_targets), "fusion": config.lora_fusion}


def consumed_samples(args, resumed) -> int:
    """Megatron-LM's consumed_train_samples as the checkpoint stores it, so a run resumed with another
    --global-batch-size reads on where the saved one stopped; an older checkpoint's from its iteration
    and batch size."""
    if resumed.iteration == 0:  # a fine-tuning start or a converted checkpoint: from the first sample
        return 0
    if "consumed_train_samples" in resumed.args:
        return int(resumed.args["consumed_train_samples"])
    return resumed.iteration * int(resumed.args.get("global_batch_size") or args.global_batch_size)


def _resized_source(args, source: DataSource, iteration: int, consumed: int) -> DataSource:
    """The data source of a run resumed after ``consumed`` samples with another batch size: the
    training split holds the samples the remaining iterations read."""
    if dist.get_rank() == 0:
        _log.warning(f"note: the checkpoint consumed {consumed} samples in {iteration} iterations (another "
                     f"--global-batch-size): training reads on from sample {consumed}")
    needed = consumed + (args.train_iters - iteration) * args.global_batch_size
    if needed <= args.train_iters * args.global_batch_size:
        return source
    return data_source(args, needed)


def saved_args(args) -> dict:
    """The flags, as plain values (checkpoints are read back with weights_only=True)."""
    plain = (int, float, str, bool, type(None))
    return {k: v for k, v in vars(args).items() if isinstance(v, plain)
            or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}
