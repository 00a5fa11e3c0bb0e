"""MLA core attention: ``mla_attention(q, k, v, softmax_scale, causal=True, cu_seqlens=None) -> [s, b, h*dv]``.

q and k are ``[s, b, h, dqk]``, v is ``[s, b, h, dv]``; in MLA ``dqk != dv``
(192 vs 128 for DeepSeek-V3). ``cu_seqlens`` (cumulative document lengths,
starting at 0, batch 1) keeps attention inside each packed document.

- NPU: ``torch_npu.npu_fusion_attention``; SBH layout, or TND with
  ``actual_seq_qlen`` for packed documents; causal through a 2048x2048 mask.
  CANN before 8.2.RC1 needs one head dim that is a multiple of 128, so q, k and
  v are zero-padded to it and the output is sliced (zero q/k columns leave the
  scores unchanged; the scale is passed explicitly). ``without_pad=True``
  (``--mla-fa-without-pad``) passes the real dims.
- Portable: v is zero-padded to ``dqk`` so ``scaled_dot_product_attention`` can
  take its fused flash / memory-efficient kernel, which never materialises the
  ``s x s`` scores; where no fused kernel applies (dropout on CPU, float64) the
  queries are processed in checkpointed chunks so memory stays ``chunk x s``.
- ``reference_attention`` materialises the scores: the unfused baseline
  (``--use-flash-attn`` off) and the tests' reference.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from npu_dsv3.ops._npu import on_npu, torch_npu

NPU_HEAD_DIM_MULTIPLE = 128
NPU_CAUSAL_MASK_SIZE = 2048
SPARSE_LEFT_UP_CAUSAL = 2
SPARSE_RIGHT_DOWN_CAUSAL = 3
QUERY_CHUNK = 512


def _check(q, k, v, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"mla_attention expects q, k [s, b, h, dqk] and v [s, b, h, dv]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens is not None:
        if q.shape[1] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got batch {q.shape[1]}")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {q.shape[0]}, "
                             f"got {cu_seqlens.tolist()}")


def _segments(cu_seqlens, seq):
    if cu_seqlens is None:
        return [(0, seq)]
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def reference_attention(q, k, v, softmax_scale, causal=True, cu_seqlens=None, dropout_p=0.0):
    """Materialised scores, masked and softmaxed in (at least) fp32: the unfused baseline."""
    _check(q, k, v, cu_seqlens)
    seq, batch, heads, _ = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("sbhd,tbhd->bhst", q.to(compute), k.to(compute)) * softmax_scale
    allowed = torch.zeros(seq, seq, dtype=torch.bool, device=q.device)
    for a, b in _segments(cu_seqlens, seq):
        allowed[a:b, a:b] = True
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    out = torch.einsum("bhst,tbhd->sbhd", probs, v.to(compute)).to(q.dtype)
    return out.reshape(seq, batch, heads * v.shape[-1])


def _sdpa_chunk(q, k, v, mask, dropout_p, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _sdpa(q, k, v, scale, causal, dropout_p):
    """[b, h, s, d] attention through SDPA's fused kernels where they apply."""
    fused_ok = q.dtype in (torch.float16, torch.bfloat16, torch.float32) and not (
        dropout_p and q.device.type == "cpu"
    )
    if fused_ok or q.shape[2] <= QUERY_CHUNK:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)
    # No fused kernel: query chunks, each recomputed in backward, keep memory at chunk x s.
    outs = []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q.shape[2])
        keys = stop if causal else k.shape[2]
        mask = None
        if causal:
            mask = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).tril(diagonal=start)
        outs.append(checkpoint(
            _sdpa_chunk, q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], mask, dropout_p, scale,
            use_reentrant=False,
        ))
    return torch.cat(outs, dim=2)


def _portable(q, k, v, softmax_scale, causal, cu_seqlens, dropout_p):
    seq, batch, heads, dqk = q.shape
    dv = v.shape[-1]
    v = F.pad(v, (0, dqk - dv)) if dv < dqk else v
    outs = []
    for a, b in _segments(cu_seqlens, seq):
        # SDPA works on [b, h, s, d].
        qs, ks, vs = (t[a:b].permute(1, 2, 0, 3) for t in (q, k, v))
        outs.append(_sdpa(qs, ks, vs, softmax_scale, causal, dropout_p)[..., :dv])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dv)


def _causal_mask(device):
    return torch.ones(NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


def npu_mla_attention(q, k, v, softmax_scale, causal=True, cu_seqlens=None, dropout_p=0.0, without_pad=False):
    """The torch_npu path (also run against the emulation in the tests)."""
    _check(q, k, v, cu_seqlens)
    seq, batch, heads, dqk = q.shape
    dv = v.shape[-1]
    if not without_pad:
        width = -(-max(dqk, dv) // NPU_HEAD_DIM_MULTIPLE) * NPU_HEAD_DIM_MULTIPLE
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    mask = _causal_mask(q.device) if causal else None
    common = dict(scale=softmax_scale, keep_prob=1.0 - dropout_p, atten_mask=mask)
    npu = torch_npu()
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:].tolist()  # TND takes the cumulative end of each document
        out = npu.npu_fusion_attention(
            q.squeeze(1), k.squeeze(1), v.squeeze(1), heads, "TND",
            actual_seq_qlen=lengths, actual_seq_kvlen=lengths,
            sparse_mode=SPARSE_RIGHT_DOWN_CAUSAL if causal else 0, **common,
        )[0]
        out = out.view(seq, 1, heads, -1)
    else:
        out = npu.npu_fusion_attention(
            q.reshape(seq, batch, -1), k.reshape(seq, batch, -1), v.reshape(seq, batch, -1), heads, "SBH",
            sparse_mode=SPARSE_LEFT_UP_CAUSAL if causal else 0, **common,
        )[0]
        out = out.view(seq, batch, heads, -1)
    return out[..., :dv].reshape(seq, batch, heads * dv)


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    without_pad: bool = False,
) -> torch.Tensor:
    _check(q, k, v, cu_seqlens)
    if on_npu(q):
        return npu_mla_attention(q, k, v, softmax_scale, causal, cu_seqlens, dropout_p, without_pad)
    return _portable(q, k, v, softmax_scale, causal, cu_seqlens, dropout_p)
