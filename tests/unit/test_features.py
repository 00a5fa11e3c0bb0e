"""Kernel features: every switch gives transformers' logits both ways, and the switch really switches."""

import argparse

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

import npu_dsv3.model.patches as model_patches
from npu_dsv3.features import FEATURES, add_feature_args, all_features, feature_overrides
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.model.experts import GroupedExperts
from npu_dsv3.ops.attention import mla_attention, reference_attention
from npu_dsv3.ops.rms_norm import reference_rms_norm, rms_norm
from npu_dsv3.tiny_model import make_hf_model, save_hf, yarn
from npu_dsv3.verify import compare_logits

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model(seed=31, rope_parameters=yarn())
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("features")))


def _ids(n=2, seq=33, seed=0):
    return torch.randint(0, 203, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("off", ["all"] + [f.field for f in FEATURES if f.field != "mla_fa_without_pad"])
def test_parity_with_feature_off(tiny, off):
    hf, path = tiny
    overrides = all_features(False) if off == "all" else {off: False}
    ids = _ids()
    with torch.no_grad():
        result = compare_logits(forward_logits(load_hf(path, **overrides), ids), hf(ids).logits, TOLERANCE)
    assert result["passed"], result


def test_switches_select_the_paths(tiny):
    _, path = tiny
    on, off = load_hf(path), load_hf(path, **all_features(False))
    layer_on, layer_off = on.decoder.layers[1], off.decoder.layers[1]
    assert layer_on.self_attention.core_attention.attention_fn is mla_attention
    assert layer_off.self_attention.core_attention.attention_fn is reference_attention
    assert layer_on.input_layernorm.norm_fn is rms_norm and layer_off.input_layernorm.norm_fn is reference_rms_norm
    assert isinstance(layer_on.mlp.experts, GroupedExperts) and isinstance(layer_off.mlp.experts, SequentialMLP)


@pytest.mark.parametrize("field,spied", [
    ("use_fused_rotary_pos_emb", "apply_rotary"),
    ("use_fused_permute", "ops_permute"),
])
def test_patched_megatron_calls_follow_the_config(tiny, monkeypatch, field, spied):
    """The patched megatron call sites reach our op only when the model's config asks."""
    _, path = tiny
    calls = []
    real = getattr(model_patches, spied)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_patches, spied, spy)
    with torch.no_grad():
        forward_logits(load_hf(path, **{field: False}), _ids(1, 9))
        assert calls == []
        forward_logits(load_hf(path, **{field: True}), _ids(1, 9))
    assert calls


def test_gradients_match_between_fused_and_unfused(tiny):
    _, path = tiny
    grads = []
    for enabled in (True, False):
        model = load_hf(path, **{**all_features(enabled), "moe_grouped_gemm": True}).train()
        ids = _ids(2, 17, seed=3)
        loss = model(ids, torch.arange(17).expand(2, 17), None, labels=torch.roll(ids, -1, 1)).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_and_sequential_experts_agree_on_gradients(tiny):
    _, path = tiny
    ids = _ids(2, 17, seed=4)
    per_expert = []
    for grouped in (True, False):
        model = load_hf(path, moe_grouped_gemm=grouped).train()
        model(ids, torch.arange(17).expand(2, 17), None, labels=torch.roll(ids, -1, 1)).mean().backward()
        experts = model.decoder.layers[1].mlp.experts
        if grouped:
            hidden = model.config.hidden_size
            w2 = experts.weight2.grad.view(experts.num_local_experts, -1, hidden)
            per_expert.append([w2[e].t() for e in range(experts.num_local_experts)])
        else:
            per_expert.append([m.linear_fc2.weight.grad for m in experts.local_experts])
    for grouped_grad, sequential_grad in zip(*per_expert):
        torch.testing.assert_close(grouped_grad, sequential_grad, rtol=1e-4, atol=1e-6)


def test_flags_are_off_unless_given():
    parser = argparse.ArgumentParser()
    add_feature_args(parser)
    assert not any(feature_overrides(parser.parse_args([])).values())
    args = parser.parse_args(["--use-flash-attn", "--moe-grouped-gemm", "--moe-permute-fusion"])
    overrides = feature_overrides(args)
    assert overrides["use_flash_attn"] and overrides["moe_grouped_gemm"] and overrides["use_fused_permute"]
    assert not overrides["use_fused_rmsnorm"]
