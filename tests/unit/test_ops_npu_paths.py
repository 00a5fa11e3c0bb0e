"""The NPU code paths (``npu_*`` in ``npu_dsv3.ops``) on CPU tensors, against the portable paths.

``torch_npu`` is the tests-only EMULATION in ``tests/support/npu_emulation.py`` (fixture
``fake_torch_npu``): plain torch implementing the documented semantics and
rejecting what the documentation rules out. These tests prove our calling
conventions (argument names, cumulative counts, layouts, masks, padding,
dtypes, shapes) match the documented API. They say nothing about NPU numerics;
``tests/unit/test_npu_smoke.py`` (``-m npu``) does that on hardware.
"""

import functools
import math

import pytest
import torch

from npu_dsv3.ops.attention import mla_attention, npu_mla_attention
from npu_dsv3.ops.gmm import gmm, group_list, npu_gmm
from npu_dsv3.ops.permute import _topk_indices, npu_permute, npu_unpermute, permute, unpermute
from npu_dsv3.ops.rms_norm import npu_rms_norm, rms_norm
from npu_dsv3.ops.rotary import apply_rotary, npu_apply_rotary
from npu_dsv3.ops.swiglu import npu_swiglu, swiglu

from support import npu_emulation, op_asserts

# The NPU path must also return the portable path's dtype.
assert_close = functools.partial(op_asserts.assert_close, same_dtype=True)
DTYPES = [torch.float32, torch.bfloat16]


def _pair(t):
    """Two independent leaves with the same values: one for the NPU path, one for the portable path."""
    return t.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)


def _calls(name):
    return [details for called, details in npu_emulation.calls if called == name]


# --------------------------------------------------------------------------- gmm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[3, 0, 5, 0], [0, 1, 0], [0, 0, 7, 0], [2, 9, 1, 4, 0, 3]],
                         ids=["zero_token_experts", "one_token", "all_on_one_expert", "uneven"])
def test_npu_gmm_matches_portable(fake_torch_npu, dtype, counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    x_npu, x_ref = _pair(torch.randn(int(counts.sum()), 16, dtype=dtype))
    w_npu, w_ref = _pair((torch.randn(len(counts), 16, 24) / 4).to(dtype))

    out = npu_gmm(x_npu, w_npu, counts)
    ref = gmm(x_ref, w_ref, counts)
    assert_close(out, ref, dtype, what="npu_gmm forward")
    g = torch.randn(out.shape, dtype=dtype)
    dx, dw = torch.autograd.grad(out, (x_npu, w_npu), g)
    rdx, rdw = torch.autograd.grad(ref, (x_ref, w_ref), g)
    assert_close(dx, rdx, dtype, tol_scale=2, what="npu_gmm dx")
    assert_close(dw, rdw, dtype, tol_scale=2, what="npu_gmm dW")

    cumulative = torch.cumsum(counts, 0).tolist()
    made = _calls("npu_grouped_matmul")
    assert [c["group_type"] for c in made] == [0, 0, 2], "forward and dx split M, dW splits K"
    assert all(c["group_list"] == cumulative and c["group_list_type"] == 0 for c in made)
    assert made[2]["x_shape"] == (16, int(counts.sum())), "dW takes x^T [K, M]"


def test_npu_gmm_backward_accepts_an_expanded_upstream_gradient(fake_torch_npu):
    """``out.sum().backward()`` hands the backward a stride-0 gradient; the kernel takes row-major x only."""
    counts = torch.tensor([2, 0, 3])
    x_npu, x_ref = _pair(torch.randn(5, 8))
    w_npu, w_ref = _pair(torch.randn(3, 8, 4))
    npu_gmm(x_npu, w_npu, counts).sum().backward()
    gmm(x_ref, w_ref, counts).sum().backward()
    assert_close(x_npu.grad, x_ref.grad, torch.float32)
    assert_close(w_npu.grad, w_ref.grad, torch.float32)


def test_group_list_is_the_cumulative_count():
    assert group_list(torch.tensor([3, 0, 5, 0])).tolist() == [3, 3, 8, 8]
    assert group_list(torch.tensor([3, 0, 5, 0])).dtype == torch.int64


def test_emulated_grouped_matmul_rejects_wrong_conventions(fake_torch_npu):
    """Per-expert counts where cumulative ends are expected must fail, as on hardware."""
    x, w = torch.randn(8, 4), torch.randn(3, 4, 2)
    ok = fake_torch_npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 3, 8]), split_item=3, group_type=0)
    assert ok[0].shape == (8, 2)
    with pytest.raises(ValueError, match="non-decreasing"):  # counts [3, 0, 5] passed as if cumulative
        fake_torch_npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 0, 5]), split_item=3, group_type=0)
    with pytest.raises(ValueError, match="end at the rows"):  # counts [1, 2, 5]: monotone, wrong total
        fake_torch_npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([1, 2, 5]), split_item=3, group_type=0)
    with pytest.raises(ValueError, match="length 1"):  # group_list_type 1 (counts) forbids length 1
        fake_torch_npu.npu_grouped_matmul([x], [w[:1]], group_list=torch.tensor([8]), split_item=3, group_type=0,
                                          group_list_type=1)
    with pytest.raises(TypeError):  # Tensor[] arguments, not bare tensors
        fake_torch_npu.npu_grouped_matmul(x, w, group_list=torch.tensor([3, 3, 8]), split_item=3, group_type=0)
    with pytest.raises(ValueError, match="group_type"):
        fake_torch_npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 3, 8]), split_item=3)
    with pytest.raises(ValueError, match="transposed"):
        fake_torch_npu.npu_grouped_matmul([x.t().contiguous().t()], [w], group_list=torch.tensor([3, 3, 8]),
                                          split_item=3, group_type=0)
    # torch_npu has no npu_gmm (MindSpeed's name); the emulation does not pretend otherwise.
    assert not hasattr(fake_torch_npu, "npu_gmm")


