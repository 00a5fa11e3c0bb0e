"""``npu-dsv3 schedule``: print a pipeline schedule's per-rank order, simulated makespan and bubble."""

from __future__ import annotations

import argparse
import json

from npu_dsv3.argtypes import positive_int
from npu_dsv3.schedules.plan import SCHEDULES, plan
from npu_dsv3.schedules.simulator import Costs, formula_bubble, simulate


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "schedule",
        help="plan and simulate a pipeline schedule (1f1b, interleaved, dualpipev) without a model",
        description="Print each rank's operation order for a pipeline schedule, then simulate it with the "
        "given per-rank costs (zero communication cost) and print the makespan and bubble next to the "
        "closed-form bubble. Notation: F<mb>.<chunk> forward, BW full backward, B input-gradient backward "
        "with its weight gradient deferred to W, FB(<fwd>|<bwd>) an overlapped forward/backward pair.",
    )
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipev", help="the schedule (default %(default)s)")
    p.add_argument("--pipeline-model-parallel-size", type=positive_int, required=True, help="pipeline ranks")
    p.add_argument("--micro-batches", type=positive_int, required=True, help="micro-batches per step")
    p.add_argument("--virtual-chunks", type=int, default=2, help="chunks per rank for interleaved (default 2)")
    p.add_argument("--no-defer-weights", action="store_true",
                   help="dualpipev without zero-bubble weight-gradient deferral")
    p.add_argument("--cost-f", type=float, default=1.0, help="forward of one rank's layers (default 1)")
    p.add_argument("--cost-b", type=float, default=2.0, help="full backward of one rank's layers (default 2)")
    p.add_argument("--cost-w", type=float, default=1.0, help="weight-gradient part of --cost-b (default 1)")
    p.add_argument("--overlap", choices=("max", "sum"), default="max",
                   help="cost of an FB pair: max(F, B) or F + B (default max)")
    p.add_argument("--json", action="store_true", help="print JSON (orders, timelines, figures)")
    return p


def run(args: argparse.Namespace) -> int:
    costs = Costs(args.cost_f, args.cost_b, args.cost_w, args.overlap)
    the_plan = plan(args.schedule, args.pipeline_model_parallel_size, args.micro_batches,
                    args.virtual_chunks, defer_weights=not args.no_defer_weights)
    sim = simulate(the_plan, costs)
    formula = formula_bubble(args.schedule, the_plan.pp, costs, the_plan.chunks)
    if args.json:
        print(json.dumps({
            "schedule": the_plan.schedule, "pp": the_plan.pp, "micro_batches": the_plan.microbatches,
            "chunks": the_plan.chunks, "makespan": sim.makespan, "idle_per_rank": sim.mean_idle,
            "bubble_fraction": sim.bubble_fraction, "formula_idle_per_rank": formula,
            "ranks": [[{"op": str(t.op), "start": t.start, "end": t.end} for t in line]
                      for line in sim.timelines],
        }, indent=1))
        return 0
    for line in the_plan.describe():
        print(line)
    print(f"makespan {sim.makespan:g}; idle per rank {sim.mean_idle:g} (bubble {sim.bubble_fraction:.1%}); "
          f"formula idle per rank {formula:g}")
    return 0
