"""Per-rank operation orders of the pipeline schedules, without a model.

Three schedules, each as the order in which every pipeline rank runs its
compute operations:

- ``1f1b``: megatron-core's ``forward_backward_pipelining_without_interleaving``.
  P stages, rank r holds stage r. Rank r runs ``P - r - 1`` warmup forwards,
  then alternates one forward and one backward, then drains the remaining
  backwards.
- ``interleaved``: megatron-core's ``forward_backward_pipelining_with_interleaving``
  with V model chunks per rank (chunk c of rank r is stage ``c * P + r``).
  Micro-batches go through the chunks in groups of P; rank r runs
  ``2 (P - r - 1) + (V - 1) P`` warmup forwards, then forward/backward pairs,
  then the remaining backwards; backwards visit the chunks in reverse.
- ``dualpipev``: DeepSeek's DualPipeV ("cut-in-half" DualPipe). 2P stages;
  rank r holds stage r as chunk 0 and stage 2P-1-r as chunk 1, so the
  micro-batch travels down the ranks in chunk 0, turns round on rank P-1 and
  comes back up in chunk 1, ending with the loss on rank 0. Its phases are:
  forwards of chunk 0, alternating forwards of chunk 0 and 1, zero-bubble
  backwards of chunk 1 (weight gradient deferred), the steady state of
  overlapped pairs "forward of one micro-batch + backward of another" (FB),
  and a cooldown of backwards whose weight gradients fill the idle slots.

Operation kinds (``Op.kind``):

- ``F``: forward of (micro-batch, chunk);
- ``BW``: full backward (input and weight gradients together), as megatron-core
  and DualPipeV without zero-bubble run it;
- ``B``: input-gradient backward whose weight gradient is deferred to a later
  ``W`` of the same (micro-batch, chunk);
- ``W``: that deferred weight-gradient computation;
- ``FB``: DualPipeV's overlapped pair: forward of (microbatch, chunk) and full
  backward of (bwd_microbatch, bwd_chunk), run as one operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

SCHEDULES = ("1f1b", "interleaved", "dualpipev")

Work = Tuple[int, int]
"""(micro-batch, chunk) on one rank."""


class ScheduleError(ValueError):
    """A schedule that cannot be planned with these sizes; the message says which to change."""


@dataclass(frozen=True)
class Op:
    kind: str
    microbatch: int
    chunk: int
    bwd_microbatch: Optional[int] = None
    """Only for ``FB``: the micro-batch whose backward runs alongside the forward."""
    bwd_chunk: Optional[int] = None
    """Only for ``FB``: the chunk of that backward."""

    def forwards(self) -> List[Work]:
        return [(self.microbatch, self.chunk)] if self.kind in ("F", "FB") else []

    def backwards(self) -> List[Work]:
        """Input-gradient computations this op performs."""
        if self.kind == "FB":
            return [(self.bwd_microbatch, self.bwd_chunk)]
        return [(self.microbatch, self.chunk)] if self.kind in ("B", "BW") else []

    def weights(self) -> List[Work]:
        """Weight-gradient computations this op performs."""
        if self.kind == "FB":
            return [(self.bwd_microbatch, self.bwd_chunk)]
        return [(self.microbatch, self.chunk)] if self.kind in ("W", "BW") else []

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB({self.microbatch}.{self.chunk}|{self.bwd_microbatch}.{self.bwd_chunk})"
        return f"{self.kind}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Plan:
    schedule: str
    pp: int
    microbatches: int
    chunks: int
    stages: Tuple[Tuple[int, ...], ...]
    """``stages[rank][chunk]``: the global pipeline stage that chunk computes."""
    ranks: Tuple[Tuple[Op, ...], ...]
    """``ranks[rank]``: that rank's operations in execution order."""

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    def describe(self) -> List[str]:
        """One compact line per rank, e.g. ``rank 0: F0.0 F1.0 ... FB(3.0|0.1) ... W5.0``."""
        return [f"rank {r}: " + " ".join(str(op) for op in ops) for r, ops in enumerate(self.ranks)]