# --------------------------------------------------------------------------- attention


def _qkv(seq, batch, heads, dqk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(seq, batch, heads, d, generator=g).to(dtype) for d in (dqk, dqk, dv)]


def _attention_pair(seq, batch, heads, dqk, dv, dtype, causal, cu_seqlens, without_pad):
    scale = 1.0 / math.sqrt(dqk)
    pairs = [_pair(t) for t in _qkv(seq, batch, heads, dqk, dv, dtype)]
    npu_in, ref_in = [p[0] for p in pairs], [p[1] for p in pairs]
    out = npu_mla_attention(*npu_in, scale, causal=causal, cu_seqlens=cu_seqlens, without_pad=without_pad)
    ref = mla_attention(*ref_in, scale, causal=causal, cu_seqlens=cu_seqlens)
    assert_close(out, ref, dtype, what="npu attention forward")
    g = torch.randn(out.shape).to(dtype)
    for name, a, e in zip("qkv", torch.autograd.grad(out, npu_in, g), torch.autograd.grad(ref, ref_in, g)):
        assert_close(a, e, dtype, tol_scale=3, what=f"npu attention d{name}")
    return scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_npu_attention_sbh_padded_for_older_cann(fake_torch_npu, dtype, causal):
    """MLA dims 192/128 padded to one multiple of 128 pass the old-CANN constraint and give the same result."""
    scale = _attention_pair(37, 2, 2, 192, 128, dtype, causal, None, without_pad=False)
    (call,) = _calls("npu_fusion_attention")
    assert call["input_layout"] == "SBH" and call["head_num"] == 2
    assert call["head_dims"] == (256, 256, 256)
    assert call["scale"] == pytest.approx(scale), "the real scale, not one derived from the padded dim"
    assert call["sparse_mode"] == (2 if causal else 0) and call["has_mask"] == causal


