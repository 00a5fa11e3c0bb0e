"""Lazy, tensor-by-tensor reading of an HF safetensors checkpoint directory."""

import json
import os
from typing import Dict, Iterable

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the model config."""


class HFCheckpointReader:
    """Maps tensor names to shard files and reads one tensor at a time.

    Only the handles of opened shards are kept; tensors are memory-mapped by
    safetensors and copied out on ``get``, so reading a model never needs more
    host memory than the tensors the caller holds on to.
    """

    def __init__(self, path: str):
        self.path = path
        self._handles = {}
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map: Dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        elif os.path.isfile(single):
            self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}: not an HF safetensors checkpoint")

    def _open(self, filename: str):
        if filename not in self._handles:
            full = os.path.join(self.path, filename)
            if not os.path.isfile(full):
                raise CheckpointError(f"shard {full} listed in {INDEX_FILE} does not exist")
            try:
                handle = safe_open(full, framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{full} is not a readable safetensors file ({e}); re-download or re-convert it") from e
            self._handles[filename] = handle
        return self._handles[filename]

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.path}")
        filename = self.weight_map[name]
        try:
            return self._open(filename).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name} from {os.path.join(self.path, filename)} ({e})") from e