def validate(schedule: str, pp: int, microbatches: int, chunks: int = 2) -> None:
    """Raise ScheduleError (one line, naming the flag) for sizes the schedule cannot run."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pp < 2:
        raise ScheduleError(f"--pipeline-model-parallel-size ({pp}) must be >= 2 for a pipeline schedule")
    if microbatches < 1:
        raise ScheduleError(f"--micro-batches ({microbatches}) must be >= 1")
    if schedule == "interleaved":
        if chunks < 2:
            raise ScheduleError(f"interleaved needs --virtual-chunks >= 2 (got {chunks})")
        if microbatches % pp:
            raise ScheduleError(
                f"interleaved needs --micro-batches ({microbatches}) to be a multiple of "
                f"--pipeline-model-parallel-size ({pp})"
            )
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ScheduleError(
            f"dualpipev needs --micro-batches ({microbatches}) >= 2 x --pipeline-model-parallel-size = {2 * pp}"
        )


def plan(schedule: str, pp: int, microbatches: int, chunks: int = 2, defer_weights: bool = True) -> Plan:
    """The per-rank operation orders of ``schedule`` for ``pp`` ranks and ``microbatches`` micro-batches.

    ``chunks`` is V for ``interleaved`` (the others have 1 and 2 chunks by
    construction); ``defer_weights`` switches DualPipeV's zero-bubble weight
    deferral on or off (off: every backward is a full backward).
    """
    validate(schedule, pp, microbatches, chunks)
    if schedule == "1f1b":
        stages = tuple((r,) for r in range(pp))
        ranks = tuple(one_f_one_b_order(pp, r, microbatches) for r in range(pp))
        return Plan(schedule, pp, microbatches, 1, stages, ranks)
    if schedule == "interleaved":
        stages = tuple(tuple(c * pp + r for c in range(chunks)) for r in range(pp))
        ranks = tuple(interleaved_order(pp, r, microbatches, chunks) for r in range(pp))
        return Plan(schedule, pp, microbatches, chunks, stages, ranks)
    stages = tuple((r, 2 * pp - 1 - r) for r in range(pp))
    ranks = tuple(dualpipev_order(pp, r, microbatches, defer_weights) for r in range(pp))
    return Plan(schedule, pp, microbatches, 2, stages, ranks)


def one_f_one_b_order(pp: int, rank: int, microbatches: int) -> Tuple[Op, ...]:
    """Megatron-core 1F1B on ``rank``: warmup forwards, steady forward/backward pairs, cooldown backwards."""
    warmup = min(pp - rank - 1, microbatches)
    ops = [Op("F", m, 0) for m in range(warmup)]
    for i in range(microbatches - warmup):
        ops += [Op("F", warmup + i, 0), Op("BW", i, 0)]
    ops += [Op("BW", m, 0) for m in range(microbatches - warmup, microbatches)]
    return tuple(ops)


def interleaved_order(pp: int, rank: int, microbatches: int, chunks: int) -> Tuple[Op, ...]:
    """Megatron-core interleaved 1F1B on ``rank`` (micro-batch groups of ``pp``, as its schedule table)."""
    # The k-th virtual micro-batch: groups of pp micro-batches sweep every chunk before the next group.
    table = [(m, c) for group in range(0, microbatches, pp) for c in range(chunks)
             for m in range(group, group + pp)]
    total = len(table)
    warmup = min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)

    def forward(k: int) -> Op:
        return Op("F", table[k][0], table[k][1])

    def backward(k: int) -> Op:
        # Backwards walk the same table with the chunks reversed.
        return Op("BW", table[k][0], chunks - 1 - table[k][1])

    ops = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [forward(warmup + k), backward(k)]
    ops += [backward(k) for k in range(total - warmup, total)]
    return tuple(ops)


class _DualPipeVRank:
    """Builds one rank's DualPipeV order, keeping the next micro-batch of each chunk and the deferred W queue."""

    def __init__(self, defer_weights: bool):
        self.defer_weights = defer_weights
        self.next_forward = [0, 0]
        self.next_backward = [0, 0]
        self.deferred: List[Work] = []  # weight gradients run first-in first-out
        self.ops: List[Op] = []

    def _take(self, counter: List[int], chunk: int) -> int:
        m = counter[chunk]
        counter[chunk] += 1
        return m

    def forward(self, chunk: int) -> None:
        self.ops.append(Op("F", self._take(self.next_forward, chunk), chunk))

    def backward(self, chunk: int, zero_bubble: bool = False) -> None:
        m = self._take(self.next_backward, chunk)
        if zero_bubble and self.defer_weights:
            self.ops.append(Op("B", m, chunk))
            self.deferred.append((m, chunk))
        else:
            self.ops.append(Op("BW", m, chunk))

    def weight(self) -> None:
        if self.defer_weights:
            m, chunk = self.deferred.pop(0)
            self.ops.append(Op("W", m, chunk))

    def forward_backward(self, fwd_chunk: int, bwd_chunk: int) -> None:
        m = self._take(self.next_forward, fwd_chunk)
        self.ops.append(Op("FB", m, fwd_chunk, self._take(self.next_backward, bwd_chunk), bwd_chunk))


def dualpipev_order(pp: int, rank: int, microbatches: int, defer_weights: bool = True) -> Tuple[Op, ...]:
    """DeepSeek DualPipeV on ``rank``, phase by phase (chunk 0 = stage rank, chunk 1 = stage 2P-1-rank)."""
    last_rank = rank == pp - 1
    o = _DualPipeVRank(defer_weights)
    # 1. Fill the downward half: ranks further from the turn start with more chunk-0 forwards.
    for _ in range(2 * (pp - rank - 1)):
        o.forward(0)
    # 2. Alternate chunk 0 and chunk 1 forwards until the first micro-batch comes back up.
    for _ in range(rank + 1):
        o.forward(0)
        o.forward(1)
    # 3. First chunk-1 backwards; their weight gradients wait so the next chunk-1 forward starts sooner.
    for _ in range(pp - rank - 1):
        o.backward(1, zero_bubble=True)
        o.weight()
        o.forward(1)
    # 4. Steady state: overlapped forward/backward pairs across the two chunks.
    for i in range(microbatches - 2 * pp + rank + 1):
        if i == 0 and last_rank:
            # DualPipeV runs the turning rank's first pair as a plain forward then a full
            # backward, not overlapped; DeepSeek notes this shortens the bubble.
            o.forward(0)
            o.backward(1)
        else:
            o.forward_backward(0, 1)
        o.forward_backward(1, 0)
    # 5. Chunk 0 has no forwards left: a chunk-1 backward replaces them.
    for _ in range(pp - rank - 1):
        o.backward(1)
        o.forward_backward(1, 0)
    # 6. Drain both chunks' backwards; the second half defers its weight gradients.
    zero_bubble = False
    half = (rank + 1) // 2
    for i in range(rank + 1):
        if i == half and rank % 2 == 1:
            zero_bubble = True
        o.backward(1, zero_bubble)
        if i == half and rank % 2 == 0:
            zero_bubble = True
        o.backward(0, zero_bubble)
    # 7. Weight gradients fill the gaps between the last chunk-0 backwards.
    for _ in range(pp - rank - 1):
        o.weight()
        o.backward(0, zero_bubble=True)
    # 8. The remaining deferred weight gradients.
    for _ in range(rank + 1):
        o.weight()
    return tuple(o.ops)
