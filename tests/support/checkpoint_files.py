"""Helpers the conversion tests share: a tiny release-like HF directory and reading one back."""

import json
import os

import torch
from safetensors.torch import load_file

from npu_dsv3.tiny_model import cast_like_release, make_hf_model, save_hf


def hf_tensors(directory) -> dict:
    """Every tensor of the safetensors shards in ``directory``."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def release_like_hf_dir(directory: str, seed: int) -> str:
    """A 4-layer BF16 DeepSeek-V3 with its MTP layer stored as the release stores it, and a tokenizer file."""
    hf = make_hf_model(seed=seed, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    path = save_hf(cast_like_release(hf, torch.bfloat16), directory, with_mtp=True)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512}, f)
    return path
