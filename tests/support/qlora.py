"""Models and checkpoints the QLoRA tests share."""

import os
import shutil

from safetensors.torch import load_file, save_file

from npu_dsv3.lora.nf4_base import is_quantized
from npu_dsv3.ops.nf4 import nf4_dequantize, nf4_quantize

# Sizes whose tensor-parallel slices are whole 64-value NF4 blocks (the default tiny model's are not).
ALIGNED = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=128, num_attention_heads=2,
               num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
               v_head_dim=64, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)


def dequantized_copy(src: str, dst: str) -> str:
    """The HF checkpoint ``src`` with every tensor --qlora-nf4 quantizes replaced by its NF4 round trip."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(src, name))
            save_file({k: nf4_dequantize(nf4_quantize(v)) if is_quantized(k) else v for k, v in tensors.items()},
                      os.path.join(dst, name), metadata={"format": "pt"})
        else:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return dst
