"""RMSNorm as DeepSeek-V3 defines it (statistics in fp32, weight applied in the input dtype)."""

import torch

from npu_dsv3.ops.rms_norm import reference_rms_norm, rms_norm

LATENT_NORM_EPS = 1e-6


class RMSNorm(torch.nn.Module):
    """Megatron-compatible constructor (``config, hidden_size, eps``) so specs can build it.

    With sequence parallelism each TP rank sees a different slice of the sequence,
    so the weight's gradient is partial; ``sequence_parallel`` on the parameter tells
    megatron's grad finaliser to all-reduce it over the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm_fn = rms_norm if config.use_fused_rmsnorm else reference_rms_norm
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


class LatentRMSNorm(RMSNorm):
    """RMSNorm on MLA's q/kv latents. DeepSeek's reference (and transformers) build
    these with the default eps 1e-6 whatever ``rms_norm_eps`` says; megatron
    passes ``layernorm_epsilon``, so the eps it passes is overridden here."""

    def __init__(self, config, hidden_size: int, eps: float = LATENT_NORM_EPS):
        super().__init__(config, hidden_size, eps=LATENT_NORM_EPS)
