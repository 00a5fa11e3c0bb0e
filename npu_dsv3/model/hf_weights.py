"""HF DeepSeek-V3 tensor names <-> megatron-core state-dict names (one rank, TP=EP=1).

Each megatron tensor is built from one or more HF tensors: fused [gate; up]
projections are concatenated, routed experts are stacked into the grouped-GEMM
layout. Real checkpoints store the MTP module as layer ``num_hidden_layers``.
"""

from typing import Callable, Dict, Iterator, List, Tuple

import torch

from npu_dsv3.model.spec import moe_layer_pattern

Rule = Tuple[str, List[str], Callable[[List[torch.Tensor]], torch.Tensor]]


def _single(ts):
    return ts[0]


def _cat_rows(ts):
    return torch.cat(ts, dim=0)


def _experts_fc1(num_experts: int):
    # GroupedMLP's weight1 is [hidden, E * 2 * ffn] viewed as [E, hidden, 2 * ffn].
    def combine(ts):
        gates, ups = ts[:num_experts], ts[num_experts:]
        per_expert = [torch.cat([g, u], dim=0).t() for g, u in zip(gates, ups)]
        stacked = torch.stack(per_expert).contiguous()
        return stacked.view(stacked.shape[1], -1)

    return combine


def _experts_fc2(ts):
    # GroupedMLP's weight2 is [E * ffn, hidden] viewed as [E, ffn, hidden].
    stacked = torch.stack([t.t() for t in ts]).contiguous()
    return stacked.view(-1, stacked.shape[-1])


def _layer_rules(config, mc: str, hf: str, moe: bool) -> Iterator[Rule]:
    attn = f"{hf}.self_attn"
    yield f"{mc}.input_layernorm.weight", [f"{hf}.input_layernorm.weight"], _single
    if config.q_lora_rank is None:
        yield f"{mc}.self_attention.linear_q_proj.weight", [f"{attn}.q_proj.weight"], _single
    else:
        yield f"{mc}.self_attention.linear_q_down_proj.weight", [f"{attn}.q_a_proj.weight"], _single
        yield f"{mc}.self_attention.q_layernorm.weight", [f"{attn}.q_a_layernorm.weight"], _single
        yield f"{mc}.self_attention.linear_q_up_proj.weight", [f"{attn}.q_b_proj.weight"], _single
    yield f"{mc}.self_attention.linear_kv_down_proj.weight", [f"{attn}.kv_a_proj_with_mqa.weight"], _single
    yield f"{mc}.self_attention.kv_layernorm.weight", [f"{attn}.kv_a_layernorm.weight"], _single
    yield f"{mc}.self_attention.linear_kv_up_proj.weight", [f"{attn}.kv_b_proj.weight"], _single
    yield f"{mc}.self_attention.linear_proj.weight", [f"{attn}.o_proj.weight"], _single
    yield f"{mc}.pre_mlp_layernorm.weight", [f"{hf}.post_attention_layernorm.weight"], _single
    mlp = f"{hf}.mlp"
    if not moe:
        yield f"{mc}.mlp.linear_fc1.weight", [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"], _cat_rows
        yield f"{mc}.mlp.linear_fc2.weight", [f"{mlp}.down_proj.weight"], _single
        return
    experts = range(config.num_moe_experts)
    yield f"{mc}.mlp.router.weight", [f"{mlp}.gate.weight"], _single
    if config.moe_router_enable_expert_bias:
        yield f"{mc}.mlp.router.expert_bias", [f"{mlp}.gate.e_score_correction_bias"], _single
    if config.moe_grouped_gemm:
        yield (
            f"{mc}.mlp.experts.weight1",
            [f"{mlp}.experts.{e}.gate_proj.weight" for e in experts]
            + [f"{mlp}.experts.{e}.up_proj.weight" for e in experts],
            _experts_fc1(config.num_moe_experts),
        )
        yield f"{mc}.mlp.experts.weight2", [f"{mlp}.experts.{e}.down_proj.weight" for e in experts], _experts_fc2
    else:  # megatron's SequentialMLP: one MLP per expert
        for e in experts:
            local, hf_expert = f"{mc}.mlp.experts.local_experts.{e}", f"{mlp}.experts.{e}"
            yield (
                f"{local}.linear_fc1.weight",
                [f"{hf_expert}.gate_proj.weight", f"{hf_expert}.up_proj.weight"],
                _cat_rows,
            )
            yield f"{local}.linear_fc2.weight", [f"{hf_expert}.down_proj.weight"], _single
    if config.moe_shared_expert_intermediate_size:
        shared = f"{mlp}.shared_experts"
        yield (
            f"{mc}.mlp.shared_experts.linear_fc1.weight",
            [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"],
            _cat_rows,
        )
        yield f"{mc}.mlp.shared_experts.linear_fc2.weight", [f"{shared}.down_proj.weight"], _single


def hf_to_mcore_rules(config) -> Iterator[Rule]:
    """(mcore name, HF source names, combine) for every tensor of the full model."""
    yield "embedding.word_embeddings.weight", ["model.embed_tokens.weight"], _single
    pattern = moe_layer_pattern(config)
    for i, moe in enumerate(pattern):
        yield from _layer_rules(config, f"decoder.layers.{i}", f"model.layers.{i}", bool(moe))
    yield "decoder.final_layernorm.weight", ["model.norm.weight"], _single
    if not config.tie_word_embeddings:
        yield "output_layer.weight", ["lm_head.weight"], _single
    for d in range(config.mtp_num_layers or 0):
        hf = f"model.layers.{config.num_layers + d}"
        mc = f"mtp.layers.{d}"
        yield f"{mc}.enorm.weight", [f"{hf}.enorm.weight"], _single
        yield f"{mc}.hnorm.weight", [f"{hf}.hnorm.weight"], _single
        yield f"{mc}.eh_proj.weight", [f"{hf}.eh_proj.weight"], _single
        yield f"{mc}.final_layernorm.weight", [f"{hf}.shared_head.norm.weight"], _single
        yield from _layer_rules(config, f"{mc}.transformer_layer", hf, bool(config.num_moe_experts))


def hf_to_mcore_state_dict(config, get: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Assemble the mcore state dict, reading each HF tensor through ``get(name)``."""
    return {name: combine([get(s) for s in sources]) for name, sources, combine in hf_to_mcore_rules(config)}
