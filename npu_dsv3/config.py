"""DeepSeek-V3 Hugging Face config <-> Megatron-Core ``MLATransformerConfig``.

``hf_to_mcore_config_dpskv3`` reads a DeepSeek-V3 ``config.json`` dict (the
transformers-4 form with ``rope_scaling`` or the transformers-5 form with
``rope_parameters``) and builds a validated megatron config; ``mcore_to_hf_config``
writes it back. The round trip is lossless for every key that changes the model.
Anything megatron cannot reproduce exactly is refused with an error naming the key,
never approximated silently.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale
from megatron.core.transformer.transformer_config import MLATransformerConfig

__all__ = [
    "DeepSeekV3TransformerConfig",
    "hf_to_mcore_config_dpskv3",
    "mcore_to_hf_config",
    "load_hf_config",
    "moe_layer_pattern_of",
    "padded_vocab_size",
]


@dataclass
class DeepSeekV3TransformerConfig(MLATransformerConfig):
    """MLATransformerConfig plus the DeepSeek-V3 facts megatron-core has no field for."""

    # kw_only lets these be required although every inherited field has a default.
    vocab_size: int = field(kw_only=True)
    """Vocabulary size (HF ``vocab_size``); GPTModel takes it as a constructor argument."""

    max_position_embeddings: int = field(kw_only=True)
    """Longest supported sequence (HF ``max_position_embeddings``)."""

    moe_router_norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (HF ``norm_topk_prob``)."""

    tie_word_embeddings: bool = False
    """Share input embedding and output layer (GPTModel's share_embeddings_and_output_weights)."""

    hf_torch_dtype: str = "bfloat16"
    """HF ``torch_dtype`` of the checkpoint, kept only to write it back."""

    bos_token_id: Optional[int] = None
    """HF ``bos_token_id``, kept for the tokenizer/data side and the reverse map."""

    eos_token_id: Optional[Union[int, List[int]]] = None
    """HF ``eos_token_id``, kept for the tokenizer/data side and the reverse map."""

    # Kernel choices (npu_dsv3.features maps each to its MindSpeed/Megatron flag).
    # True takes npu_dsv3.ops (torch_npu kernels on Ascend, the fastest portable
    # path elsewhere); False the plain unfused torch composition.
    use_flash_attn: bool = True
    """MLA core attention through ops.mla_attention instead of materialised scores."""

    mla_fa_without_pad: bool = False
    """On NPU, pass MLA's unequal q/k and v head dims to npu_fusion_attention unpadded (CANN >= 8.2.RC1)."""

    use_fused_rmsnorm: bool = True
    """RMSNorm through ops.rms_norm (npu_rms_norm on Ascend)."""

    use_fused_swiglu: bool = True
    """SwiGLU through ops.swiglu (npu_swiglu on Ascend)."""

    use_fused_rotary_pos_emb: bool = True
    """MLA's RoPE through ops.apply_rotary (npu_rotary_mul on Ascend)."""

    use_fused_permute: bool = True
    """MoE token permutation through ops.permute (npu_moe_token_permute on Ascend). Kept apart from
    megatron's ``moe_permute_fusion``, which selects TransformerEngine kernels."""

    # Pipeline placement (MindSpeed-LLM flags of the same names); npu_dsv3.model.placement turns
    # them, with the megatron PP / VPP sizes, into the npu_dsv3.layout.PipelineLayout the
    # checkpoint converter uses. ``num_layers`` counts real layers only.
    num_layer_list: Optional[List[int]] = None
    """``--num-layer-list``: decoder layers (noop layers included) on each pipeline rank."""

    noop_layers: Optional[List[int]] = None
    """``--noop-layers``: global indices (counting noop layers) of identity layers without weights."""

    schedules_method: Optional[str] = None
    """``--schedules-method``: ``"dualpipev"`` places 2 x PP stages as two chunks per rank."""

    moe_fb_overlap: bool = False
    """``--moe-fb-overlap``: DualPipeV runs each forward/backward pair's two halves concurrently
    (``npu_dsv3.schedules.fb_overlap``)."""

    mla_mm_split: bool = False
    """``--mla-mm-split``: MLA's q/kv up-projections as one column-parallel linear per part
    (linear_qk_nope, linear_qk_rope, linear_kv_nope, linear_v)."""

    moe_tp_extend_ep: bool = False
    """``--moe-tp-extend-ep``: each TP rank of an EP rank holds different whole experts;
    ``expert_model_parallel_size`` is then megatron's expert group, EP x TP, and expert TP is 1."""

    # LoRA (npu_dsv3.features.lora sets them from the flags; npu_dsv3.lora builds the adapters).
    lora_rank: int = 0
    """``--lora-r``; 0: no LoRA. Otherwise the base weights are frozen and ``lora_targets`` adapted."""

    lora_alpha: float = 32.0
    """``--lora-alpha``: the update is scaled by alpha / r."""

    lora_dropout: float = 0.0
    """``--lora-dropout``: dropout on the adapters' input."""

    lora_targets: Tuple[str, ...] = ()
    """Canonical targets (``npu_dsv3.lora.targets.CANONICAL``)."""

    lora_fusion: bool = False
    """``--lora-fusion``: a row-parallel adapter's partial output joins the base's before its reduction."""

    lora_seed: int = 1234
    """Seed of the adapters' initialisation (``--seed``), per adapter and HF name: layout-independent."""

    qlora: bool = False
    """``--qlora``: the targetable linears hold NF4 weights (``npu_dsv3.lora.nf4_base``), dequantized per GEMM."""


