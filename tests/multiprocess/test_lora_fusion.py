"""Collectives LoRA adds on two gloo ranks (TP 2 + SP), counted at megatron's own collective helpers
(tensor_parallel.mappings) over a forward and backward of a whole model: with --lora-fusion a row-parallel
adapter adds its partial output before the base layer's one reduce-scatter, so none; unfused, each adapted
linear_proj adds one reduce-scatter forward and one all-gather backward. Column-parallel adapters (MLA's
up-projections, fc1) read the base layer's gathered input: none either."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import free_port

LAYERS = 2
# Every way megatron's tensor-parallel code reaches a collective: torch.distributed's functions, and the
# references its modules bound at import.
_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "_all_gather_base",
                "_reduce_scatter_base")
_BOUND = ("dist_all_gather_func", "dist_reduce_scatter_func")


def _count(variant: str) -> dict:
    """Collectives of one forward + backward of a tiny TP-2 model, by call site."""
    from megatron.core.tensor_parallel import layers, mappings

    from npu_dsv3.config import hf_to_mcore_config_dpskv3
    from npu_dsv3.model.builder import build_model
    from npu_dsv3.tiny_model import TINY_CONFIG

    hf = {**TINY_CONFIG, "model_type": "deepseek_v3", "num_hidden_layers": LAYERS, "num_attention_heads": 4,
          "num_key_value_heads": 4, "first_k_dense_replace": LAYERS, "rope_theta": 10000.0, "hidden_act": "silu",
          "rms_norm_eps": 1e-6, "max_position_embeddings": 64}
    targets = ("linear_q_up_proj", "linear_kv_up_proj", "mlp.linear_fc1") if variant == "column" else ("linear_proj",)
    lora = {} if variant == "base" else dict(lora_rank=4, lora_alpha=8.0, lora_targets=targets,
                                             lora_fusion=variant == "fused")
    config = hf_to_mcore_config_dpskv3(hf, tensor_model_parallel_size=2, sequence_parallel=True,
                                       use_cpu_initialization=True, **lora)
    torch.manual_seed(0)
    model = build_model(config)
    if variant == "base":  # the same frozen weights, with input gradients flowing through every layer as LoRA's do
        for p in model.parameters():
            p.requires_grad_(False)
        model.embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    sites = [(dist, name) for name in _COLLECTIVES] + [(m, name) for m in (layers, mappings) for name in _BOUND]
    originals = {(owner.__name__, name): getattr(owner, name) for owner, name in sites}
    counts = dict.fromkeys(originals, 0)

    def counting(key):
        def call(*args, **kwargs):
            counts[key] += 1
            return originals[key](*args, **kwargs)
        return call

    for owner, name in sites:
        setattr(owner, name, counting((owner.__name__, name)))
    try:
        ids = torch.randint(0, 203, (1, 16), generator=torch.Generator().manual_seed(1))
        out = model(ids, torch.arange(16).unsqueeze(0), None, labels=ids)
        out.sum().backward()
    finally:
        for owner, name in sites:
            setattr(owner, name, originals[(owner.__name__, name)])
    return {f"{owner}.{name}": n for (owner, name), n in counts.items() if n}


def _worker(rank: int, port: int, queue) -> None:
    import npu_dsv3  # noqa: F401  (patches)
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        result = {variant: _count(variant) for variant in ("base", "unfused", "fused", "column")}
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
    assert total["fused"] == total["base"] == total["column"], counts
    # unfused: per adapted linear_proj one reduce-scatter forward and one all-gather backward
    assert total["unfused"] - total["base"] == 2 * LAYERS, counts
    scatter = "megatron.core.tensor_parallel.mappings.dist_reduce_scatter_func"
    assert counts["unfused"][scatter] - counts["base"][scatter] == LAYERS
