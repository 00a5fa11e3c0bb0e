"""The portable paths of ``npu_dsv3.ops`` against naive references, forward and backward.

Every comparison runs the op and its reference on the same inputs and compares
outputs and the gradients of a random upstream gradient (``torch.autograd.grad``).
References are computed in float64; float64 runs are held to ~1e-10, float32 to
~1e-5 and bfloat16 to bf16 resolution (relative to the largest reference value).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.transformer.moe import moe_utils
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

from npu_dsv3.ops import apply_rotary, gmm, mla_attention, permute, reference_attention, rms_norm, swiglu, unpermute
from npu_dsv3.ops.attention import QUERY_CHUNK
from npu_dsv3.ops.gmm import _grouped_mm_ok

from support.op_asserts import assert_close

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


# --------------------------------------------------------------------------- gmm


def _loop_gmm(x, weight, counts):
    """Per-expert Python loop: the obvious definition of grouped GEMM."""
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        outs.append(x[start:start + c] @ weight[e])
        start += c
    return torch.cat(outs, 0) if outs else x.new_zeros(0, weight.shape[2])


GMM_COUNTS = {
    "one_token": [0, 1, 0],
    "zero_token_experts": [3, 0, 5, 0],
    "all_on_one_expert": [0, 0, 7, 0],
    "no_tokens": [0, 0, 0],
    "uneven": [2, 9, 1, 4, 0, 3],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(GMM_COUNTS))
@pytest.mark.parametrize("dims", [(13, 7), (16, 32)], ids=["K13N7", "K16N32"])
def test_gmm_matches_per_expert_loop(dtype, case, dims):
    torch.manual_seed(0)
    k, n = dims
    counts = torch.tensor(GMM_COUNTS[case])
    x0 = torch.randn(int(counts.sum()), k, dtype=torch.float64)
    w0 = torch.randn(len(counts), k, n, dtype=torch.float64) / math.sqrt(k)
    x, w = _leaf(x0, dtype), _leaf(w0, dtype)
    xr, wr = _leaf(x0, torch.float64), _leaf(w0, torch.float64)

    out = gmm(x, w, counts)
    ref = _loop_gmm(xr.to(dtype).double(), wr.to(dtype).double(), counts)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="gmm forward")

    g = torch.randn(out.shape, dtype=torch.float64)
    dx, dw = _grads(out, (x, w), g.to(dtype))
    rdx, rdw = _grads(_loop_gmm(xr, wr, counts), (xr, wr), g)
    assert dw is not None, "every expert weight must receive a gradient"
    assert_close(dx if dx is not None else torch.zeros_like(x0), rdx if rdx is not None else torch.zeros_like(x0),
                 dtype, tol_scale=2, what="gmm dx")
    assert_close(dw, rdw if rdw is not None else torch.zeros_like(w0), dtype, tol_scale=2, what="gmm dW")
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            assert torch.count_nonzero(dw[e]) == 0, f"expert {e} got no tokens but a non-zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gmm_grouped_mm_and_padded_bmm_paths_agree(dtype):
    """16-byte aligned operands take torch._grouped_mm; the same data sliced unaligned takes the padded bmm."""
    torch.manual_seed(1)
    counts = torch.tensor([4, 0, 6, 0, 0, 0, 0, 6])
    x = torch.randn(16, 16, dtype=dtype)
    w = torch.randn(8, 16, 32, dtype=dtype)
    assert _grouped_mm_ok(x, w)
    aligned = gmm(x, w, counts)
    unaligned_w = torch.randn(8, 16, 33, dtype=dtype)
    unaligned_w[..., :32] = w
    assert not _grouped_mm_ok(x, unaligned_w)
    padded = gmm(x, unaligned_w, counts)[:, :32]
    assert_close(aligned, padded, dtype, what="grouped_mm vs padded bmm")


# --------------------------------------------------------------------------- attention


def _qkv(seq, batch, heads, dqk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, dqk, generator=g, dtype=torch.float64)
    k = torch.randn(seq, batch, heads, dqk, generator=g, dtype=torch.float64)
    v = torch.randn(seq, batch, heads, dv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


ATTENTION_CASES = {
    # name: (seq, batch, heads, dqk, dv, causal, cu_seqlens)
    "seq1": (1, 2, 2, 24, 16, True, None),
    "seq37_causal": (37, 2, 3, 24, 16, True, None),
    "seq37_full": (37, 2, 3, 24, 16, False, None),
    "seq1100_causal": (1100, 1, 2, 24, 16, True, None),
    "packed_with_empty_doc": (37, 1, 2, 24, 16, True, [0, 10, 10, 25, 37]),
    "packed_full_attention": (37, 1, 2, 24, 16, False, [0, 10, 10, 25, 37]),
    "packed_single_doc": (37, 1, 2, 24, 16, True, [0, 37]),
    "equal_head_dims": (37, 1, 2, 16, 16, True, None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_mla_attention_matches_reference(dtype, case):
    seq, batch, heads, dqk, dv, causal, cu = ATTENTION_CASES[case]
    cu_seqlens = None if cu is None else torch.tensor(cu)
    scale = 1.0 / math.sqrt(dqk)
    q, k, v = (_leaf(t, dtype) for t in _qkv(seq, batch, heads, dqk, dv, dtype))
    qr, kr, vr = (_leaf(t, torch.float64) for t in (q, k, v))

    out = mla_attention(q, k, v, scale, causal=causal, cu_seqlens=cu_seqlens)
    ref = reference_attention(qr, kr, vr, scale, causal=causal, cu_seqlens=cu_seqlens)
    assert out.shape == (seq, batch, heads * dv) and out.dtype == dtype
    assert_close(out, ref, dtype, what="attention forward")

    g = torch.randn(out.shape, dtype=torch.float64)
    grads = _grads(out, (q, k, v), g.to(dtype))
    ref_grads = _grads(ref, (qr, kr, vr), g)
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close(a, e, dtype, tol_scale=3, what=f"attention d{name}")


class _CountSDPA(TorchFunctionMode):
    """Observes (does not replace) calls to F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype, expected_calls", [(torch.float64, 3), (torch.float32, 1)])
