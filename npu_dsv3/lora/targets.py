"""LoRA target names: megatron's linear names (MindSpeed-LLM's ``--lora-target-modules`` values), the
aliases of MindSpeed's recipes, and the HF modules each one adapts.

A target is canonical when it names one kind of linear: an attention projection, ``output_layer``, or
``<scope>.linear_fc1`` / ``<scope>.linear_fc2`` with the scope ``mlp`` (dense layers), ``shared_experts``
or ``experts`` (routed experts). ``linear_fc1`` / ``linear_fc2`` alone mean all three scopes. Targets apply
to the MTP block's layer as to the decoder's.
"""

from typing import Dict, Iterable, Tuple

ATTENTION = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj")
MLP_SCOPES = ("mlp", "shared_experts", "experts")
MLP_LINEARS = ("linear_fc1", "linear_fc2")
OUTPUT_LAYER = "output_layer"
CANONICAL = ATTENTION + tuple(f"{s}.{fc}" for s in MLP_SCOPES for fc in MLP_LINEARS) + (OUTPUT_LAYER,)

# MindSpeed-LLM's names in its DeepSeek-V3 recipes. Its linear_qkv is MLA's two down-projections fused
# into one linear with one adapter; here each down-projection has its own (as in HF and PEFT).
ALIASES: Dict[str, Tuple[str, ...]] = {
    "linear_qkv": ("linear_q_down_proj", "linear_kv_down_proj"),
    "linear_qb": ("linear_q_up_proj",),
    "linear_kvb": ("linear_kv_up_proj",),
    **{fc: tuple(f"{s}.{fc}" for s in MLP_SCOPES) for fc in MLP_LINEARS},
}

# canonical target -> the HF modules (PEFT target_modules) or parameters (PEFT target_parameters) it adapts,
# relative to a decoder layer ``model.layers.N`` (``lm_head`` for the output layer).
HF_MODULES: Dict[str, Tuple[str, ...]] = {
    "linear_q_down_proj": ("self_attn.q_a_proj",),
    "linear_q_up_proj": ("self_attn.q_b_proj",),
    "linear_kv_down_proj": ("self_attn.kv_a_proj_with_mqa",),
    "linear_kv_up_proj": ("self_attn.kv_b_proj",),
    "linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2": ("mlp.down_proj.weight",),
    "shared_experts.linear_fc1": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "shared_experts.linear_fc2": ("mlp.shared_experts.down_proj.weight",),
    "experts.linear_fc1": ("mlp.experts.gate_up_proj",),
    "experts.linear_fc2": ("mlp.experts.down_proj",),
    OUTPUT_LAYER: ("lm_head",),
}


# The adapters' parameter names on the modules they adapt (``npu_dsv3.lora.layers``).
LORA_PARAMS = ("lora_A", "lora_B", "lora_fc1_A", "lora_fc1_B", "lora_fc2_A", "lora_fc2_B")


def is_lora_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


class TargetError(ValueError):
    """A --lora-target-modules name that names no linear of the model."""


def resolve(names: Iterable[str]) -> Tuple[str, ...]:
    """The canonical targets ``names`` stand for, in ``CANONICAL`` order."""
    out = set()
    for name in names:
        if name in ALIASES:
            out.update(ALIASES[name])
        elif name in CANONICAL:
            out.add(name)
        else:
            raise TargetError(f"--lora-target-modules {name}: not a linear of DeepSeek-V3; use "
                              f"{', '.join(CANONICAL)} or MindSpeed-LLM's {', '.join(ALIASES)}")
    return tuple(t for t in CANONICAL if t in out)


def present(config) -> Tuple[str, ...]:
    """The canonical targets that name at least one linear of the model ``config`` describes."""
    from npu_dsv3.config import moe_layer_pattern_of

    pattern = moe_layer_pattern_of(config)
    dense, moe = 0 in pattern, 1 in pattern or bool(config.mtp_num_layers and config.num_moe_experts)
    have = {t for t in ATTENTION if t != "linear_q_down_proj" or config.q_lora_rank is not None}
    if config.q_lora_rank is None:
        have.discard("linear_q_up_proj")  # the query is one linear_q_proj then
    have.add(OUTPUT_LAYER)
    for fc in MLP_LINEARS:
        if dense:
            have.add(f"mlp.{fc}")
        if moe:
            have.add(f"experts.{fc}")
            if config.moe_shared_expert_intermediate_size:
                have.add(f"shared_experts.{fc}")
    return tuple(t for t in CANONICAL if t in have)
