"""``rms_norm(x, weight, eps)``: ``weight * (x / sqrt(mean(x^2) + eps))``.

Statistics are taken in fp32 and the normalised value is cast back to the input
dtype before the weight is applied, as DeepSeek-V3's reference does.

- NPU: ``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)``.
- Portable: the expression above (autograd differentiates it; nothing to fuse
  that torch does not already do per op).
"""

import torch

from npu_dsv3.ops._npu import on_npu, torch_npu


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def npu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The kernel takes gamma in the input's dtype.
    return torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: weight has {weight.shape[-1]} elements for a last dim of {x.shape[-1]}")
    if on_npu(x):
        return npu_rms_norm(x, weight, eps)
    return reference_rms_norm(x, weight, eps)
