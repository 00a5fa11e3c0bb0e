"""megatron's interleaved pipeline schedule on two pipeline ranks x two model chunks, with the
point-to-point mode training sets: per-stage weight gradients and losses equal autograd on the
unsplit model, for micro-batches of one length and of different lengths. With two ranks the
previous and the next rank are one peer, which each steady-state exchange could confuse.
This file is also the script each gloo process runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from support import free_port, process_env

HIDDEN, STAGES, MICROBATCHES = 6, 4, 4


def _problem(variable: bool):
    """Per-stage weights, and each micro-batch's input and loss weights [length, 1, HIDDEN]."""
    generator = torch.Generator().manual_seed(5)
    weights = torch.randn(STAGES, HIDDEN, generator=generator)
    lengths = [3, 5, 4, 6] if variable else [4] * MICROBATCHES
    inputs = [torch.randn(n, 1, HIDDEN, generator=generator) for n in lengths]
    targets = [torch.randn(n, 1, HIDDEN, generator=generator) for n in lengths]
    return weights, inputs, targets


def _stage(h, weight):
    return torch.tanh(h * weight + 0.5)


def _reference(variable: bool):
    """(loss per micro-batch, gradient per stage) of the whole model in one process."""
    weights, inputs, targets = _problem(variable)
    weights.requires_grad_(True)
    losses = []
    for x, target in zip(inputs, targets):
        h = x
        for s in range(STAGES):
            h = _stage(h, weights[s])
        losses.append((h * target).sum())
    (torch.stack(losses).sum() / MICROBATCHES).backward()
    return [loss.item() for loss in losses], weights.grad.tolist()


def _schedule(variable: bool) -> dict:
    """This rank's chunk gradients (by global stage) and losses from megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from npu_dsv3.training.step import pipeline_p2p

    class Stage(MegatronModule):
        model_type = ModelType.encoder_or_decoder

        def __init__(self, config, weight):
            super().__init__(config)
            self.weight = torch.nn.Parameter(weight.clone())
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x):
            return _stage(x if self.input_tensor is None else self.input_tensor, self.weight)

    # The alltoall dispatcher: megatron refuses variable lengths with its default one.
    config = TransformerConfig(num_layers=STAGES, hidden_size=HIDDEN, num_attention_heads=1,
                               pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                               pipeline_dtype=torch.float32, variable_seq_lengths=variable,
                               moe_token_dispatcher_type="alltoall")
    pipeline_p2p(config)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    weights, inputs, targets = _problem(variable)
    stages = [c * 2 + rank for c in range(2)]  # VPP: chunk c of rank r is stage c * PP + r
    chunks = [Stage(config, weights[s]) for s in stages]
    batches = [{"x": x, "target": t} for x, t in zip(inputs, targets)]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)

        def loss_func(output):
            loss = (output * batch["target"]).sum()
            # A copy: the schedule divides the loss it backpropagates in place.
            return loss, {"loss": loss.detach().clone()}

        return model(batch["x"]), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(batches) for _ in chunks], model=chunks,
        num_microbatches=MICROBATCHES, seq_length=max(x.shape[0] for x in inputs), micro_batch_size=1)
    return {"stages": stages, "grads": [c.weight.grad.tolist() for c in chunks],
            "losses": [x["loss"].item() for x in losses]}


def _run_worker() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from npu_dsv3 import backend

    dist.init_process_group(backend.dist_backend())
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    results = {name: _schedule(variable) for name, variable in (("fixed", False), ("variable", True))}
    dist.destroy_process_group()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def ranks():
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.parametrize("name", ["fixed", "variable"])
def test_interleaved_schedule_on_two_ranks_equals_the_unsplit_model(ranks, name):
    losses, grads = _reference(name == "variable")
    first, last = ranks[0][name], ranks[1][name]
    assert first["losses"] == []  # the head is on the last rank's last chunk
    assert last["losses"] == pytest.approx(losses, rel=1e-6)
    for rank in (first, last):
        for stage, grad in zip(rank["stages"], rank["grads"]):
            assert grad == pytest.approx(grads[stage], rel=1e-6, abs=1e-7), f"stage {stage}"


if __name__ == "__main__":
    _run_worker()
