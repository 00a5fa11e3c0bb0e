"""The DualPipeV executor on P gloo processes (every P from 2 to 8, every micro-batch count in
[2P, 4P]) with a one-linear-layer chunk per stage: each rank runs exactly its plan's operations in
order (the zero-bubble W steps included), rank 0 returns every micro-batch's loss, and the
gradients of the step, weight gradients deferred to the W steps, equal autograd's on the whole
model in one process; the same with each FB pair's halves on two threads (--moe-fb-overlap)."""

import json
import os
import subprocess
import sys

import pytest

from npu_dsv3.schedules.plan import plan

from support import free_port, process_env

pytestmark = pytest.mark.slow

HIDDEN = 4


def run_rank(pp: int) -> None:
    """Child process: build two linear chunks per rank; for every micro-batch count in [2P, 4P]
    run one training step and one forward-only pass; print the executed operations, the number
    of losses and the weight gradients as JSON (one object per micro-batch count)."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    import npu_dsv3  # noqa: F401  (patches: megatron on CPU)
    from npu_dsv3.ops import weight_grad
    from npu_dsv3.schedules.dualpipev import forward_backward_dualpipev

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=2)
    rank = dist.get_rank()
    config = SimpleNamespace(
        hidden_size=HIDDEN, pipeline_dtype=torch.float64, sequence_parallel=False, variable_seq_lengths=False,
        timers=None, enable_autocast=False, num_moe_experts=None, mtp_num_layers=None, calculate_per_token_loss=False,
        grad_scale_func=None, deallocate_pipeline_outputs=False, no_sync_func=None, grad_sync_func=None,
        finalize_model_grads_func=None, moe_fb_overlap=False)

    class Linear(torch.autograd.Function):
        """x @ w^T whose weight gradient a B step defers, as megatron's linear under the patch."""

        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.t()

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            grad_w = weight_grad.weight_gradient(
                w, lambda: grad.reshape(-1, HIDDEN).t() @ x.reshape(-1, HIDDEN))
            return grad @ w, grad_w

    class Chunk(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.config, self.model_type, self.input = config, None, None
            self.weight = torch.nn.Parameter(weight)

        def set_input_tensor(self, tensors):
            self.input = tensors[0]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        x = batch if model.input is None else model.input
        y = torch.tanh(Linear.apply(x, model.weight))
        return y, lambda out: (out.square().mean(), {"loss": out.detach().square().mean()})

    # Stage s's weight, the same on every rank: chunk 0 of rank r is stage r, chunk 1 stage 2P-1-r.
    weights = torch.randn(2 * pp, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = [Chunk(weights[rank].clone()), Chunk(weights[2 * pp - 1 - rank].clone())]
    results = {}
    for m in range(2 * pp, 4 * pp + 1):
        batches = list(torch.randn(m, 3, 1, HIDDEN, generator=torch.Generator().manual_seed(m), dtype=torch.float64))
        results[m] = {}
        # Sequential pairs, then each pair's forward and backward on two threads (--moe-fb-overlap).
        for mode in ("sequential", "overlapped"):
            config.moe_fb_overlap = mode == "overlapped"
            out = {}
            for chunk in model:
                chunk.weight.grad = None
            for forward_only in (False, True):
                executed = []
                losses = forward_backward_dualpipev(
                    forward_step_func=forward_step, data_iterator=[iter(batches), iter(batches)], model=model,
                    num_microbatches=m, seq_length=3, micro_batch_size=1, forward_only=forward_only,
                    executed=executed)
                out[str(forward_only)] = {"ops": [str(op) for op in executed], "losses": len(losses)}
            # The step's gradients (from the training pass above) against autograd on the whole model.
            grads = [torch.zeros_like(weights[0]) for _ in range(2 * pp)]
            mine = torch.stack([model[0].weight.grad if model[0].weight.grad is not None else grads[0],
                                model[1].weight.grad if model[1].weight.grad is not None else grads[0]])
            gathered = [torch.empty_like(mine) for _ in range(pp)]
            dist.all_gather(gathered, mine)
            for r, pair in enumerate(gathered):
                grads[r], grads[2 * pp - 1 - r] = pair[0], pair[1]
            reference = weights.clone().requires_grad_(True)
            total = 0
            for x in batches:
                for s in range(2 * pp):
                    x = torch.tanh(x @ reference[s].t())
                total = total + x.square().mean() / m
            total.backward()
            out["grad_max_abs_diff"] = (torch.stack(grads) - reference.grad).abs().max().item()
            out["grad_max_abs"] = reference.grad.abs().max().item()
            results[m][mode] = out
    print(json.dumps(results), flush=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=range(2, 9), ids=lambda p: f"pp{p}")
def ranks(request):
    """pp and every rank's results."""
    pp = request.param
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(pp),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(pp)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(pp)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return pp, [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


MODES = ("sequential", "overlapped")


def test_each_rank_runs_its_plan_in_order(ranks):
    pp, results = ranks
    for m in range(2 * pp, 4 * pp + 1):
        expected = plan("dualpipev", pp, m)
        assert any(op.kind == "W" for op in expected.ranks[0])
        for rank, result in enumerate(results):
            for mode in MODES:
                assert result[str(m)][mode]["False"]["ops"] == [str(op) for op in expected.ranks[rank]]


def test_forward_only_runs_the_plans_forwards(ranks):
    pp, results = ranks
    for m in range(2 * pp, 4 * pp + 1):
        expected = plan("dualpipev", pp, m)
        for rank, result in enumerate(results):
            forwards = [f"F{mb}.{c}" for op in expected.ranks[rank] for mb, c in op.forwards()]
            for mode in MODES:
                assert result[str(m)][mode]["True"]["ops"] == forwards


def test_rank_0_computes_every_loss(ranks):
    pp, results = ranks
    for m in range(2 * pp, 4 * pp + 1):
        for mode in MODES:
            assert [r[str(m)][mode]["False"]["losses"] for r in results] == [m] + [0] * (pp - 1)
            assert [r[str(m)][mode]["True"]["losses"] for r in results] == [m] + [0] * (pp - 1)


def test_gradients_equal_autograd_on_the_whole_model(ranks):
    """Deferred weight gradients, and pairs run sequentially or on two threads."""
    pp, results = ranks
    for m in range(2 * pp, 4 * pp + 1):
        for mode in MODES:
            result = results[0][str(m)][mode]
            assert result["grad_max_abs"] > 1e-3
            assert result["grad_max_abs_diff"] <= 1e-12 * result["grad_max_abs"] * 4 * pp, (m, mode, result)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]))
