"""Per-iteration training metrics: the Megatron-style log line, the ``--log-jsonl`` record, the
throughput figures (tokens/s and model TFLOPS per device), the stop on a non-finite loss and
the validation loss (its Megatron-style block and the fields it adds to the iteration's record)."""

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from npu_dsv3.training.flops import train_flops


class NonFiniteLossError(FloatingPointError):
    """The loss (or grad norm) became NaN or infinite: the run stops, its message naming the checkpoint the
    tracker points at."""


@dataclass
class IterationMetrics:
    iteration: int
    train_iters: int
    consumed_samples: int
    global_batch_size: int
    lm_loss: float
    grad_norm: Optional[float]
    lr: float
    ms_per_iter: float
    tokens_per_sec: float
    """Tokens per second per device."""
    tflops_per_device: float
    memory_gb: float
    mtp_loss: Optional[float] = None
    load_balancing_loss: Optional[float] = None
    loss_scale: Optional[float] = None
    skipped_iters: int = 0
    extra: dict = field(default_factory=dict)


def throughput(config, seq_length: int, global_batch_size: int, seconds: float, world_size: int,
               vocab_size: Optional[int] = None):
    """(tokens/s per device, model TFLOPS per device) of one step of ``global_batch_size`` sequences."""
    tokens = global_batch_size * seq_length
    flops = train_flops(config, seq_length, tokens, vocab_size=vocab_size)
    return tokens / seconds / world_size, flops / seconds / world_size / 1e12


def peak_memory_gb() -> float:
    """The device allocator's peak on NPU / CUDA; the process's peak RSS on CPU."""
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return npu.max_memory_allocated() / 2**30
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def non_finite(metrics: IterationMetrics) -> Optional[str]:
    """Which of the losses and the grad norm is NaN / inf, and at which iteration; None when all are finite."""
    for name in ("lm_loss", "mtp_loss", "load_balancing_loss", "grad_norm"):
        value = getattr(metrics, name)
        if value is not None and not math.isfinite(value):
            return f"{name.replace('_', ' ')} is {value} at iteration {metrics.iteration}"
    return None


def check_finite(metrics: IterationMetrics, checkpoint: str = "nothing was saved") -> None:
    """Stop on a NaN / inf loss or grad norm, saying where and (``checkpoint``) what to resume from."""
    problem = non_finite(metrics)
    if problem is not None:
        raise NonFiniteLossError(f"{problem}: stopping; {checkpoint}; lower --lr or check the data")


def _sci(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.6E}"


def format_line(m: IterationMetrics) -> str:
    """The log line megatron prints, with the MoE and MTP losses and the per-device throughput."""
    parts = [
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {m.iteration:8d}/{m.train_iters:8d}",
        f"consumed samples: {m.consumed_samples:12d}",
        f"elapsed time per iteration (ms): {m.ms_per_iter:.1f}",
        f"throughput per device (TFLOP/s/device): {m.tflops_per_device:.2f}",
        f"tokens/s/device: {m.tokens_per_sec:.1f}",
        f"learning rate: {m.lr:.6E}",
        f"global batch size: {m.global_batch_size:5d}",
        f"lm loss: {_sci(m.lm_loss)}",
    ]
    if m.mtp_loss is not None:
        parts.append(f"mtp loss: {_sci(m.mtp_loss)}")
    if m.load_balancing_loss is not None:
        parts.append(f"load balancing loss: {_sci(m.load_balancing_loss)}")
    if m.loss_scale is not None:
        parts.append(f"loss scale: {m.loss_scale:.1f}")
    parts += [f"grad norm: {'n/a' if m.grad_norm is None else f'{m.grad_norm:.3f}'}",
              f"number of skipped iterations: {m.skipped_iters:3d}",
              f"memory (GB): {m.memory_gb:.2f}"]
    return " | ".join(parts) + " |"


def _perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))  # megatron's cap: exp(20) ~ 4.9e8


def eval_fields(loss: float) -> dict:
    """What an evaluation adds to its iteration's ``--log-jsonl`` record."""
    return {"eval_lm_loss": loss, "eval_lm_ppl": _perplexity(loss)}


def format_eval_line(iteration: int, loss: float) -> str:
    """Megatron's validation report: the loss and its perplexity between two dashed rules."""
    line = (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {_perplexity(loss):.6E} | ")
    rule = "-" * (len(line) + 1)
    return f"{rule}\n{line}\n{rule}"


class JsonlLog:
    """``--log-jsonl PATH``: one JSON object per iteration, flushed as written, so a crash loses
    at most the line being written. A resumed run appends."""

    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, m: IterationMetrics) -> None:
        record = {k: v for k, v in asdict(m).items() if k != "extra"}
        record.update(m.extra)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
