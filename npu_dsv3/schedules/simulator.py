"""Event simulation of a pipeline plan: when each operation runs, the makespan and the bubble.

Every rank runs its operations strictly in its plan's order. An operation
starts as soon as its rank has finished the previous one and its data is
ready; communication costs nothing. The data dependencies, with ``s`` the
global stage of the chunk:

- forward of (m, s) needs forward of (m, s-1);
- backward of (m, s) needs forward of (m, s) and backward of (m, s+1);
- a deferred weight gradient of (m, s) needs the backward of (m, s).

Costs are those of one rank's whole share of the layers (one 1F1B stage), so
the three schedules compare on the same model: a schedule with C chunks per
rank (interleaved: V, DualPipeV: 2) charges each chunk operation 1/C of them.
As in DeepSeek's DualPipe README, ``b`` is a *full* backward (input and weight
gradients) and ``w`` its weight-gradient part, so a backward whose weight
gradient is deferred costs ``b - w``. An overlapped forward/backward pair costs
``max(f, b)`` (perfect overlap: its results leave when the pair ends) or runs as
its forward and then its backward (``"sum"``, as the CPU executor runs it: the
forward's output leaves when the forward ends; the timeline holds both parts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from npu_dsv3.schedules.plan import Op, Plan

Event = Tuple[str, int, int]
"""("F" | "B" | "W", micro-batch, global stage): a result some operation produces."""


class DeadlockError(RuntimeError):
    """No rank can run its next operation while operations remain."""


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    overlap: str = "max"
    """How an FB pair costs: "max" (forward and backward fully overlap) or "sum"."""

    def __post_init__(self):
        if self.overlap not in ("max", "sum"):
            raise ValueError(f"overlap must be 'max' or 'sum', not {self.overlap!r}")
        if min(self.f, self.b, self.w) < 0 or self.w > self.b:
            raise ValueError(f"costs need 0 <= W <= B and F >= 0 (got F={self.f}, B={self.b}, W={self.w})")

    @property
    def fb(self) -> float:
        return max(self.f, self.b) if self.overlap == "max" else self.f + self.b

    def of(self, op: Op) -> float:
        return {"F": self.f, "BW": self.b, "B": self.b - self.w, "W": self.w, "FB": self.fb}[op.kind]


@dataclass(frozen=True)
class Timed:
    op: Op
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    plan: Plan
    costs: Costs
    timelines: Tuple[Tuple[Timed, ...], ...]
    """``timelines[rank]``: every operation of that rank with its start and end (an FB pair
    without overlap: its forward part and its backward part)."""

    @property
    def makespan(self) -> float:
        return max(t.end for line in self.timelines for t in line)

    def busy(self, rank: int) -> float:
        return sum(t.end - t.start for t in self.timelines[rank])

    def idle(self, rank: int) -> float:
        return self.makespan - self.busy(rank)

    @property
    def mean_idle(self) -> float:
        """Idle time per rank, averaged: what the closed-form bubble formulas count."""
        return sum(self.idle(r) for r in range(self.plan.pp)) / self.plan.pp

    @property
    def bubble_fraction(self) -> float:
        """Idle time over the time all ranks are held: idle / (P x makespan)."""
        return self.mean_idle / self.makespan


def produced(plan: Plan, rank: int, op: Op) -> List[Event]:
    stage = plan.stages[rank]
    events = [("F", m, stage[c]) for m, c in op.forwards()]
    events += [("B", m, stage[c]) for m, c in op.backwards()]
    events += [("W", m, stage[c]) for m, c in op.weights()]
    return events


def needed(plan: Plan, rank: int, op: Op) -> List[Event]:
    """The results ``op`` waits for (those it produces itself excluded)."""
    stage = plan.stages[rank]
    last = plan.num_stages - 1
    needs = [("F", m, stage[c] - 1) for m, c in op.forwards() if stage[c] > 0]
    for m, c in op.backwards():
        s = stage[c]
        needs.append(("F", m, s))
        if s < last:
            needs.append(("B", m, s + 1))
    needs += [("B", m, stage[c]) for m, c in op.weights()]
    own = set(produced(plan, rank, op))
    return [e for e in needs if e not in own]


def _phases(op: Op, costs: Costs) -> List[Op]:
    """The parts of ``op`` that run one after the other: an FB pair without overlap is its
    forward (whose output leaves as soon as it ends) and then its backward."""
    if op.kind == "FB" and costs.overlap == "sum":
        return [Op("F", op.microbatch, op.chunk), Op("BW", op.bwd_microbatch, op.bwd_chunk)]
    return [op]


def simulate(plan: Plan, costs: Costs = Costs()) -> Simulation:
    """Run ``plan`` under ``costs``; raise DeadlockError if the orders can never all complete."""
    done: Dict[Event, float] = {}
    position = [0] * plan.pp
    phase = [0] * plan.pp
    free_at = [0.0] * plan.pp
    timelines: List[List[Timed]] = [[] for _ in range(plan.pp)]
    remaining = sum(len(ops) for ops in plan.ranks)
    while remaining:
        progressed = False
        for rank, ops in enumerate(plan.ranks):
            # Each rank advances as far as its data allows; start times do not depend on the visiting order.
            while position[rank] < len(ops):
                op = ops[position[rank]]
                parts = _phases(op, costs)
                part = parts[phase[rank]]
                needs = needed(plan, rank, part)
                if any(e not in done for e in needs):
                    break
                start = max([free_at[rank]] + [done[e] for e in needs])
                end = start + costs.of(part) / plan.chunks
                for e in produced(plan, rank, part):
                    done[e] = end
                timelines[rank].append(Timed(op, start, end))
                free_at[rank] = end
                phase[rank] += 1
                if phase[rank] == len(parts):
                    position[rank], phase[rank] = position[rank] + 1, 0
                    remaining -= 1
                progressed = True
        if not progressed:
            raise DeadlockError(_deadlock_message(plan, position, done))
    return Simulation(plan, costs, tuple(tuple(line) for line in timelines))


def _deadlock_message(plan: Plan, position: List[int], done: Dict[Event, float]) -> str:
    waits = []
    for rank, ops in enumerate(plan.ranks):
        if position[rank] < len(ops):
            op = ops[position[rank]]
            missing = ", ".join(f"{k}{m}@stage{s}" for k, m, s in needed(plan, rank, op) if (k, m, s) not in done)
            waits.append(f"rank {rank} at {op} waits for {missing}")
    return f"{plan.schedule} deadlocks: " + "; ".join(waits)


def formula_bubble(schedule: str, pp: int, costs: Costs, chunks: int = 2) -> float:
    """Closed-form idle time per rank: 1F1B (P-1)(F+B), interleaved (P-1)(F+B)/V, DualPipeV (P/2-1)(F&B+B-3W).

    ``costs`` are per rank (see the module docstring); DualPipeV's formula counts
    chunk costs, which are half of them.
    """
    if schedule == "1f1b":
        return (pp - 1) * (costs.f + costs.b)
    if schedule == "interleaved":
        return (pp - 1) * (costs.f + costs.b) / chunks
    if schedule == "dualpipev":
        return (pp / 2 - 1) * (costs.fb + costs.b - 3 * costs.w) / 2
    raise ValueError(f"unknown schedule {schedule!r}")