def test_attention_path_for_long_sequences(dtype, expected_calls):
    """float64 has no fused SDPA kernel: 1100 queries run as ceil(1100 / 512) = 3 checkpointed chunks,
    so the seq1100 float64 case above checks the chunked path; float32 is one fused call."""
    seq = ATTENTION_CASES["seq1100_causal"][0]
    assert -(-seq // QUERY_CHUNK) == 3
    q, k, v = _qkv(seq, 1, 2, 24, 16, dtype)
    with _CountSDPA() as counter:
        mla_attention(q, k, v, 0.2, causal=True)
    assert counter.calls == expected_calls


def _explicit_attention(q, k, v, scale, causal, bounds):
    """Independent of ops.attention: per document, per batch and head, softmax(q k^T * scale) v."""
    seq, batch, heads, _ = q.shape
    out = torch.zeros(seq, batch, heads, v.shape[-1], dtype=q.dtype)
    for a, b in zip(bounds[:-1], bounds[1:]):
        for bi in range(batch):
            for h in range(heads):
                scores = (q[a:b, bi, h] @ k[a:b, bi, h].T) * scale
                if causal:
                    scores = scores + torch.full_like(scores, float("-inf")).triu(1)
                out[a:b, bi, h] = torch.softmax(scores, dim=-1) @ v[a:b, bi, h]
    return out.reshape(seq, batch, heads * v.shape[-1])


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_matches_an_explicit_loop(causal):
    q, k, v = _qkv(29, 1, 2, 12, 8, torch.float64, seed=3)
    bounds = [0, 7, 7, 20, 29]
    ref = reference_attention(q, k, v, 0.3, causal=causal, cu_seqlens=torch.tensor(bounds))
    torch.testing.assert_close(ref, _explicit_attention(q, k, v, 0.3, causal, bounds), rtol=1e-12, atol=1e-12)
    q, k, v = _qkv(11, 2, 3, 12, 8, torch.float64, seed=4)
    ref = reference_attention(q, k, v, 0.3, causal=causal)
    torch.testing.assert_close(ref, _explicit_attention(q, k, v, 0.3, causal, [0, 11]), rtol=1e-12, atol=1e-12)


def _peak_allocated_bytes(fn):
    """Peak of the CPU allocator's net allocations while ``fn`` runs (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, result


def test_portable_attention_does_not_materialise_scores():
    # The measurement sees a materialised score matrix: the reference allocates at least s*s*h*4 bytes.
    s, h = 1024, 4
    q, k, v = _qkv(s, 1, h, 64, 64, torch.float32)
    peak, _ = _peak_allocated_bytes(lambda: reference_attention(q, k, v, 0.125, causal=True))
    assert peak >= s * s * h * 4

    # The portable path at 4096 tokens, 4 heads, 192/128 dims, float32: the scores would be 256 MiB.
    s = 4096
    scores_bytes = s * s * h * 4
    q, k, v = (t.requires_grad_(True) for t in _qkv(s, 1, h, 192, 128, torch.float32))
    fwd_peak, out = _peak_allocated_bytes(lambda: mla_attention(q, k, v, 192 ** -0.5, causal=True))
    assert fwd_peak <= 0.25 * scores_bytes, f"forward peak {fwd_peak / 2**20:.1f} MiB"
    bwd_peak, _ = _peak_allocated_bytes(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    # Backward must hold dq, dk, dv (linear in s); no s x s buffer.
    assert bwd_peak <= 0.5 * scores_bytes, f"backward peak {bwd_peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- rms_norm, swiglu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (2, 1, 1, 33)], ids=str)
def test_rms_norm_matches_fp64_formula(dtype, shape):
    torch.manual_seed(0)
    eps = 1e-6
    x0 = torch.randn(shape, dtype=torch.float64) * 3
    w0 = torch.rand(shape[-1], dtype=torch.float64) + 0.5
    x, w = _leaf(x0, dtype), _leaf(w0, dtype)
    xr, wr = _leaf(x0.to(dtype), torch.float64), _leaf(w0.to(dtype), torch.float64)
    out = rms_norm(x, w, eps)
    ref = wr * xr / torch.sqrt((xr * xr).mean(-1, keepdim=True) + eps)
    assert out.dtype == dtype
    # The statistics are float32 by design (as DeepSeek-V3's reference), so float64 is float32-accurate.
    tol_dtype = torch.float32 if dtype == torch.float64 else dtype
    assert_close(out, ref, tol_dtype, what="rms_norm forward")
    g = torch.randn(shape, dtype=torch.float64)
    for name, a, e in zip(("dx", "dw"), _grads(out, (x, w), g.to(dtype)), _grads(ref, (xr, wr), g)):
        assert_close(a, e, tol_dtype, tol_scale=3, what=f"rms_norm {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (4, 3, 22), (9, 2 * 37)], ids=str)
def test_swiglu_matches_formula(dtype, shape):
    torch.manual_seed(0)
    x0 = torch.randn(shape, dtype=torch.float64) * 2
    x, xr = _leaf(x0, dtype), _leaf(x0.to(dtype), torch.float64)
    out = swiglu(x)
    n = shape[-1] // 2
    gate, up = xr[..., :n], xr[..., n:]
    ref = gate * torch.sigmoid(gate) * up
    assert out.shape == (*shape[:-1], n) and out.dtype == dtype
    assert_close(out, ref, dtype, what="swiglu forward")
    g = torch.randn(ref.shape, dtype=torch.float64)
    assert_close(_grads(out, (x,), g.to(dtype))[0], _grads(ref, (xr,), g)[0], dtype, tol_scale=2, what="swiglu dx")


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError):
        swiglu(torch.randn(2, 5))


# --------------------------------------------------------------------------- rotary


def _freqs(seq, dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    return torch.cat((angles, angles), -1)  # [s, d]: megatron's layout (angles over both halves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mscale", [1.0, 1.3690])
@pytest.mark.parametrize("seq", [1, 37])
def test_apply_rotary_matches_megatron_and_transformers(dtype, mscale, seq):
    torch.manual_seed(0)
    batch, heads, dim = 2, 3, 16
    t0 = torch.randn(seq, batch, heads, dim, dtype=torch.float64)
    freqs = _freqs(seq, dim).view(seq, 1, 1, dim)
    t = _leaf(t0, dtype)
    out = apply_rotary(t, freqs, mscale)
    assert out.shape == t.shape and out.dtype == dtype

    # megatron-core's MLA rotary (de-interleave, then rotate_half) on the same dtype: same recipe.
    tm = _leaf(t0, dtype)
    meg = _apply_rotary_pos_emb_bshd(tm, freqs, rotary_interleaved=False, multi_latent_attention=True, mscale=mscale)
    assert_close(out, meg, dtype, tol_scale=0.5, what="rotary vs megatron")

    # transformers' DeepSeek-V3 interleaved RoPE, in float64, with cos/sin from the same angles and mscale.
    tr = _leaf(t0.to(dtype), torch.float64)
    cos = (torch.cos(freqs[:, 0, 0]) * mscale).unsqueeze(0).expand(batch, seq, dim)
    sin = (torch.sin(freqs[:, 0, 0]) * mscale).unsqueeze(0).expand(batch, seq, dim)
    hf, _ = apply_rotary_pos_emb_interleave(tr.permute(1, 2, 0, 3), tr.permute(1, 2, 0, 3), cos, sin)
    hf = hf.permute(2, 0, 1, 3)
    assert_close(out, hf, dtype, what="rotary vs transformers")

    g = torch.randn(out.shape, dtype=torch.float64)
    (dt,) = _grads(out, (t,), g.to(dtype))
    assert_close(dt, _grads(meg, (tm,), g.to(dtype))[0], dtype, tol_scale=0.5, what="rotary grad vs megatron")
    assert_close(dt, _grads(hf, (tr,), g)[0], dtype, tol_scale=2, what="rotary grad vs transformers")


# --------------------------------------------------------------------------- permute / unpermute


def _routing(num_tokens, num_experts, topk, seed, uneven=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    chosen = scores.topk(topk, dim=-1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, chosen, True)
    if uneven and num_tokens > 1:
        routing_map[0] = False
        routing_map[0, 0] = True  # token 0 goes to one expert only
        routing_map[-1] = True  # the last token goes to every expert
    probs = torch.rand(num_tokens, num_experts, generator=g, dtype=torch.float64) * routing_map
    return routing_map, probs


def _naive_permute(tokens, routing_map, probs):
    rows, row_probs, index = [], [], []
    for e in range(routing_map.shape[1]):
        for t in range(routing_map.shape[0]):
            if routing_map[t, e]:
                rows.append(tokens[t])
                row_probs.append(probs[t, e])
                index.append(t)
    return torch.stack(rows), torch.stack(row_probs), index


PERMUTE_CASES = {
    # name: (tokens, experts, topk, uneven)
    "one_token": (1, 4, 2, False),
    "topk2": (9, 5, 2, False),
    "topk1_experts_without_tokens": (3, 8, 1, False),
    "uneven_counts": (7, 4, 2, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PERMUTE_CASES))
def test_permute_unpermute(dtype, case):
    num_tokens, num_experts, topk, uneven = PERMUTE_CASES[case]
    routing_map, probs64 = _routing(num_tokens, num_experts, topk, seed=5, uneven=uneven)
    tokens0 = torch.randn(num_tokens, 6, dtype=torch.float64)
    tokens, probs = _leaf(tokens0, dtype), probs64.to(dtype)

    permuted, permuted_probs, sorted_indices = permute(tokens, routing_map, probs=probs)
    ref_rows, ref_probs, ref_index = _naive_permute(tokens.detach(), routing_map, probs)
    torch.testing.assert_close(permuted, ref_rows, rtol=0, atol=0)  # expert-major, tokens ascending
    torch.testing.assert_close(permuted_probs, ref_probs, rtol=0, atol=0)

    meg_rows, meg_probs, meg_index = moe_utils.permute(tokens.detach(), routing_map, probs=probs)
    torch.testing.assert_close(permuted, meg_rows, rtol=0, atol=0)
    torch.testing.assert_close(permuted_probs, meg_probs, rtol=0, atol=0)
    assert meg_index.tolist() == ref_index == sorted_indices.tolist()

    # Expert e scales its rows by (e + 1); unpermute sums every token's expert outputs.
    expert_of_row = routing_map.t().nonzero()[:, 0]
    expert_out = permuted * (expert_of_row + 1).to(dtype).unsqueeze(-1)
    restored = unpermute(expert_out, sorted_indices, tokens.shape, routing_map=routing_map)
    factor = (routing_map.double() * torch.arange(1, num_experts + 1, dtype=torch.float64)).sum(-1, keepdim=True)
    assert_close(restored, tokens0.to(dtype).double() * factor, dtype, what="unpermute forward")

    # Round trip: each token comes back once per chosen expert.
    counts = routing_map.sum(-1, keepdim=True).double()
    round_trip = unpermute(permuted, sorted_indices, tokens.shape, routing_map=routing_map)
    assert_close(round_trip, tokens0.to(dtype).double() * counts, dtype, what="round trip")

    g = torch.randn(tokens.shape, dtype=torch.float64)
    (dx,) = _grads(restored, (tokens,), g.to(dtype))
    assert_close(dx, g.to(dtype).double() * factor, dtype, what="permute+unpermute backward")


def test_permute_respects_num_out_tokens_like_megatron():
    routing_map, probs = _routing(6, 4, 2, seed=2)
    tokens = torch.randn(6, 3)
    ours = permute(tokens, routing_map, probs=probs, num_out_tokens=12)
    theirs = moe_utils.permute(tokens, routing_map, probs=probs, num_out_tokens=12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_permute_rejects_mismatched_routing_map():
    with pytest.raises(ValueError):
        permute(torch.randn(3, 4), torch.ones(2, 4, dtype=torch.bool))
