"""--lora-fusion on two gloo ranks (TP 2 + SP): a row-parallel adapter adds its partial output before the base
layer's one reduce-scatter, so the layer issues no more collectives than without LoRA; unfused, each adapted
linear_proj adds one reduce-scatter forward and one all-gather backward. Counted at megatron's own
collective helpers (tensor_parallel.mappings), per forward and backward of a whole model."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import free_port

LAYERS = 2
_HELPERS = ("_reduce", "_reduce_scatter_along_first_dim", "_gather_along_first_dim", "_split_along_first_dim")


def _count(variant: str) -> dict:
    """Collectives of one forward + backward of a tiny TP-2 model, by megatron helper."""
    from megatron.core.tensor_parallel import mappings

    from npu_dsv3.config import hf_to_mcore_config_dpskv3
    from npu_dsv3.model.builder import build_model
    from npu_dsv3.tiny_model import TINY_CONFIG

    hf = {**TINY_CONFIG, "model_type": "deepseek_v3", "num_hidden_layers": LAYERS, "num_attention_heads": 4,
          "num_key_value_heads": 4, "first_k_dense_replace": LAYERS, "rope_theta": 10000.0, "hidden_act": "silu",
          "rms_norm_eps": 1e-6, "max_position_embeddings": 64}
    lora = {} if variant == "base" else dict(lora_rank=4, lora_alpha=8.0, lora_targets=("linear_proj",),
                                             lora_fusion=variant == "fused")
    config = hf_to_mcore_config_dpskv3(hf, tensor_model_parallel_size=2, sequence_parallel=True,
                                       use_cpu_initialization=True, **lora)
    torch.manual_seed(0)
    model = build_model(config)
    for p in model.parameters():
        p.requires_grad_(True)  # every input gradient flows, as in training
    counts = dict.fromkeys(_HELPERS, 0)
    originals = {name: getattr(mappings, name) for name in _HELPERS}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in _HELPERS:
        setattr(mappings, name, counting(name))
    try:
        ids = torch.randint(0, 203, (1, 16), generator=torch.Generator().manual_seed(1))
        out = model(ids, torch.arange(16).unsqueeze(0), None, labels=ids)
        out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(mappings, name, fn)
    return counts


def _worker(rank: int, port: int, queue) -> None:
    import npu_dsv3  # noqa: F401  (patches)
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        result = {variant: _count(variant) for variant in ("base", "unfused", "fused")}
        if rank == 0:
            queue.put(json.dumps(result))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.slow
def test_fusion_adds_no_collective():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(free_port(), queue), nprocs=2, join=True)
    counts = json.loads(queue.get())
    total = {variant: sum(c.values()) for variant, c in counts.items()}
    assert total["fused"] == total["base"], counts
    # unfused: per adapted linear_proj one reduce-scatter forward and one all-gather backward
    assert total["unfused"] - total["base"] == 2 * LAYERS, counts
    assert (counts["unfused"]["_reduce_scatter_along_first_dim"]
            - counts["base"]["_reduce_scatter_along_first_dim"]) == LAYERS