def test_npu_attention_without_pad_needs_newer_cann(fake_torch_npu):
    q, k, v = _qkv(9, 1, 2, 192, 128, torch.float32)
    with pytest.raises(ValueError, match="older CANN"):
        npu_mla_attention(q, k, v, 0.1, causal=True, without_pad=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_npu_attention_without_pad_on_newer_cann(fake_torch_npu, monkeypatch, dtype):
    monkeypatch.setattr(fake_torch_npu, "REQUIRE_PADDED_HEAD_DIM", False)
    _attention_pair(37, 2, 2, 192, 128, dtype, True, None, without_pad=True)
    (call,) = _calls("npu_fusion_attention")
    assert call["head_dims"] == (192, 192, 128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bounds", [[0, 10, 10, 25, 37], [0, 37]], ids=["empty_doc", "single_doc"])
@pytest.mark.parametrize("without_pad", [False, True])
def test_npu_attention_packed_tnd(fake_torch_npu, monkeypatch, dtype, causal, bounds, without_pad):
    monkeypatch.setattr(fake_torch_npu, "REQUIRE_PADDED_HEAD_DIM", not without_pad)
    _attention_pair(37, 1, 2, 192, 128, dtype, causal, torch.tensor(bounds), without_pad=without_pad)
    (call,) = _calls("npu_fusion_attention")
    assert call["input_layout"] == "TND"
    assert call["actual_seq_qlen"] == bounds[1:] == call["actual_seq_kvlen"], "cumulative ends, not lengths"
    assert call["sparse_mode"] == (3 if causal else 0) and call["has_mask"] == causal


def test_emulated_attention_masks_mean_what_the_docs_say(fake_torch_npu, monkeypatch):
    """Sanity of the emulation itself, so the tests above cannot pass vacuously."""
    monkeypatch.setattr(fake_torch_npu, "REQUIRE_PADDED_HEAD_DIM", False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g)  # BNSD, Sq = 3
    k = torch.randn(1, 2, 5, 8, generator=g)  # Skv = 5
    v = torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.ones(2048, 2048, dtype=torch.bool).triu(1)

    def run(**kw):
        return fake_torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5, **kw)[0]

    def explicit(allowed):
        s = (q @ k.transpose(-1, -2)) * 0.5
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v

    i, j = torch.arange(3).unsqueeze(1), torch.arange(5).unsqueeze(0)
    torch.testing.assert_close(run(atten_mask=mask, sparse_mode=2), explicit(j <= i))  # left-up
    torch.testing.assert_close(run(atten_mask=mask, sparse_mode=3), explicit(j - 2 <= i))  # right-down
    # sparse_mode 4 (band) with the default pre/next tokens is NOT causal; with next_tockens=0 it is mode 3.
    torch.testing.assert_close(run(atten_mask=mask, sparse_mode=4), explicit(torch.ones(3, 5, dtype=torch.bool)))
    torch.testing.assert_close(run(atten_mask=mask, sparse_mode=4, next_tockens=0), explicit(j - 2 <= i))
    # No atten_mask: full attention whatever sparse_mode says (documented), so forgetting the mask shows.
    torch.testing.assert_close(run(sparse_mode=2), explicit(torch.ones(3, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="triu"):
        run(atten_mask=mask.tril(-1), sparse_mode=2)  # True must mean "masked out"
    with pytest.raises(ValueError, match="Dq == Dk >= Dv"):
        fake_torch_npu.npu_fusion_attention(q, k, torch.randn(1, 2, 5, 16), 2, "BNSD")
    t = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="CUMULATIVE"):  # per-document lengths [4, 2] instead of ends [4, 6]
        fake_torch_npu.npu_fusion_attention(t, t, t, 2, "TND", actual_seq_qlen=[4, 2], actual_seq_kvlen=[4, 2])


# --------------------------------------------------------------------------- rms_norm, swiglu, rotary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64)], ids=str)
def test_npu_rms_norm_matches_portable(fake_torch_npu, dtype, shape):
    torch.manual_seed(0)
    x_npu, x_ref = _pair((torch.randn(shape) * 3).to(dtype))
    w_npu, w_ref = _pair((torch.rand(shape[-1]) + 0.5).to(dtype))
    out, ref = npu_rms_norm(x_npu, w_npu, 1e-6), rms_norm(x_ref, w_ref, 1e-6)
    assert_close(out, ref, dtype, what="npu rms_norm forward")
    g = torch.randn(shape).to(dtype)
    for name, a, e in zip(("dx", "dw"), torch.autograd.grad(out, (x_npu, w_npu), g),
                          torch.autograd.grad(ref, (x_ref, w_ref), g)):
        assert_close(a, e, dtype, tol_scale=3, what=f"npu rms_norm {name}")
    assert _calls("npu_rms_norm")[0]["epsilon"] == 1e-6


def test_npu_rms_norm_passes_gamma_in_the_input_dtype(fake_torch_npu):
    x, weight = torch.randn(2, 4, dtype=torch.bfloat16), 1 + torch.randn(4)
    with pytest.raises(TypeError, match="gamma dtype"):
        fake_torch_npu.npu_rms_norm(x, weight, epsilon=1e-6)  # the kernel's documented rule
    out = npu_rms_norm(x, weight, 1e-6)  # an fp32 weight on bf16 activations is cast for it
    assert_close(out, rms_norm(x, weight.to(x.dtype), 1e-6), torch.bfloat16, what="npu rms_norm mixed dtypes")


@pytest.mark.parametrize("dtype", DTYPES)
def test_npu_swiglu_matches_portable(fake_torch_npu, dtype):
    torch.manual_seed(0)
    x_npu, x_ref = _pair((torch.randn(5, 3, 2 * 37) * 2).to(dtype))
    out, ref = npu_swiglu(x_npu), swiglu(x_ref)
    assert_close(out, ref, dtype, what="npu swiglu forward")
    g = torch.randn(ref.shape).to(dtype)
    assert_close(torch.autograd.grad(out, x_npu, g)[0], torch.autograd.grad(ref, x_ref, g)[0], dtype, tol_scale=2,
                 what="npu swiglu dx")


def test_npu_swiglu_non_contiguous_and_empty_inputs(fake_torch_npu):
    wide = torch.randn(4, 10)
    view = wide[:, :8]  # non-contiguous: the kernel does not take it, our path makes it contiguous
    assert not view.is_contiguous()
    torch.testing.assert_close(npu_swiglu(view), swiglu(view))
    empty = torch.randn(0, 8, requires_grad=True)  # an expert shard that received no tokens
    out = npu_swiglu(empty)
    assert out.shape == (0, 4)
    assert torch.autograd.grad(out.sum(), empty)[0].shape == (0, 8)
    assert len(_calls("npu_swiglu")) == 1, "the empty input never reaches the kernel"
    with pytest.raises(ValueError, match="non-contiguous"):
        fake_torch_npu.npu_swiglu(view)


def _freqs(seq, dim):
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    return torch.cat((angles, angles), -1).view(seq, 1, 1, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mscale", [1.0, 1.369])
def test_npu_rotary_matches_portable(fake_torch_npu, dtype, mscale):
    torch.manual_seed(0)
    seq, dim = 37, 64
    t_npu, t_ref = _pair(torch.randn(seq, 2, 3, dim).to(dtype))
    freqs = _freqs(seq, dim)
    out, ref = npu_apply_rotary(t_npu, freqs, mscale), apply_rotary(t_ref, freqs, mscale)
    assert_close(out, ref, dtype, what="npu rotary forward")
    g = torch.randn(out.shape).to(dtype)
    assert_close(torch.autograd.grad(out, t_npu, g)[0], torch.autograd.grad(ref, t_ref, g)[0], dtype,
                 what="npu rotary dx")
    (call,) = _calls("npu_rotary_mul")
    assert call["rotary_mode"] == "half" and call["r_shape"] == (seq, 1, 1, dim) and call["shape"] == (seq, 2, 3, dim)


def test_emulated_rotary_mul_keeps_r1_r2_in_range(fake_torch_npu):
    x, r = torch.randn(2, 1, 1, 4), torch.ones(2, 1, 1, 4)
    fake_torch_npu.npu_rotary_mul(x, r, r)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # what cos * mscale (mscale > 1) would have sent
        fake_torch_npu.npu_rotary_mul(x, r * 1.369, r)
    # interleave mode: output = r1 * x + r2 * (-x1, x0, -x3, x2)
    y = fake_torch_npu.npu_rotary_mul(x, torch.zeros_like(r), r, rotary_mode="interleave")
    torch.testing.assert_close(y, torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2))


# --------------------------------------------------------------------------- permute / unpermute


def _routing(num_tokens, num_experts, topk, seed):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(num_tokens, num_experts, generator=g).topk(topk, dim=-1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map
    return routing_map, probs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 5, 2), (6, 8, 1), (1, 4, 3), (5, 3, 3)], ids=str)
