"""The DualPipeV schedule on two gloo processes with a one-linear-layer chunk per stage: each rank
runs exactly its plan's operations in order, and rank 0 returns every micro-batch's loss."""

import json
import os
import socket
import subprocess
import sys

import pytest

from npu_dsv3.schedules.plan import plan

PP, MICROBATCHES = 2, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank() -> None:
    """Child process: build two linear chunks, run one training step (and one forward-only pass)
    and print the executed operations and the number of losses as JSON."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    import npu_dsv3  # noqa: F401  (patches: megatron on CPU)
    from npu_dsv3.schedules.dualpipev import forward_backward_dualpipev

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=PP, virtual_pipeline_model_parallel_size=2)
    config = SimpleNamespace(
        hidden_size=4, pipeline_dtype=torch.float32, sequence_parallel=False, variable_seq_lengths=False,
        timers=None, enable_autocast=False, num_moe_experts=None, mtp_num_layers=None, calculate_per_token_loss=False,
        grad_scale_func=None, deallocate_pipeline_outputs=False, no_sync_func=None, grad_sync_func=None,
        finalize_model_grads_func=None)

    class Chunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.model_type, self.linear, self.input = config, None, torch.nn.Linear(4, 4), None

        def set_input_tensor(self, tensors):
            self.input = tensors[0]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        x = batch if model.input is None else model.input
        y = model.linear(x)
        return y, lambda out: (out.square().mean(), {"loss": out.detach().square().mean()})

    torch.manual_seed(0)
    model = [Chunk(), Chunk()]
    batches = [torch.randn(3, 1, 4) for _ in range(MICROBATCHES)]
    out = {}
    for forward_only in (False, True):
        executed = []
        losses = forward_backward_dualpipev(
            forward_step_func=forward_step, data_iterator=[iter(batches), iter(batches)], model=model,
            num_microbatches=MICROBATCHES, seq_length=3, micro_batch_size=1, forward_only=forward_only,
            executed=executed)
        out[str(forward_only)] = {"ops": [str(op) for op in executed], "losses": len(losses)}
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(PP),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(PP)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_each_rank_runs_its_plan_in_order(ranks):
    expected = plan("dualpipev", PP, MICROBATCHES, defer_weights=False)
    for rank, result in enumerate(ranks):
        assert result["False"]["ops"] == [str(op) for op in expected.ranks[rank]]


def test_forward_only_runs_the_plans_forwards(ranks):
    expected = plan("dualpipev", PP, MICROBATCHES, defer_weights=False)
    for rank, result in enumerate(ranks):
        forwards = [f"F{m}.{c}" for op in expected.ranks[rank] for m, c in op.forwards()]
        assert result["True"]["ops"] == forwards


def test_rank_0_computes_every_loss(ranks):
    assert [r["False"]["losses"] for r in ranks] == [MICROBATCHES, 0]
    assert [r["True"]["losses"] for r in ranks] == [MICROBATCHES, 0]


if __name__ == "__main__":
    run_rank()
