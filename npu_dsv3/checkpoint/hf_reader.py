"""Lazy, tensor-by-tensor reading of an HF safetensors checkpoint directory."""

import json
import os
import struct
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


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

    def headers(self) -> Dict[str, Tuple[str, str, Tuple[int, ...]]]:
        """``{name: (shard path, safetensors dtype name, shape)}`` of every indexed tensor, from the
        shards' headers alone; a shard that is truncated or lacks a tensor its index lists is refused."""
        by_file: Dict[str, List[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, []).append(name)
        out = {}
        for filename, names in sorted(by_file.items()):
            full = os.path.join(self.path, filename)
            entries, needed = _read_header(full)
            if os.path.getsize(full) < needed:
                raise CheckpointError(f"{full} is truncated: its header needs {needed} bytes; re-download or "
                                      "re-convert it")
            for name in names:
                if name not in entries:
                    raise CheckpointError(f"tensor {name} is missing from {full}, where {INDEX_FILE} places it")
                out[name] = (full, *entries[name])
        return out

    def check(self, shapes: Dict[str, Sequence[int]], optional=frozenset(),
              block: Tuple[int, int] = (128, 128)) -> None:
        """Every tensor against the model config, from the shards' headers (no tensor data is read):
        ``shapes`` are the model's tensors and their shapes, ``optional`` those that may be absent.
        Floating-point tensors are valid, and float8_e4m3fn weights with an fp32 ``<name>_scale_inv``
        of one scale per ``block``; anything else is refused with one line naming the tensor."""
        headers = self.headers()
        problems = [f"tensor {name} is missing from {self.path}" for name in shapes
                    if name not in headers and name not in optional]
        for name, (path, dtype, shape) in headers.items():
            problem = _tensor_problem(name, dtype, shape, headers, shapes, block)
            if problem:
                problems.append(f"tensor {name} in {path}: {problem}")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CheckpointError(f"{problems[0]}{more}; the checkpoint does not fit its config.json")


def _read_header(path: str) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...]]], int]:
    """``{name: (safetensors dtype name, shape)}`` of a safetensors file and the size its header says it has."""
    from npu_dsv3.checkpoint.io import safetensors_header

    try:
        header, data_start = safetensors_header(path)
        header.pop("__metadata__", None)
        entries = {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}
        return entries, data_start + max((info["data_offsets"][1] for info in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-convert it") from e


def _tensor_problem(name: str, dtype_name: str, shape: Tuple[int, ...], headers: dict, shapes: dict,
                    block: Tuple[int, int]) -> str:
    """What is wrong with one tensor of the checkpoint, or ""."""
    import torch

    from npu_dsv3.checkpoint.writers import safetensors_dtype

    dtype = safetensors_dtype(dtype_name)
    if name.endswith(SCALE_SUFFIX) and name not in shapes:
        weight = headers.get(name[: -len(SCALE_SUFFIX)])
        if weight is None or safetensors_dtype(weight[1]) != torch.float8_e4m3fn:
            return f"is a block scale, but {name[: -len(SCALE_SUFFIX)]} is not a float8_e4m3fn weight"
        if dtype != torch.float32:
            return f"is {dtype_name}, block scales must be float32 (F32)"
        if len(weight[2]) != 2:
            return ""  # the weight's own shape is refused
        expected = tuple(-(-size // edge) for size, edge in zip(weight[2], block))
        if shape != expected:
            return f"expected shape {expected} (one scale per {block[0]}x{block[1]} block of the weight), found {shape}"
        return ""
    if name not in shapes:
        return "is not a tensor of the model config.json describes (unexpected)"
    if tuple(shapes[name]) != shape:
        return f"expected shape {tuple(shapes[name])} from config.json, found {shape}"
    if dtype == torch.float8_e4m3fn and name + SCALE_SUFFIX not in headers:
        return f"is float8_e4m3fn but the checkpoint has no {name}{SCALE_SUFFIX}"
    if dtype == torch.float8_e4m3fn:
        return ""
    if dtype is None or not dtype.is_floating_point or dtype.itemsize == 1:
        return f"is {dtype_name}; weights must be floating point (or float8_e4m3fn with block scales)"
    return ""
