"""Process-group set-up shared by the tools that run a model in one process."""

import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from npu_dsv3 import backend


def ensure_single_process_group(seed: int = 1234) -> None:
    """Initialise a world of one (and megatron's parallel state) unless already done.

    megatron-core modules look up their TP/EP/PP groups at construction, so even a
    single-process model needs them. An in-process store claims no port and no file.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend.dist_backend(), store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1 and not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            f"a world of {dist.get_world_size()} processes is initialised without megatron's parallel "
            "state; call megatron.core.parallel_state.initialize_model_parallel first"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