def test_npu_permute_unpermute_match_portable(fake_torch_npu, dtype, shape):
    num_tokens, num_experts, topk = shape
    routing_map, probs = _routing(num_tokens, num_experts, topk, seed=1)
    probs = probs.to(dtype)
    x_npu, x_ref = _pair(torch.randn(num_tokens, 6).to(dtype))

    p_npu, pp_npu, si_npu = npu_permute(x_npu, routing_map, probs=probs)
    p_ref, pp_ref, si_ref = permute(x_ref, routing_map, probs=probs)
    torch.testing.assert_close(p_npu, p_ref, rtol=0, atol=0)  # same expert-major, token-ascending order
    torch.testing.assert_close(pp_npu, pp_ref, rtol=0, atol=0)

    expert_of_row = routing_map.t().nonzero()[:, 0]
    scale = (expert_of_row + 1).to(dtype).unsqueeze(-1)  # expert e multiplies by e + 1
    out = npu_unpermute(p_npu * scale, si_npu, x_npu.shape)
    ref = unpermute(p_ref * scale, si_ref, x_ref.shape, routing_map=routing_map)
    assert_close(out, ref, dtype, what="npu unpermute forward")
    g = torch.randn(out.shape).to(dtype)
    assert_close(torch.autograd.grad(out, x_npu, g)[0], torch.autograd.grad(ref, x_ref, g)[0], dtype,
                 what="npu permute/unpermute backward")

    (perm_call,) = _calls("npu_moe_token_permute")
    (unperm_call,) = _calls("npu_moe_token_unpermute")
    assert perm_call["topk"] == topk and perm_call["num_tokens"] == num_tokens
    assert unperm_call["topk"] == topk and unperm_call["has_probs"], "unit probs carry topK into the kernel"
    weighted = npu_unpermute(p_npu * scale, si_npu, x_npu.shape, probs=probs, routing_map=routing_map)
    weighted_ref = unpermute(p_ref * scale, si_ref, x_ref.shape, probs=probs, routing_map=routing_map)
    assert_close(weighted, weighted_ref, dtype, what="npu unpermute with probs")


