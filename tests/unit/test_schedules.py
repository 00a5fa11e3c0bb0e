"""Pipeline schedule plans (1F1B, interleaved, DualPipeV) and their simulation, without a model."""

import json
from collections import Counter
from dataclasses import replace

import pytest

from npu_dsv3.cli import main
from npu_dsv3.schedules import Costs, DeadlockError, ScheduleError, formula_bubble, plan, simulate

DUALPIPEV_SIZES = [(p, m) for p in range(2, 9) for m in range(2 * p, 4 * p + 1)]


def _work_counts(the_plan):
    """How many forwards, input-gradient backwards and weight gradients each (micro-batch, stage) gets."""
    counts = Counter()
    for rank, ops in enumerate(the_plan.ranks):
        stage = the_plan.stages[rank]
        for op in ops:
            counts.update(("F", m, stage[c]) for m, c in op.forwards())
            counts.update(("B", m, stage[c]) for m, c in op.backwards())
            counts.update(("W", m, stage[c]) for m, c in op.weights())
    return counts


@pytest.mark.parametrize("defer", [True, False])
def test_dualpipev_is_complete_ordered_and_deadlock_free(defer):
    for p, m in DUALPIPEV_SIZES:
        the_plan = plan("dualpipev", p, m, defer_weights=defer)
        assert the_plan.stages == tuple((r, 2 * p - 1 - r) for r in range(p))
        expected = {(k, mb, s) for k in "FBW" for mb in range(m) for s in range(2 * p)}
        counts = _work_counts(the_plan)
        assert set(counts) == expected and set(counts.values()) == {1}, (p, m)
        kinds = {op.kind for ops in the_plan.ranks for op in ops}
        assert ("W" in kinds) == defer and ("B" in kinds) == defer
        for ops in the_plan.ranks:
            first = {}
            for i, op in enumerate(ops):
                for tag, works in (("F", op.forwards()), ("B", op.backwards()), ("W", op.weights())):
                    for w in works:
                        first.setdefault((tag, w), i)
            for (tag, w), i in first.items():
                if tag == "B":
                    assert first[("F", w)] < i, (p, m, w)
                if tag == "W":
                    assert first[("B", w)] <= i, (p, m, w)
        sim = simulate(the_plan)  # raises DeadlockError on a cycle
        assert all(len(line) == len(ops) for line, ops in zip(sim.timelines, the_plan.ranks))


def test_simulated_order_respects_data_dependencies():
    the_plan = plan("dualpipev", 4, 12)
    sim = simulate(the_plan)
    end, start = {}, {}
    for rank, line in enumerate(sim.timelines):
        stage = the_plan.stages[rank]
        previous_end = 0.0
        for t in line:
            assert t.start >= previous_end  # one op at a time, in plan order
            previous_end = t.end
            for tag, works in (("F", t.op.forwards()), ("B", t.op.backwards()), ("W", t.op.weights())):
                for m, c in works:
                    end[(tag, m, stage[c])] = t.end
                    start[(tag, m, stage[c])] = t.start
    last = the_plan.num_stages - 1
    for (tag, m, s), begin in start.items():
        if tag == "F" and s > 0:
            assert begin >= end[("F", m, s - 1)]
        if tag == "B":
            assert begin >= end[("F", m, s)]
            if s < last:
                assert begin >= end[("B", m, s + 1)]
        if tag == "W":
            assert begin >= start[("B", m, s)]


def test_dualpipev_rank0_holds_first_and_last_stage():
    the_plan = plan("dualpipev", 4, 8)
    assert the_plan.stages[0] == (0, 7)
    assert str(the_plan.ranks[0][0]) == "F0.0"
    assert any(op.kind == "FB" for op in the_plan.ranks[0])


@pytest.mark.parametrize("p", range(2, 9))
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_1f1b_bubble_matches_formula_exactly(p, factor):
    costs = Costs(1.0, 2.0, 1.0)
    sim = simulate(plan("1f1b", p, factor * p), costs)
    for rank in range(p):
        assert sim.idle(rank) == pytest.approx((p - 1) * 3.0)
    assert sim.mean_idle == pytest.approx(formula_bubble("1f1b", p, costs))


