"""DeepSeek's FP8 release -> an ordinary BF16 HF checkpoint, one shard at a time.

In the release every 2-D linear weight is ``float8_e4m3fn`` with a companion
``<name>_scale_inv`` (fp32, one scale per 128x128 block, edge blocks ragged);
everything else (norms, embeddings, router bias, ...) is stored as is. The BF16
weight is ``bf16(fp32(w) * scale_inv[i // 128, j // 128])``.

Each output shard has the name of its input shard and is produced by one worker
that reads only that shard (plus the few scales the index places in another
shard), so memory stays at about one output shard per worker whatever the model
size, and an interrupted job resumes shard by shard (see ``checkpoint.io``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open

from npu_dsv3.checkpoint import io
from npu_dsv3.checkpoint.hf_reader import INDEX_FILE, CheckpointError, HFCheckpointReader

SCALE_SUFFIX = "_scale_inv"
CONFIG_FILE = "config.json"
DEFAULT_BLOCK = (128, 128)
# Left out of the byte-for-byte copy: huggingface-cli's download bookkeeping
# describes the FP8 files, not ours.
_NOT_COPIED_DIRS = {".cache"}

Block = Union[int, Tuple[int, int]]


def dequantize_fp8_block(weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: Block = 128) -> torch.Tensor:
    """``bf16(fp32(w) * scale_inv[i // block, j // block])`` for a 2-D weight.

    ``scale_inv`` must be ``ceil(rows / block) x ceil(cols / block)``. The scale is
    expanded to the weight's shape (the ragged last block cropped) and multiplied
    elementwise in fp32, so the result is exactly the per-block formula.
    """
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    if weight_fp8.dim() != 2:
        raise ValueError(f"block-quantized weight must be 2-D, got shape {tuple(weight_fp8.shape)}")
    rows, cols = weight_fp8.shape
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight shape ({rows}, {cols}) in "
                         f"{block_rows}x{block_cols} blocks: expected {expected}")
    scale = scale_inv.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    out = weight_fp8.float()
    out.mul_(scale)  # in place: one fp32 copy of the weight instead of two
    return out.to(torch.bfloat16)


# --------------------------------------------------------------------------- one shard (runs in a worker)


@dataclass(frozen=True)
class _ShardJob:
    input_dir: str
    output_dir: str
    filename: str
    names: Tuple[str, ...]  # the shard's tensors according to the index
    scale_files: Dict[str, str]  # scale name -> shard holding it, for this shard's weights
    block: Tuple[int, int]


def _open(stack: contextlib.ExitStack, path: str):
    try:
        return stack.enter_context(safe_open(path, framework="pt"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from e


def _read(handle, name: str, path: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read tensor {name} from {path} ({e}); re-download it") from e


def _convert_shard(job: _ShardJob) -> Dict[str, object]:
    """Writes one BF16 shard atomically; returns its digest for the manifest."""
    path = os.path.join(job.input_dir, job.filename)
    with contextlib.ExitStack() as stack:
        handles = {}

        def handle(filename):
            if filename not in handles:
                handles[filename] = _open(stack, os.path.join(job.input_dir, filename))
            return handles[filename]

        src = handle(job.filename)
        stored, listed = set(src.keys()), set(job.names)
        if stored != listed:
            raise CheckpointError(f"{path} does not hold the tensors {INDEX_FILE} assigns to it (missing: "
                                  f"{sorted(listed - stored)[:5]}, not listed: {sorted(stored - listed)[:5]})")
        tensors = {}
        for name in job.names:
            if name.endswith(SCALE_SUFFIX):
                continue
            tensor = _read(src, name, path)
            scale_name = name + SCALE_SUFFIX
            where = f"tensor {name} in {path}"
            if tensor.dtype == torch.float8_e4m3fn:
                if scale_name not in job.scale_files:
                    raise CheckpointError(f"{where} is float8_e4m3fn but the checkpoint has no {scale_name}")
                scale_file = job.scale_files[scale_name]
                scale = _read(handle(scale_file), scale_name, os.path.join(job.input_dir, scale_file))
                try:
                    tensor = dequantize_fp8_block(tensor, scale, job.block)
                except ValueError as e:
                    raise CheckpointError(f"{where}: {e}") from e
            elif scale_name in job.scale_files:
                raise CheckpointError(f"{where} has a {scale_name} but is {tensor.dtype}, not float8_e4m3fn")
            elif tensor.dtype.is_floating_point and tensor.element_size() == 1:
                raise CheckpointError(f"{where} is {tensor.dtype}; only float8_e4m3fn with block scales is supported")
            tensors[name] = tensor
        out_path = os.path.join(job.output_dir, job.filename)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        io.atomic_save_safetensors(tensors, out_path, metadata=src.metadata())
    return io.file_digest(out_path)


# --------------------------------------------------------------------------- the whole checkpoint


def _read_config(input_dir: str) -> Optional[dict]:
    path = os.path.join(input_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _block_size(config: Optional[dict]) -> Tuple[int, int]:
    quant = (config or {}).get("quantization_config")
    if not quant:
        return DEFAULT_BLOCK
    if quant.get("quant_method", "fp8") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"quantization_config {quant} is not DeepSeek's block FP8 (quant_method fp8, fmt e4m3)")
    rows, cols = quant.get("weight_block_size", DEFAULT_BLOCK)
    return int(rows), int(cols)


def _bf16_config(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    if "dtype" in config:  # transformers 5 writes this name
        config["dtype"] = "bfloat16"
    return config


def _other_files(input_dir: str, skip: set) -> List[str]:
    """Relative paths of every file to copy byte for byte, in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(input_dir):
        if dirpath == input_dir:
            dirnames[:] = [d for d in dirnames if d not in _NOT_COPIED_DIRS]
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), input_dir)
            if rel not in skip and not name.endswith(io.TEMP_SUFFIX):
                found.append(rel)
    return found


