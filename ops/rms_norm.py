"""``rms_norm(x, weight, eps)``: ``weight * (x / sqrt(mean(x^2) + eps))``.

Statistics are taken in fp32 and the normalised value is cast back to the input
dtype before the weight is applied, as DeepSeek-V3's reference does.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