@pytest.mark.parametrize("p", [2, 4, 8])
def test_interleaved_bubble_matches_formula(p):
    costs = Costs()
    sim = simulate(plan("interleaved", p, 2 * p, chunks=2), costs)
    assert sim.mean_idle == pytest.approx(formula_bubble("interleaved", p, costs, 2))


def test_dualpipev_bubble_below_1f1b_and_interleaved_at_p4():
    for m in (8, 12, 16):
        dual = simulate(plan("dualpipev", 4, m))
        assert dual.bubble_fraction < simulate(plan("1f1b", 4, m)).bubble_fraction
        assert dual.bubble_fraction < simulate(plan("interleaved", 4, m)).bubble_fraction
        assert dual.mean_idle < formula_bubble("1f1b", 4, Costs())


@pytest.mark.parametrize("p", [2, 4, 8])
def test_fb_pair_without_overlap_runs_forward_then_backward(p):
    """As the executor runs it: the pair's forward part, then its backward part; the forward's
    output is ready when the forward part ends, so the pair never waits on its own rank's end."""
    costs = Costs(f=1.0, b=2.0, w=1.0, overlap="sum")
    sim = simulate(plan("dualpipev", p, 3 * p), costs)
    for line in sim.timelines:
        pairs = [t for t in line if t.op.kind == "FB"]
        assert len(pairs) % 2 == 0
        for forward, backward in zip(pairs[::2], pairs[1::2]):
            assert forward.op == backward.op
            assert forward.end - forward.start == pytest.approx(costs.f / 2)
            assert backward.end - backward.start == pytest.approx(costs.b / 2)
            assert forward.end <= backward.start
    assert sim.mean_idle >= formula_bubble("dualpipev", p, costs) - 1e-9


def test_broken_order_is_reported_as_deadlock_naming_the_ranks():
    the_plan = plan("1f1b", 2, 4)
    rank1 = list(the_plan.ranks[1])
    # Rank 1 starts with F0.0 BW0.0; doing the backward first waits for a forward it has not run yet.
    rank1[0], rank1[1] = rank1[1], rank1[0]
    broken = replace(the_plan, ranks=(the_plan.ranks[0], tuple(rank1)))
    with pytest.raises(DeadlockError) as err:
        simulate(broken)
    message = str(err.value)
    assert "rank 0 at" in message and "rank 1 at BW0.0 waits for F0@stage1" in message


def test_validation_errors():
    with pytest.raises(ScheduleError, match="pipeline-model-parallel-size"):
        plan("1f1b", 1, 4)
    with pytest.raises(ScheduleError, match="dualpipev needs --micro-batches"):
        plan("dualpipev", 4, 7)
    with pytest.raises(ScheduleError, match="multiple of"):
        plan("interleaved", 4, 6)
    with pytest.raises(ValueError, match="W <= B"):
        Costs(1, 1, 2)


def test_cli_prints_orders_and_figures(capsys):
    assert main(["schedule", "--schedule", "dualpipev", "--pipeline-model-parallel-size", "4",
                 "--micro-batches", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rank 0: F0.0 F1.0") and "FB(" in out[0]
    assert len(out) == 5 and out[4].startswith("makespan ") and "formula idle per rank 0.5" in out[4]

    assert main(["schedule", "--schedule", "1f1b", "--pipeline-model-parallel-size", "2",
                 "--micro-batches", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["idle_per_rank"] == data["formula_idle_per_rank"] == 3.0
    assert [t["op"] for t in data["ranks"][1]][:2] == ["F0.0", "BW0.0"]


def test_cli_validation_is_one_line(capsys):
    assert main(["schedule", "--pipeline-model-parallel-size", "4", "--micro-batches", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["npu-dsv3 schedule: error: dualpipev needs --micro-batches (7) >= 2 x "
                   "--pipeline-model-parallel-size = 8"]