def _plan(input_dir: str, output_dir: str, weight_map: Dict[str, str], block) -> List[_ShardJob]:
    for scale in (n for n in weight_map if n.endswith(SCALE_SUFFIX)):
        if scale[: -len(SCALE_SUFFIX)] not in weight_map:
            raise CheckpointError(f"{scale} in {os.path.join(input_dir, weight_map[scale])} has no weight "
                                  f"{scale[: -len(SCALE_SUFFIX)]} in the checkpoint")
    by_file: Dict[str, List[str]] = {}
    for name, filename in weight_map.items():
        by_file.setdefault(filename, []).append(name)
    jobs = []
    for filename in sorted(by_file):
        if not os.path.isfile(os.path.join(input_dir, filename)):
            raise CheckpointError(f"shard {os.path.join(input_dir, filename)} listed in {INDEX_FILE} does not exist")
        names = tuple(sorted(by_file[filename]))
        scale_files = {n + SCALE_SUFFIX: weight_map[n + SCALE_SUFFIX] for n in names if n + SCALE_SUFFIX in weight_map}
        jobs.append(_ShardJob(input_dir, output_dir, filename, names, scale_files, block))
    return jobs


def convert_fp8_to_bf16(input_dir: str, output_dir: str, workers: int = 1, resume: bool = False,
                        progress: bool = True) -> dict:
    """Writes the BF16 version of the FP8 HF checkpoint in ``input_dir`` to ``output_dir``.

    Shards keep their names (``_scale_inv`` tensors removed, FP8 weights in BF16);
    the index loses the scale entries and gets a recomputed ``total_size``;
    config.json loses ``quantization_config``; every other file is copied byte for
    byte. ``workers`` shards are converted at a time, each worker holding one
    output shard in memory. With ``resume`` an interrupted run in ``output_dir``
    is continued: intact finished files (size and CRC-32 in the manifest) are kept.

    Returns a summary: shard counts, input bytes and seconds.
    """
    start = time.monotonic()
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input directory {input_dir} does not exist or is not a directory")
    real_in, real_out = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if real_out == real_in or real_out.startswith(real_in + os.sep):
        raise ValueError(f"output directory {output_dir} must not be the input directory or inside it")
    has_index = os.path.isfile(os.path.join(input_dir, INDEX_FILE))
    weight_map = HFCheckpointReader(input_dir).weight_map
    config = _read_config(input_dir)
    jobs = _plan(input_dir, output_dir, weight_map, _block_size(config))
    shard_bytes = {job.filename: os.path.getsize(os.path.join(input_dir, job.filename)) for job in jobs}

    manifest = io.prepare_output_dir(output_dir, resume, {"command": "convert fp8-to-bf16", "input": real_in})
    todo = set(manifest.pending([job.filename for job in jobs], workers))
    kept = sum(size for name, size in shard_bytes.items() if name not in todo)
    with io.progress(sum(shard_bytes.values()), "fp8-to-bf16", enabled=progress, done_bytes=kept) as bar:

        def finished(job, digest):
            manifest.record(job.filename, digest)
            bar.update(shard_bytes[job.filename])

        io.parallel_map(_convert_shard, [job for job in jobs if job.filename in todo], workers,
                        on_result=finished, label=lambda job: os.path.join(input_dir, job.filename))

    skip = set(shard_bytes) | {INDEX_FILE, CONFIG_FILE, io.MANIFEST_FILE}
    for rel in _other_files(input_dir, skip):
        if not manifest.done(rel):
            os.makedirs(os.path.dirname(os.path.join(output_dir, rel)), exist_ok=True)
            io.atomic_copy(os.path.join(input_dir, rel), os.path.join(output_dir, rel))
            manifest.record(rel)
    if config is not None and not manifest.done(CONFIG_FILE):
        io.atomic_write_json(_bf16_config(config), os.path.join(output_dir, CONFIG_FILE))
        manifest.record(CONFIG_FILE)
    # The index is written last: a directory that has one has all its shards.
    if has_index and not manifest.done(INDEX_FILE):
        with open(os.path.join(input_dir, INDEX_FILE), encoding="utf-8") as f:
            metadata = dict(json.load(f).get("metadata") or {})
        metadata["total_size"] = sum(io.safetensors_nbytes(os.path.join(output_dir, name)) for name in shard_bytes)
        weights = {name: file for name, file in weight_map.items() if not name.endswith(SCALE_SUFFIX)}
        io.atomic_write_json({"metadata": metadata, "weight_map": weights}, os.path.join(output_dir, INDEX_FILE),
                             sort_keys=True)
        manifest.record(INDEX_FILE)
    return {"shards": len(jobs), "converted": len(todo), "skipped": len(jobs) - len(todo),
            "input_bytes": sum(shard_bytes.values()), "seconds": time.monotonic() - start}
