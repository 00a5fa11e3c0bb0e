"""HF DeepSeek-V3 config <-> Megatron-Core config mapping (npu_dsv3.config)."""

import copy
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale

from npu_dsv3.config import (
    DeepSeekV3TransformerConfig,
    hf_to_mcore_config_dpskv3,
    load_hf_config,
    mcore_to_hf_config,
)

from support import RELEASED_CONFIG

FIXTURE = RELEASED_CONFIG

# Keys of the released config.json that do not change the model and are not written back:
# bookkeeping (transformers_version), inference switches (use_cache), the unused
# pretraining_tp / ep_size, and quantization_config (refused; the BF16 cast drops it).
NO_MODEL_MEANING = {"transformers_version", "use_cache", "pretraining_tp", "ep_size",
                    "quantization_config"}


def released_bf16():
    cfg = json.loads(FIXTURE.read_text())
    del cfg["quantization_config"]
    return cfg


def tiny(**changes):
    """A small DeepSeek-V3 config in the transformers-4 (released) form."""
    cfg = {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 8, "n_routed_experts": 8, "num_experts_per_tok": 4,
        "moe_intermediate_size": 32, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "seq_aux": True, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "rope_theta": 10000, "rope_scaling": {
            "type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
    }
    cfg.update(changes)
    return cfg


def comparable(config):
    """All fields of a config; init methods are functools.partial objects, which compare by
    identity, so compare what they do instead."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, functools.partial):
            value = (value.func, value.args, value.keywords)
        out[f.name] = value
    return out


def assert_same_config(a, b):
    ca, cb = comparable(a), comparable(b)
    assert {k: (ca[k], cb[k]) for k in ca if ca[k] != cb[k]} == {}


def hf_round_trip_expected(cfg):
    """What mcore_to_hf_config must give back for an input in the released form."""
    expected = {k: v for k, v in cfg.items() if k not in NO_MODEL_MEANING}
    if expected.get("rope_scaling"):  # written with both spellings of the type key
        expected["rope_scaling"] = {**expected["rope_scaling"], "rope_type": "yarn"}
    else:  # no scaling is written as an absent key, not null
        expected.pop("rope_scaling", None)
    return expected


# --- the released DeepSeek-V3 config -------------------------------------------------------

def test_released_fp8_config_is_refused_with_cast_command():
    with pytest.raises(ValueError, match="quantization_config") as err:
        hf_to_mcore_config_dpskv3(load_hf_config(FIXTURE))
    assert "npu-dsv3 convert fp8-to-bf16 --input-fp8-hf-path" in str(err.value)
    assert "--output-bf16-hf-path" in str(err.value)


def test_released_config_maps_every_field():
    c = hf_to_mcore_config_dpskv3(released_bf16())
    assert isinstance(c, DeepSeekV3TransformerConfig)
    # dense part
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.num_query_groups) == (7168, 61, 128, 128)
    assert c.ffn_hidden_size == 18432
    assert c.layernorm_epsilon == 1e-6 and c.init_method_std == 0.02
    assert c.attention_dropout == 0.0 and c.hidden_dropout == 0.0
    assert c.gated_linear_unit and c.activation_func is F.silu
    assert not c.add_bias_linear and not c.add_qkv_bias
    assert c.normalization == "RMSNorm" and c.qk_layernorm
    assert not (c.bias_activation_fusion or c.bias_dropout_fusion or c.apply_rope_fusion
                or c.masked_softmax_fusion or c.gradient_accumulation_fusion or c.persist_layer_norm)
    assert c.params_dtype == torch.float32 and not c.bf16 and c.hf_torch_dtype == "bfloat16"
    # MLA
    assert c.multi_latent_attention
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    assert (c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (128, 64, 128)
    # YaRN
    assert c.rope_type == "yarn" and c.rotary_base == 10000
    assert c.rotary_scaling_factor == 40 and c.original_max_position_embeddings == 4096
    assert (c.beta_fast, c.beta_slow) == (32, 1)
    assert (c.mscale, c.mscale_all_dim) == (1.0, 1.0)
    # MoE
    assert c.moe_layer_freq == [0, 0, 0] + [1] * 58
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (256, 8, 2048)
    assert c.moe_shared_expert_intermediate_size == 2048
    assert (c.moe_router_num_groups, c.moe_router_group_topk) == (8, 4)
    assert c.moe_router_score_function == "sigmoid"
    assert c.moe_router_enable_expert_bias and c.moe_router_bias_update_rate == 1e-3
    assert c.moe_router_norm_topk_prob and not c.moe_router_pre_softmax
    assert c.moe_router_topk_scaling_factor == 2.5
    assert c.moe_router_dtype == "fp32"
    assert c.moe_grouped_gemm and c.moe_token_dispatcher_type == "alltoall"
    assert c.moe_router_load_balancing_type == "seq_aux_loss" and c.moe_aux_loss_coeff == 1e-4
    # model level
    assert c.mtp_num_layers == 1 and c.mtp_loss_scaling_factor == 0.1
    assert c.vocab_size == 129280 and c.max_position_embeddings == 163840
    assert c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id) == (0, 1)


def test_released_config_round_trips_hf_mcore_hf():
    cfg = released_bf16()
    assert mcore_to_hf_config(hf_to_mcore_config_dpskv3(cfg)) == hf_round_trip_expected(cfg)


@pytest.mark.parametrize("make", [released_bf16, tiny], ids=["released", "tiny"])
def test_round_trips_mcore_hf_mcore(make):
    config = hf_to_mcore_config_dpskv3(make())
    again = hf_to_mcore_config_dpskv3(mcore_to_hf_config(config))
    assert_same_config(config, again)


def test_written_config_is_accepted_by_transformers():
    hf = mcore_to_hf_config(hf_to_mcore_config_dpskv3(released_bf16()))
    t = transformers.DeepseekV3Config(**hf)
    assert t.first_k_dense_replace == 3 and t.n_routed_experts == 256
    assert (t.n_group, t.topk_group, t.num_experts_per_tok) == (8, 4, 8)
    assert t.rope_parameters["rope_type"] == "yarn" and t.rope_parameters["factor"] == 40
    assert t.rope_parameters["mscale_all_dim"] == 1.0 and t.rope_parameters["rope_theta"] == 10000
    assert t.num_nextn_predict_layers == 1 and t.q_lora_rank == 1536


# --- variants -------------------------------------------------------------------------------

def test_q_lora_rank_null():
    cfg = tiny(q_lora_rank=None)
    c = hf_to_mcore_config_dpskv3(cfg)
    assert c.q_lora_rank is None
    hf = mcore_to_hf_config(c)
    assert "q_lora_rank" in hf and hf["q_lora_rank"] is None
    assert hf == hf_round_trip_expected(cfg)
    transformers.DeepseekV3Config(**hf)


@pytest.mark.parametrize("first_k, freq, pattern", [
    (0, 1, [1, 1, 1, 1, 1, 1]),
    (1, 1, [0, 1, 1, 1, 1, 1]),
    (2, 1, [0, 0, 1, 1, 1, 1]),
    (0, 2, [1, 0, 1, 0, 1, 0]),
    (2, 2, [0, 0, 1, 0, 1, 0]),
    (6, 1, [0, 0, 0, 0, 0, 0]),
])
def test_moe_layer_patterns_round_trip(first_k, freq, pattern):
    cfg = tiny(first_k_dense_replace=first_k, moe_layer_freq=freq)
    c = hf_to_mcore_config_dpskv3(cfg)
    assert c.moe_layer_freq == pattern
    hf = mcore_to_hf_config(c)
    assert (hf["first_k_dense_replace"], hf["moe_layer_freq"]) == (first_k, freq)
    assert hf == hf_round_trip_expected(cfg)


def test_ambiguous_moe_pattern_is_written_canonically():
    # DeepSeek's rule: layer i is MoE iff i >= k and i % freq == 0; k=1 and k=2 with freq 2
    # give the same layers, and the converter writes the canonical k=2.
    c = hf_to_mcore_config_dpskv3(tiny(first_k_dense_replace=1, moe_layer_freq=2))
    assert c.moe_layer_freq == [0, 0, 1, 0, 1, 0]
    hf = mcore_to_hf_config(c)
    assert (hf["first_k_dense_replace"], hf["moe_layer_freq"]) == (2, 2)
    assert_same_config(c, hf_to_mcore_config_dpskv3(hf))


def test_unrepresentable_moe_pattern_is_refused():
    c = hf_to_mcore_config_dpskv3(tiny(), moe_layer_freq=[0, 1, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        mcore_to_hf_config(c)
    c = hf_to_mcore_config_dpskv3(tiny(), moe_layer_freq=[0, 1, 1])
    with pytest.raises(ValueError, match="3 entries for 6 layers"):
        mcore_to_hf_config(c)


def test_transformers5_rope_parameters_form():
    hf = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 16, "beta_slow": 2, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "rope_theta": 5000.0},
    ).to_dict()
    assert "rope_scaling" not in hf and "rope_theta" not in hf  # really the v5 form
    c = hf_to_mcore_config_dpskv3(hf)
    assert c.rope_type == "yarn" and c.rotary_base == 5000.0
    assert c.rotary_scaling_factor == 4.0 and c.original_max_position_embeddings == 64
    assert (c.beta_fast, c.beta_slow, c.mscale, c.mscale_all_dim) == (16, 2, 0.707, 0.707)
    assert c.q_lora_rank is None and c.moe_layer_freq == [0, 1, 1, 1, 1]
    # keys transformers' DeepseekV3Config does not have get DeepSeek-V3's routing
    assert c.moe_router_score_function == "sigmoid" and c.moe_router_enable_expert_bias
    assert (c.moe_router_num_groups, c.moe_router_group_topk) == (4, 2)
    assert c.moe_shared_expert_intermediate_size == 32
    assert_same_config(c, hf_to_mcore_config_dpskv3(mcore_to_hf_config(c)))


def test_transformers5_default_rope_is_plain_rope():
    hf = transformers.DeepseekV3Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8,
        n_group=2, topk_group=1, num_experts_per_tok=2, intermediate_size=96,
        moe_intermediate_size=32).to_dict()
    assert hf["rope_parameters"]["rope_type"] == "default"
    c = hf_to_mcore_config_dpskv3(hf)
    assert c.rope_type == "rope" and c.rotary_base == 10000.0


def test_plain_rope_keeps_softmax_scale_unscaled():
    cfg = tiny(rope_scaling=None)
    c = hf_to_mcore_config_dpskv3(cfg)
    assert c.rope_type == "rope"
    assert c.rotary_scaling_factor == 1.0 and c.mscale_all_dim == 0
    # megatron's MLA computes softmax_scale with this even for plain rope
    assert _yarn_get_mscale(c.rotary_scaling_factor, c.mscale_all_dim) == 1.0
    hf = mcore_to_hf_config(c)
    assert "rope_scaling" not in hf and hf["rope_theta"] == 10000
    assert hf == hf_round_trip_expected(cfg)


def test_plain_rope_with_scaled_softmax_is_not_written():
    c = hf_to_mcore_config_dpskv3(tiny(rope_scaling=None), rotary_scaling_factor=40.0,
                                  mscale_all_dim=1.0)
    with pytest.raises(ValueError, match="mscale_all_dim"):
        mcore_to_hf_config(c)


def test_yarn_absent_keys_take_transformers_defaults():
    c = hf_to_mcore_config_dpskv3(tiny(rope_scaling={"rope_type": "yarn", "factor": 4}))
    assert (c.beta_fast, c.beta_slow) == (32, 1)
    assert (c.mscale, c.mscale_all_dim) == (1.0, 0.0)
    assert c.original_max_position_embeddings == 512  # max_position_embeddings
    # no factor: transformers uses max_position_embeddings / original_max_position_embeddings
    c = hf_to_mcore_config_dpskv3(tiny(rope_scaling={
        "type": "yarn", "original_max_position_embeddings": 128, "mscale": 1, "mscale_all_dim": 1}))
    assert c.rotary_scaling_factor == 4


def test_yarn_where_transformers_and_megatron_disagree_is_refused():
    # transformers ignores mscale unless mscale_all_dim is also set; megatron does not
    with pytest.raises(ValueError, match="attention factor"):
        hf_to_mcore_config_dpskv3(tiny(rope_scaling={"type": "yarn", "factor": 4, "mscale": 0.5}))


@pytest.mark.parametrize("rope", [
    {"type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "yarn", "factor": 4, "low_freq_factor": 1},
])
def test_unsupported_rope_is_refused(rope):
    with pytest.raises(ValueError, match="rope_scaling"):
        hf_to_mcore_config_dpskv3(tiny(rope_scaling=rope))


def test_softmax_greedy_routing():
    cfg = tiny(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
               norm_topk_prob=False, n_group=1, topk_group=1, seq_aux=False)
    c = hf_to_mcore_config_dpskv3(cfg)
    assert c.moe_router_score_function == "softmax" and not c.moe_router_enable_expert_bias
    assert c.moe_router_num_groups is None and c.moe_router_group_topk is None
    # no renormalisation: softmax over all experts, then top-k
    assert c.moe_router_pre_softmax and not c.moe_router_norm_topk_prob
    assert c.moe_router_load_balancing_type == "none"
    hf = mcore_to_hf_config(c)
    assert (hf["topk_method"], hf["n_group"], hf["topk_group"], hf["seq_aux"]) == ("greedy", 1, 1, False)
    assert_same_config(c, hf_to_mcore_config_dpskv3(hf))


def test_group_limited_greedy_keeps_groups():
    c = hf_to_mcore_config_dpskv3(tiny(scoring_func="softmax", topk_method="group_limited_greedy"))
    assert (c.moe_router_num_groups, c.moe_router_group_topk) == (4, 2)
    assert not c.moe_router_enable_expert_bias
    assert mcore_to_hf_config(c)["topk_method"] == "group_limited_greedy"


# --- overrides ------------------------------------------------------------------------------

def test_overrides_win():
    c = hf_to_mcore_config_dpskv3(
        tiny(), tensor_model_parallel_size=2, sequence_parallel=True, params_dtype=torch.bfloat16,
        bf16=True, num_layers=3, moe_router_bias_update_rate=1e-2, moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="aux_loss", mtp_loss_scaling_factor=0.3)
    assert c.tensor_model_parallel_size == 2 and c.sequence_parallel
    assert c.params_dtype == torch.bfloat16 and c.bf16
    assert c.num_layers == 3 and c.moe_layer_freq == [0, 1, 1]  # pattern follows num_layers
    assert c.moe_router_bias_update_rate == 1e-2 and c.moe_aux_loss_coeff == 0.0
    assert c.moe_router_load_balancing_type == "aux_loss" and c.mtp_loss_scaling_factor == 0.3


def test_unknown_override_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="tensor_parallel_sizee"):
        hf_to_mcore_config_dpskv3(tiny(), tensor_parallel_sizee=2)


def test_megatron_validation_still_runs():
    # num_attention_heads 4 is not divisible by TP 3: megatron's __post_init__ refuses it
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        hf_to_mcore_config_dpskv3(tiny(), tensor_model_parallel_size=3)


# --- refused inputs ---------------------------------------------------------------------------

def test_bad_activation_names_the_key():
    with pytest.raises(ValueError, match="hidden_act"):
        hf_to_mcore_config_dpskv3(tiny(hidden_act="gelu"))


@pytest.mark.parametrize("key", ["hidden_size", "q_lora_rank", "first_k_dense_replace",
                                 "n_group", "model_type"])
def test_missing_key_names_the_key(key):
    cfg = tiny()
    del cfg[key]
    with pytest.raises(ValueError, match=repr(key) if key != "model_type" else key):
        hf_to_mcore_config_dpskv3(cfg)


def test_attention_bias_is_refused():
    with pytest.raises(ValueError, match="attention_bias"):
        hf_to_mcore_config_dpskv3(tiny(attention_bias=True))


def test_other_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type"):
        hf_to_mcore_config_dpskv3(tiny(model_type="llama"))


def test_incomplete_deepseek_v2_is_refused():
    cfg = tiny(model_type="deepseek_v2")
    del cfg["topk_method"]
    with pytest.raises(ValueError, match="'topk_method'"):
        hf_to_mcore_config_dpskv3(cfg)


def test_non_interleaved_rope_is_refused():
    with pytest.raises(ValueError, match="rope_interleave"):
        hf_to_mcore_config_dpskv3(tiny(rope_interleave=False))


def test_input_dict_is_not_modified():
    cfg = tiny()
    before = copy.deepcopy(cfg)
    hf_to_mcore_config_dpskv3(cfg)
    assert cfg == before


# --- load_hf_config ---------------------------------------------------------------------------

def test_load_hf_config_from_dir_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny()))
    assert load_hf_config(tmp_path) == tiny()
    assert load_hf_config(str(tmp_path / "config.json")) == tiny()


def test_load_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_hf_config(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="not a valid JSON"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_hf_config(tmp_path)
