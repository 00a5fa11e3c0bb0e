"""DeepSeek-V3 on megatron-core: specs, builder, HF weight mapping, loading."""

from npu_dsv3.model.builder import build_model, forward_logits
from npu_dsv3.model.loading import load_hf, load_mcore

__all__ = ["build_model", "forward_logits", "load_hf", "load_mcore"]