def test_emulated_unpermute_without_probs_does_not_sum(fake_torch_npu):
    """Documented: no probs means topK = 1, one output row per permuted row (why we pass unit probs)."""
    routing_map, _ = _routing(4, 3, 2, seed=2)
    x = torch.randn(4, 5)
    permuted, sorted_indices = fake_torch_npu.npu_moe_token_permute(x, _topk_indices(routing_map).to(torch.int32))
    assert fake_torch_npu.npu_moe_token_unpermute(permuted, sorted_indices).shape == (8, 5)
    summed = fake_torch_npu.npu_moe_token_unpermute(permuted, sorted_indices, torch.ones(4, 2))
    torch.testing.assert_close(summed, 2 * x)


def test_permute_falls_back_when_expert_counts_differ(fake_torch_npu):
    routing_map, probs = _routing(5, 4, 2, seed=3)
    routing_map[2] = True  # token 2 now goes to all 4 experts
    assert _topk_indices(routing_map) is None, "the NPU dispatch condition is false: megatron's path runs"
    with pytest.raises(ValueError, match="same number of experts"):
        npu_permute(torch.randn(5, 6), routing_map, probs=probs)
    assert _topk_indices(torch.zeros(0, 4, dtype=torch.bool)) is None, "no tokens: megatron's path"
    assert _topk_indices(torch.zeros(3, 4, dtype=torch.bool)) is None, "no experts chosen: megatron's path"
    assert not _calls("npu_moe_token_permute")
    # The portable path handles the uneven map (what the NPU dispatch falls back to).
    x = torch.randn(5, 6)
    permuted, _, sorted_indices = permute(x, routing_map, probs=probs)
    counts = routing_map.sum(-1, keepdim=True).to(x.dtype)
    torch.testing.assert_close(unpermute(permuted, sorted_indices, x.shape, routing_map=routing_map), x * counts)
