"""Tiny random HF DeepSeek-V3 checkpoints: the demo's embedded default and the tests' models.

The reference implementation is transformers' ``DeepseekV3ForCausalLM``; sizes
are odd on purpose (72 hidden, 3 heads, 12 experts in 3 groups, top-3) so that
shape and grouping bugs cannot hide behind powers of two.

The default init leaves RMSNorm weights at one and ``e_score_correction_bias`` at
zero, which hides norm and router-bias bugs, so both are randomised. The MTP
layer, which transformers does not build, is written as the released
checkpoints store it: ``model.layers.{num_hidden_layers}.*``.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

TINY_CONFIG = dict(
    vocab_size=203,
    hidden_size=72,
    intermediate_size=100,
    moe_intermediate_size=28,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
    n_routed_experts=12,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=3,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=40,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    max_position_embeddings=512,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=0,
    tie_word_embeddings=False,
    initializer_range=0.05,
)


def yarn(factor=4.0, mscale=1.0, mscale_all_dim=1.0, original=64):
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


def make_hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    kwargs = {**TINY_CONFIG, **overrides}
    torch.manual_seed(seed)
    config = DeepseekV3Config(**kwargs)
    # The per-expert loop is the plainest reference; transformers' default grouped_mm
    # kernel also rejects odd hidden sizes on CPU.
    config._experts_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.2 * torch.randn_like(module.e_score_correction_bias))
    return model


def cast_like_release(model: DeepseekV3ForCausalLM, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """``model`` in ``dtype`` except ``e_score_correction_bias``, which released checkpoints
    (and transformers' loading) keep in fp32."""
    model = model.to(dtype)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


def mtp_tensors(saved: dict, cfg, seed: int = 1) -> dict:
    """Random MTP-module tensors named as in the released checkpoint.

    ``saved`` holds the checkpoint's tensors as written (experts per expert).
    The transformer layer inside the MTP module is a copy of the last decoder
    layer with perturbed weights, so it is a real (MoE) DeepSeek-V3 layer.
    """
    gen = torch.Generator().manual_seed(seed)
    state = saved
    last, mtp = f"model.layers.{cfg.num_hidden_layers - 1}.", f"model.layers.{cfg.num_hidden_layers}."
    out = {}
    for name, value in state.items():
        if name.startswith(last):
            noise = 0.02 * torch.randn(value.shape, generator=gen, dtype=torch.float32)
            out[mtp + name[len(last):]] = (value.float() + noise).to(value.dtype)
    h = cfg.hidden_size
    out[mtp + "enorm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=gen)
    out[mtp + "hnorm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=gen)
    out[mtp + "eh_proj.weight"] = 0.05 * torch.randn(h, 2 * h, generator=gen)
    out[mtp + "shared_head.norm.weight"] = 1.0 + 0.3 * torch.randn(h, generator=gen)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out[mtp + "shared_head.head.weight"] = state[head].clone()
    out[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    return out


def save_hf(model: DeepseekV3ForCausalLM, path: str, with_mtp: bool = False) -> str:
    """Save like transformers does; with ``with_mtp`` add the MTP layer and declare it in config.json."""
    model.save_pretrained(path)
    if with_mtp:
        weights_file = os.path.join(path, "model.safetensors")
        tensors = load_file(weights_file)
        tensors.update(mtp_tensors(tensors, model.config))
        save_file(tensors, weights_file + ".tmp", metadata={"format": "pt"})
        os.replace(weights_file + ".tmp", weights_file)
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        config["num_nextn_predict_layers"] = 1
        with open(config_file + ".tmp", "w") as f:
            json.dump(config, f, indent=2)
        os.replace(config_file + ".tmp", config_file)
    return path
