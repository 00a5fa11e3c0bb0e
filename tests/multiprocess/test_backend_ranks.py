"""The CPU adapter under two gloo processes: megatron-core's tensor-parallel collectives, its RNG tracker
and the alltoall dispatcher's uneven gathers run on the CPU backend."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import npu_dsv3

from support import free_port

on_cpu_backend = pytest.mark.skipif(
    npu_dsv3.backend() != "cpu", reason="the CPU adapter is only applied on the cpu backend"
)


def _tp2_worker(rank: int, port: int) -> None:
    # A fresh spawned interpreter: importing npu_dsv3 applies the adapter here too.
    import npu_dsv3  # noqa: F401
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        group = parallel_state.get_tensor_model_parallel_group()
        assert parallel_state.get_tensor_model_parallel_rank() == rank
        t = torch.full((3,), float(rank + 1), device="cuda")
        dist.all_reduce(t, group=group)
        assert torch.equal(t, torch.full((3,), 3.0)), t
        # megatron's own TP mapping: forward all-reduce
        out = tensor_parallel.reduce_from_tensor_model_parallel_region(torch.full((2,), float(rank)))
        assert torch.equal(out, torch.ones(2)), out
        # and the RNG tracker differs per TP rank
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            mask = F.dropout(torch.ones(64), 0.5)
        masks = [torch.empty(64) for _ in range(2)]
        dist.all_gather(masks, mask, group=group)
        assert not torch.equal(masks[0], masks[1])
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@on_cpu_backend
def test_megatron_tp2_all_reduce_two_processes():
    mp.spawn(_tp2_worker, args=(free_port(),), nprocs=2, join=True)


def _uneven_gather_worker(rank: int, port: int) -> None:
    import npu_dsv3  # noqa: F401
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        group = parallel_state.get_tensor_model_parallel_group()
        sizes = [3, 1]  # what the alltoall dispatcher gathers under TP x EP: each rank's own token count
        rows = torch.arange(8.0).view(4, 2)
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        x = rows[mine].clone().requires_grad_()
        out = tensor_parallel.gather_from_sequence_parallel_region(x, group=group, output_split_sizes=sizes)
        assert torch.equal(out, rows), out
        # backward is megatron's reduce-scatter of the gathered rows' gradients back to their owners
        (out * rows * (rank + 1)).sum().backward()
        assert torch.equal(x.grad, (rows * 3)[mine]), x.grad
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@on_cpu_backend
def test_megatron_gathers_uneven_sizes_on_gloo():
    mp.spawn(_uneven_gather_worker, args=(free_port(),), nprocs=2, join=True)
