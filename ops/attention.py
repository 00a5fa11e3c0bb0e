"""MLA core attention: ``mla_attention(q, k, v, softmax_scale, causal=True) -> [s, b, h*dv]``.

q and k are ``[s, b, h, dqk]``, v is ``[s, b, h, dv]`` with ``dqk != dv`` in MLA
(192 vs 128 for DeepSeek-V3). The portable path pads v to ``dqk`` so that
``scaled_dot_product_attention`` can pick its fused (flash / memory-efficient)
kernel, which never materialises the ``s x s`` score matrix, and slices the
output back to ``dv``.
"""

import torch
import torch.nn.functional as F


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    seq, batch, heads, dqk = q.shape
    dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"mla_attention expects q, k [s, b, h, dqk] and v [s, b, h, dv]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    # SDPA works on [b, h, s, d].
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        k.permute(1, 2, 0, 3),
        v.permute(1, 2, 0, 3),
        is_causal=causal,
        dropout_p=dropout_p,
        scale=softmax_scale,
    )
    out = out[..., :dv]
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dv)
