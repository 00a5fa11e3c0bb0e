"""The MoE layer: megatron-core's, with the ``--moe-permute-fusion`` choice of its config.

megatron's dispatcher calls module-level ``permute``/``unpermute`` without the
config; the layer marks its forward so the patched functions (see
``npu_dsv3.model.patches``) know which permutation this layer asked for, and two
models in one process can differ.
"""

import contextvars

from megatron.core.transformer.moe.moe_layer import MoELayer

_FUSED_PERMUTE = contextvars.ContextVar("npu_dsv3_fused_permute", default=False)


def fused_permute_enabled() -> bool:
    return _FUSED_PERMUTE.get()


class DeepSeekV3MoELayer(MoELayer):
    def forward(self, *args, **kwargs):
        token = _FUSED_PERMUTE.set(bool(getattr(self.config, "use_fused_permute", False)))
        try:
            return super().forward(*args, **kwargs)
        finally:
            _FUSED_PERMUTE.reset(token)
