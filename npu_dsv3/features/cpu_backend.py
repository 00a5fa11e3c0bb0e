"""The CPU backend adapter: megatron-core's torch.cuda calls made to run on the CPU (cpu backend only).

Why each item exists, and what it deliberately does not emulate, is in ``npu_dsv3.backend``'s
docstring; the replacements are there too.
"""

from typing import List

NAME = "backend-cpu"
TESTS = "tests/unit/test_backend.py"
ALWAYS_ON = True
# First: the CUDA->CPU device mode must be active before the other features' targets are resolved,
# which imports megatron modules that may allocate "cuda" tensors at import.
APPLY_FIRST = True


def patches() -> List:
    from npu_dsv3 import backend as b
    from npu_dsv3.patching import Patch

    def cpu(target: str, replacement, why: str, name: str = "", wrap: bool = False) -> Patch:
        return Patch(name=name or f"{NAME}.{target.rsplit('.', 1)[-1]}", feature=NAME, target=target,
                     replacement=replacement, why=why, backends=("cpu",), wrap=wrap)

    return [
        cpu("torch.cuda.current_device", b.cpu_current_device,
            "megatron allocates with device=torch.cuda.current_device(): make that the CPU"),
        cpu("torch.cuda.synchronize", b.noop, "CPU ops are synchronous; megatron calls it around collectives/timers"),
        cpu("torch.cuda.empty_cache", b.noop, "no CUDA caching allocator on CPU"),
        cpu("torch.cuda.Stream", b.CpuStream,
            "megatron builds side streams for comm/compute overlap; one serial CPU stream"),
        cpu("torch.cuda.current_stream", b.cpu_current_stream, "return the single CPU stream"),
        cpu("torch.cuda.default_stream", b.cpu_current_stream, "return the single CPU stream"),
        cpu("torch.cuda.stream", b.cpu_stream_context,
            "`with torch.cuda.stream(s)` is a no-op on the single CPU stream"),
        cpu("torch.cuda.Event", b.CpuEvent, "events used for sync/timing: complete when recorded, wall-clock timing"),
        cpu("torch.cuda.get_rng_state", b.cuda_get_rng_state,
            "CUDA RNG tracker state = CPU generator state (CPU dropout draws from it)"),
        cpu("torch.cuda.set_rng_state", b.cuda_set_rng_state, "CUDA RNG tracker state = CPU generator state"),
        cpu("torch.cuda.manual_seed", b.cuda_manual_seed,
            "model_parallel_cuda_manual_seed seeds 'the CUDA generator': seed the CPU one (else silently ignored)"),
        cpu("megatron.core.tensor_parallel.random._get_cuda_rng_state", b.megatron_get_cuda_rng_state,
            "megatron's RNG tracker reads the CUDA generator: read the CPU one"),
        cpu("megatron.core.tensor_parallel.random._set_cuda_rng_state", b.megatron_set_cuda_rng_state,
            "megatron's setter queues a lazy CUDA call that never runs on CPU: set the CPU generator now"),
        cpu("torch.Tensor.record_stream", b.record_stream,
            "MoE dispatcher records D2H copies on a side stream; no CPU kernel and nothing to record"),
        cpu("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu", b.host_copy,
            "the alltoall dispatcher's split sizes must be host arrays, as its device-to-host copy makes them on GPU"),
        cpu("megatron.core.tensor_parallel.mappings._gather_along_first_dim", b.gather_uneven_first_dim,
            "gloo's all_gather needs equal sizes; the TP x EP alltoall dispatcher gathers uneven token counts: "
            "pad to the largest, gather, slice", name=f"{NAME}.gather_along_first_dim_uneven", wrap=True),
        cpu("torch.cuda.nvtx.range_push", b.nvtx_noop, "NVTX profiling ranges: no-op without CUDA"),
        cpu("torch.cuda.nvtx.range_pop", b.nvtx_noop, "NVTX profiling ranges: no-op without CUDA"),
        cpu("npu_dsv3.backend.cuda_to_cpu.mode", b.CudaToCpuMode(),
            "device='cuda' literals, .cuda(), .to('cuda') -> CPU; CPU tensors report torch.cuda.* type() names",
            name=f"{NAME}.cuda-device-args"),
    ]
