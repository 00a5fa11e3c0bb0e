"""RoPE as MLA applies it: ``apply_rotary(t, freqs, mscale=1.0) -> t'``.

``t`` is ``[s, b, h, d]`` with DeepSeek's interleaved rotary layout (pairs
``(x0, x1), (x2, x3), ...`` share a frequency); ``freqs`` is ``[s, 1, 1, d]``,
the angles duplicated over both halves as megatron's (YaRN) rotary embedding
returns them; ``mscale`` is YaRN's attention factor on cos and sin. The result
is in the half layout (even dims first, then odd), which is how megatron and
transformers continue: q.k is unchanged because q and k get the same layout.

- NPU: de-interleave, then ``torch_npu.npu_rotary_mul(x, cos, sin, rotary_mode='half')``
  (cos/sin unscaled, as its documented [-1, 1] range requires; mscale multiplies the result).
- Portable: de-interleave, then ``x * cos + rotate_half(x) * sin``.
"""

import torch

from npu_dsv3.ops._npu import on_npu, torch_npu


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def _cos_sin(freqs: torch.Tensor, mscale: float, dtype: torch.dtype):
    return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)


def reference_apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    x = _deinterleave(t)
    cos, sin = _cos_sin(freqs, mscale, x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def npu_apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    x = _deinterleave(t)
    # npu_rotary_mul documents r1/r2 in [-1, 1]: pass plain cos/sin, apply mscale after (the map is linear).
    cos, sin = _cos_sin(freqs, 1.0, x.dtype)
    out = torch_npu().npu_rotary_mul(x, cos, sin, rotary_mode="half")
    return out if mscale == 1.0 else out * mscale


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    if t.shape[-1] % 2 or freqs.shape[-1] != t.shape[-1]:
        raise ValueError(f"apply_rotary: rotary dim {t.shape[-1]} must be even and match freqs {freqs.shape[-1]}")
    if on_npu(t):
        return npu_apply_rotary(t, freqs, mscale)
    return reference_apply_rotary(t, freqs, mscale)