FP8_CAST_COMMAND = (
    "npu-dsv3 convert fp8-to-bf16 --input-fp8-hf-path <fp8-model-dir> "
    "--output-bf16-hf-path <bf16-model-dir>"
)

# Keys that fix the model's shape or routing and whose transformers defaults are the
# 671B values: a config that lacks one is almost surely a mistake, so refuse it.
_REQUIRED_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "max_position_embeddings", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
    "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
)
# transformers' DeepseekV3 has no such keys and always routes as DeepSeek-V3 does
# (sigmoid, noaux_tc, every layer past the dense ones is MoE); DeepSeek-V2 routes
# differently, so a deepseek_v2 config must spell them out.
_V3_ROUTING_DEFAULTS = {"topk_method": "noaux_tc", "scoring_func": "sigmoid",
                        "seq_aux": True, "moe_layer_freq": 1}

_YARN_KEYS = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "truncate", "partial_rotary_factor"}


VOCAB_DIVISIBLE_BY = 128
"""megatron's --make-vocab-size-divisible-by default."""


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron pads the embedding so every TP shard has the same, aligned number of rows."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def load_hf_config(path) -> dict:
    """Read ``config.json`` from an HF model directory or from the file itself."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no HF config found at {file!r}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file!r} is not a valid JSON config: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file!r} must hold a JSON object, got {type(config).__name__}")
    check_value_types(config, file)
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The JSON types of the keys npu_dsv3 reads (JSON has no other way to say 64 than 64: "64" and 64.0 are
# mistakes that would otherwise surface as a traceback deep in megatron). Keys marked nullable may be null.
_KEY_TYPES = {
    **{key: ("an integer", _is_int) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "max_position_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
        "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "moe_layer_freq",
        "num_nextn_predict_layers")},
    **{key: ("a number", lambda v: _is_int(v) or isinstance(v, float)) for key in (
        "rms_norm_eps", "initializer_range", "attention_dropout", "routed_scaling_factor", "rope_theta")},
    **{key: ("true or false", lambda v: isinstance(v, bool)) for key in (
        "norm_topk_prob", "tie_word_embeddings", "seq_aux", "attention_bias")},
    **{key: ("a string", lambda v: isinstance(v, str)) for key in (
        "model_type", "scoring_func", "topk_method", "hidden_act")},
}
_NULLABLE_KEYS = {"q_lora_rank", "num_key_value_heads", "n_group", "topk_group", "num_nextn_predict_layers",
                  "routed_scaling_factor"}


def check_value_types(hf: dict, where: str = "the HF config") -> None:
    """One line naming the first key whose value has the wrong JSON type."""
    for key, (kind, valid) in _KEY_TYPES.items():
        if key not in hf or (hf[key] is None and key in _NULLABLE_KEYS) or valid(hf[key]):
            continue
        raise ValueError(f"{where}: {key!r} must be {kind}, got {hf[key]!r} ({type(hf[key]).__name__})")


def moe_layer_pattern(num_layers: int, first_k_dense_replace: int, moe_layer_freq: int) -> List[int]:
    """Per-layer 0/1 list, 1 = MoE layer.

    DeepSeek's reference modeling code makes layer i MoE iff
    ``i >= first_k_dense_replace and i % moe_layer_freq == 0``. transformers 5 keeps only
    the first condition (it ignores moe_layer_freq); both agree for moe_layer_freq == 1,
    the value of every released DeepSeek-V2/V3 config.
    """
    if moe_layer_freq < 1:
        raise ValueError(f"moe_layer_freq must be >= 1, got {moe_layer_freq}")
    return [int(i >= first_k_dense_replace and i % moe_layer_freq == 0) for i in range(num_layers)]


def moe_layer_pattern_of(config) -> list:
    """1 for an MoE layer, 0 for a dense one, for every real (HF) layer of a megatron ``config``; noop layers
    have none."""
    freq = config.moe_layer_freq
    if not config.num_moe_experts:
        return [0] * config.num_layers
    if isinstance(freq, int):  # megatron's int form: MoE iff i % freq == 0
        return moe_layer_pattern(config.num_layers, 0, freq)
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq lists {len(freq)} layers, the model has {config.num_layers}")
    return list(freq)


def _dense_replace_and_freq(pattern, num_layers: int):
    """Inverse of moe_layer_pattern: the (first_k_dense_replace, moe_layer_freq) giving `pattern`."""
    if isinstance(pattern, int):  # megatron's own int form: MoE iff i % freq == 0
        pattern = moe_layer_pattern(num_layers, 0, pattern)
    pattern = [int(p) for p in pattern]
    if len(pattern) != num_layers:
        raise ValueError(f"moe_layer_freq has {len(pattern)} entries for {num_layers} layers")
    if 1 not in pattern:
        return num_layers, 1
    first = pattern.index(1)
    for freq in range(1, num_layers + 1):
        # first MoE layer is a multiple of freq, so first_k_dense_replace = first is canonical
        if first % freq == 0 and moe_layer_pattern(num_layers, first, freq) == pattern:
            return first, freq
    raise ValueError(
        f"moe_layer_freq {pattern} cannot be written as HF first_k_dense_replace + moe_layer_freq"
    )


def _rope_kwargs(hf: dict) -> dict:
    """Megatron RoPE fields from transformers-4 ``rope_scaling`` or transformers-5 ``rope_parameters``."""
    # transformers gives rope_scaling priority over rope_parameters; so do we.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(key) or {})
    unknown = set(rope) - _YARN_KEYS
    if unknown:
        raise ValueError(f"{key} has keys megatron-core cannot honour: {sorted(unknown)}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{key}.partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        # MLA computes its softmax scale from _yarn_get_mscale(rotary_scaling_factor,
        # mscale_all_dim) even for plain rope; factor 1 / mscale_all_dim 0 make that 1.
        return dict(rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0,
                    mscale=1.0, mscale_all_dim=0.0)
    if rope_type != "yarn":
        raise ValueError(f"{key} type {rope_type!r} is not supported (only default RoPE and yarn)")
    if rope.get("truncate", True) is not True:
        raise ValueError(f"{key}.truncate=False is not supported: megatron rounds the yarn range")

    # Defaults below are the ones transformers' _compute_yarn_parameters and
    # standardize_rope_params use when a key is absent.
    max_pos = hf["max_position_embeddings"]
    orig = hf.get("original_max_position_embeddings",
                  rope.get("original_max_position_embeddings") or max_pos)
    factor = rope.get("factor") or max_pos / orig
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    # Megatron scales cos/sin by get(f, mscale) / get(f, mscale_all_dim); transformers does
    # the same only when both are set, else get(f, 1). Absent mscale=1 / mscale_all_dim=0
    # make megatron match; a config where they still disagree is refused, not approximated.
    m_mscale = 1.0 if mscale is None else mscale
    m_mscale_all_dim = 0.0 if mscale_all_dim is None else mscale_all_dim
    megatron_factor = _yarn_get_mscale(factor, m_mscale) / _yarn_get_mscale(factor, m_mscale_all_dim)
    hf_factor = rope.get("attention_factor")
    if hf_factor is None:
        hf_factor = (_yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_get_mscale(factor))
    if not math.isclose(hf_factor, megatron_factor, rel_tol=1e-9):
        raise ValueError(
            f"{key}: transformers' YaRN attention factor {hf_factor} differs from megatron-core's "
            f"{megatron_factor} for mscale={mscale}, mscale_all_dim={mscale_all_dim}, "
            f"attention_factor={rope.get('attention_factor')}; give both mscale and mscale_all_dim"
        )
    return dict(
        rope_type="yarn", rotary_base=theta, rotary_scaling_factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
        mscale=m_mscale, mscale_all_dim=m_mscale_all_dim,
    )


def _check_source(hf: dict) -> None:
    if "quantization_config" in hf:
        raise ValueError(
            "this is DeepSeek's FP8 checkpoint config (it has quantization_config); cast the "
            f"checkpoint to BF16 first with `{FP8_CAST_COMMAND}` and use the BF16 directory"
        )
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"model_type must be 'deepseek_v3' (or a complete 'deepseek_v2'), "
                         f"got {model_type!r}")
    required = _REQUIRED_KEYS + (tuple(_V3_ROUTING_DEFAULTS) if model_type == "deepseek_v2" else ())
    for key in required:
        if key not in hf:
            raise ValueError(f"HF config ({model_type}) is missing required key {key!r}")
    check_value_types(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hf['hidden_act']!r}")
    if hf.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported: DeepSeek-V3 linears have no bias")
    if hf.get("rope_interleave", True) is not True:
        # megatron's MLA always de-interleaves the rope dims, i.e. rope_interleave=True
        raise ValueError("rope_interleave=False is not supported by megatron-core MLA")
    if not hf["n_routed_experts"]:
        raise ValueError("n_routed_experts must be >= 1 for a DeepSeek-V3 model")


def _init_field_names():
    return {f.name for f in dataclasses.fields(DeepSeekV3TransformerConfig) if f.init}


def hf_to_mcore_config_dpskv3(hf_config: dict, **overrides) -> DeepSeekV3TransformerConfig:
    """Build a DeepSeekV3TransformerConfig from an HF DeepSeek-V3 config dict.

    ``overrides`` set any field (parallel sizes, dtypes, num_layers for tests, ...) and win
    over the HF values; megatron validates the result once in ``__post_init__``.
    """
    hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    _check_source(hf)
    unknown = sorted(set(overrides) - _init_field_names())
    if unknown:
        raise TypeError(f"unknown DeepSeekV3TransformerConfig override(s): {', '.join(unknown)}")
    if hf["model_type"] == "deepseek_v3":
        hf = {**_V3_ROUTING_DEFAULTS, **hf}

    scoring, topk_method = hf["scoring_func"], hf["topk_method"]
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {scoring!r}")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {topk_method!r} is not supported")
    # "greedy" ignores groups, and a single group limits nothing: both are plain top-k.
    grouped = topk_method != "greedy" and (hf["n_group"] or 1) > 1
    shared = hf["n_shared_experts"] * hf["moe_intermediate_size"]
    seq_aux = bool(hf["seq_aux"])
    mtp = hf.get("num_nextn_predict_layers") or 0
    dtype = hf.get("torch_dtype", hf.get("dtype")) or "bfloat16"

    kwargs = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
        attention_dropout=hf.get("attention_dropout", 0.0),
        hidden_dropout=0.0,  # HF has no hidden dropout; megatron's default 0.1 breaks parity
        normalization="RMSNorm",
        gated_linear_unit=True,  # hidden_act silu => SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,  # MLA's q_a_layernorm / kv_a_layernorm; megatron builds Identity without it
        # portable path; features switch fused kernels on explicitly
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # megatron's MLP applies the activation module of the layer spec (our SwiGLU)
        # only under this flag; its name is TE's, the code path is not.
        use_te_activation_func=True,
        params_dtype=torch.float32,
        # MLA
        multi_latent_attention=True,
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        **_rope_kwargs(hf),
        # MoE
        num_moe_experts=hf["n_routed_experts"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_num_groups=hf["n_group"] if grouped else None,
        moe_router_group_topk=hf["topk_group"] if grouped else None,
        moe_router_score_function=scoring,
        moe_router_enable_expert_bias=topk_method == "noaux_tc",
        moe_router_bias_update_rate=1e-3,
        moe_router_norm_topk_prob=bool(hf["norm_topk_prob"]),
        moe_router_topk_scaling_factor=hf["routed_scaling_factor"],
        # softmax without renormalisation (DeepSeek-V2) = softmax over all experts, then top-k;
        # megatron's default softmax over the top-k logits is the renormalised variant.
        moe_router_pre_softmax=scoring == "softmax" and not hf["norm_topk_prob"],
        moe_router_dtype="fp32",
        moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="seq_aux_loss" if seq_aux else "none",
        moe_aux_loss_coeff=1e-4,  # DeepSeek-V3 report's sequence-wise balance alpha
        # model-level facts
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mtp_num_layers=mtp or None,
        mtp_loss_scaling_factor=0.1,
        hf_torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    kwargs.update(overrides)
    if "moe_layer_freq" not in overrides:
        # derived from the final num_layers so a num_layers override gets a matching list
        kwargs["moe_layer_freq"] = moe_layer_pattern(
            kwargs["num_layers"], hf["first_k_dense_replace"], hf["moe_layer_freq"])
    return DeepSeekV3TransformerConfig(**kwargs)


def mcore_to_hf_config(config) -> dict:
    """transformers-compatible DeepSeek-V3 config dict for a DeepSeekV3TransformerConfig."""
    if config.activation_func is not F.silu or not config.gated_linear_unit:
        raise ValueError("only SwiGLU (gated_linear_unit + F.silu) maps to HF hidden_act 'silu'")
    if config.add_bias_linear or config.add_qkv_bias:
        raise ValueError("linear biases have no HF DeepSeek-V3 equivalent")
    if not config.num_moe_experts:
        raise ValueError("num_moe_experts must be set for a DeepSeek-V3 model")
    first_k, freq = _dense_replace_and_freq(config.moe_layer_freq, config.num_layers)
    shared = config.moe_shared_expert_intermediate_size or 0
    if shared % config.moe_ffn_hidden_size:
        raise ValueError(f"moe_shared_expert_intermediate_size {shared} is not a multiple of "
                         f"moe_ffn_hidden_size {config.moe_ffn_hidden_size}")
    if config.moe_router_enable_expert_bias:
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if config.moe_router_num_groups else "greedy"
    balancing = config.moe_router_load_balancing_type
    balancing = balancing if isinstance(balancing, list) else [balancing]

    hf = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "intermediate_size": config.ffn_hidden_size,
        "max_position_embeddings": config.max_position_embeddings,
        # transformers 5 configs are strict dataclasses: float fields refuse ints
        "rms_norm_eps": float(config.layernorm_epsilon),
        "initializer_range": float(config.init_method_std),
        "attention_dropout": config.attention_dropout,
        "attention_bias": False,
        "hidden_act": "silu",
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_head_dim,
        "qk_rope_head_dim": config.qk_pos_emb_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_routed_experts": config.num_moe_experts,
        "num_experts_per_tok": config.moe_router_topk,
        "moe_intermediate_size": config.moe_ffn_hidden_size,
        "n_shared_experts": shared // config.moe_ffn_hidden_size,
        "first_k_dense_replace": first_k,
        "moe_layer_freq": freq,
        "n_group": config.moe_router_num_groups or 1,
        "topk_group": config.moe_router_group_topk or 1,
        "topk_method": topk_method,
        "scoring_func": config.moe_router_score_function,
        "norm_topk_prob": config.moe_router_norm_topk_prob,
        "routed_scaling_factor": float(config.moe_router_topk_scaling_factor or 1.0),
        "seq_aux": "seq_aux_loss" in balancing,
        "num_nextn_predict_layers": config.mtp_num_layers or 0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rotary_base,
        "torch_dtype": config.hf_torch_dtype,
    }
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(config, key) is not None:
            hf[key] = getattr(config, key)
    if config.rope_type == "yarn":
        hf["rope_scaling"] = {
            "type": "yarn", "rope_type": "yarn",  # transformers 4 reads "type", 5 "rope_type"
            "factor": config.rotary_scaling_factor,
            "original_max_position_embeddings": config.original_max_position_embeddings,
            "beta_fast": config.beta_fast,
            "beta_slow": config.beta_slow,
            "mscale": config.mscale,
            "mscale_all_dim": config.mscale_all_dim,
        }
    elif config.rope_type == "rope":
        if _yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim) != 1.0:
            raise ValueError("plain rope with rotary_scaling_factor/mscale_all_dim that scale the "
                             "softmax has no HF equivalent; set mscale_all_dim=0")
    else:
        raise ValueError(f"rope_type {config.rope_type!r} has no HF DeepSeek-V3 equivalent")
    return hf
