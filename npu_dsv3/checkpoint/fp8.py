"""DeepSeek's FP8 release -> an ordinary BF16 HF checkpoint, one shard at a time.

In the release every 2-D linear weight is ``float8_e4m3fn`` with a companion
``<name>_scale_inv`` (fp32, one scale per 128x128 block, edge blocks ragged);
everything else (norms, embeddings, router bias, ...) is stored as is. The BF16
weight is ``bf16(fp32(w) * scale_inv[i // 128, j // 128])``.

Each output shard has the name of its input shard and is produced by one worker
that reads only that shard (plus the few scales the index places in another
shard) and writes it header first, one tensor at a time
(``writers.save_safetensors_streamed``, which also yields the manifest digest),
so memory stays at about one tensor per worker whatever the shard or model
size, and an interrupted job resumes shard by shard (see ``checkpoint.io``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from npu_dsv3.checkpoint import io, writers
from npu_dsv3.checkpoint.hf_reader import INDEX_FILE, CheckpointError, HFCheckpointReader

SCALE_SUFFIX = "_scale_inv"
CONFIG_FILE = "config.json"
DEFAULT_BLOCK = (128, 128)
# Left out of the byte-for-byte copy: huggingface-cli's download bookkeeping
# describes the FP8 files, not ours.
_NOT_COPIED_DIRS = {".cache"}

Block = Union[int, Tuple[int, int]]


# The fp32 value of every float8_e4m3fn bit pattern (NaN at 0x7f and 0xff, -0 at
# 0x80, subnormals at 0x01..0x07), by torch's own cast.
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
# Elements per gather: enough that the two torch calls per chunk (a few us each)
# cost little next to the work, few enough that the int32 indices (1 MiB) stay in cache.
_CHUNK_ELEMENTS = 1 << 18


def dequantize_fp8_block(weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: Block = 128,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bf16(fp32(w) * scale_inv[i // block, j // block])`` for a 2-D weight.

    ``scale_inv`` must be ``ceil(rows / block) x ceil(cols / block)``; ``out``, if
    given, is a contiguous bf16 tensor of the weight's shape to write into.

    An FP8 weight has only 256 distinct values, so within a block the result is a
    function of the byte alone: every block gets a table of ``bf16(fp32(v) * scale)``
    for the 256 bytes ``v``, computed with torch's own multiply and fp32 -> bf16
    cast (hence bit-exact with the formula, rounding and NaN included), and the
    weight's bytes index it: ~1.5 GB/s of FP8 on one core (benchmarks/fp8.py),
    5-10x the old way through torch's fp8 -> fp32 cast, which is not vectorised.
    """
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    if weight_fp8.dim() != 2:
        raise ValueError(f"block-quantized weight must be 2-D, got shape {tuple(weight_fp8.shape)}")
    rows, cols = weight_fp8.shape
    blocks = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight shape ({rows}, {cols}) in "
                         f"{block_rows}x{block_cols} blocks: expected {blocks}")
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.bfloat16)
    # Row band b's tables laid end to end, one 1-D int16 tensor per band (512 bytes per block).
    tables = (_FP8_VALUES * scale_inv.float().unsqueeze(-1)).to(torch.bfloat16).view(torch.int16)
    band_tables = tables.view(blocks[0], blocks[1] * 256).unbind(0)
    # Where each column's table starts in its band's tables.
    table_start = (torch.arange(cols, dtype=torch.int32) // block_cols) * 256
    _gather(weight_fp8.view(torch.uint8), band_tables, table_start, block_rows, out.view(torch.int16).view(-1))
    return out


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value (a larger one casts to NaN)


def fp8_block(hf_config: dict) -> Tuple[int, int]:
    """The weight block of an FP8 release's ``quantization_config`` (DeepSeek's: 128 x 128)."""
    return tuple((hf_config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK)


def is_release_fp8(name: str, shape) -> bool:
    """Whether DeepSeek's FP8 release stores the HF tensor ``name`` in FP8: the 2-D weights of a decoder (or MTP)
    layer's attention and MLP linears; never the router (``mlp.gate``), norms, embeddings, heads or MTP's
    ``eh_proj``."""
    return len(shape) == 2 and re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\..+\.weight", name) is not None \
        and not name.endswith((".mlp.gate.weight", "layernorm.weight"))


def quantize_fp8_block(weight: torch.Tensor, block: Block = 128) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight in DeepSeek's FP8 release format: ``(float8_e4m3fn weight, fp32 scale_inv)``, one scale per
    block (edge blocks ragged) so that the block's largest magnitude lands on 448, the format's largest; an
    all-zero block gets scale 1. ``dequantize_fp8_block`` reverses it up to e4m3's rounding, and exactly when the
    weight came from FP8 codes whose block maximum is 448 with a power-of-two scale (nothing else to round)."""
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    if weight.dim() != 2:
        raise ValueError(f"block-quantized weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    blocks = (-(-rows // block_rows), -(-cols // block_cols))
    padded = weight.new_zeros(blocks[0] * block_rows, blocks[1] * block_cols, dtype=torch.float32)
    padded[:rows, :cols] = weight
    tiles = padded.view(blocks[0], block_rows, blocks[1], block_cols)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    tiles /= scale[:, None, :, None]
    # x / (amax / 448) can round a hair above 448, which e4m3fn would turn into NaN
    codes = padded[:rows, :cols].clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def _gather(codes: torch.Tensor, band_tables, table_start: torch.Tensor, block_rows: int, out: torch.Tensor) -> None:
    """``out[i, j] = band_tables[i // block_rows][table_start[j] + codes[i, j]]``, a chunk of rows at a time.

    The chunks divide the band height, so none straddles two bands, and are split
    up front: per chunk only the index computation and the gather call into torch.
    """
    rows, cols = codes.shape
    target = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    chunk_rows = max(d for d in range(1, min(target, block_rows) + 1) if block_rows % d == 0)
    per_band = block_rows // chunk_rows
    code_chunks, out_chunks = codes.split(chunk_rows), out.split(chunk_rows * cols)
    index = torch.empty(min(chunk_rows, rows), cols, dtype=torch.int32)
    index_flat = index.view(-1)
    for band, tables in enumerate(band_tables):
        for chunk in range(band * per_band, min((band + 1) * per_band, len(code_chunks))):
            if len(code_chunks[chunk]) == chunk_rows:
                torch.add(code_chunks[chunk], table_start, out=index)
                torch.index_select(tables, 0, index_flat, out=out_chunks[chunk])
            else:  # the last rows
                torch.add(code_chunks[chunk], table_start, out=index[: len(code_chunks[chunk])])
                torch.index_select(tables, 0, index_flat[: out_chunks[chunk].numel()], out=out_chunks[chunk])


# --------------------------------------------------------------------------- one shard (runs in a worker)


@dataclass(frozen=True)
class _ShardJob:
    input_dir: str
    output_dir: str
    filename: str
    names: Tuple[str, ...]  # the shard's tensors according to the index
    scale_files: Dict[str, str]  # scale name -> shard holding it, for this shard's weights
    block: Tuple[int, int]


class _ShardFile:
    """A safetensors file read one tensor at a time with plain reads.

    safetensors' ``safe_open`` maps the file, and every page a map has touched
    stays in the process's resident set until the file is closed: converting a
    shard that way shows RSS growing to the shard's size. Read into memory the
    caller owns, RSS stays at the tensors the caller holds.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            header, self.data_start = io.safetensors_header(path)
            self.metadata = header.pop("__metadata__", None)
            self.entries = {name: (writers.dtype_from_safetensors(info["dtype"]), tuple(info["shape"]),
                                   *info["data_offsets"]) for name, info in header.items()}
            for name, (dtype, shape, begin, end) in self.entries.items():
                if end - begin != writers.tensor_nbytes(shape, dtype) or begin < 0:
                    raise ValueError(f"tensor {name}: data_offsets [{begin}, {end}] do not fit {shape} {dtype}")
            data_end = self.data_start + max((end for *_, end in self.entries.values()), default=0)
            if os.path.getsize(path) < data_end:
                raise ValueError(f"it is truncated: its header needs {data_end} bytes")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
        self.file = open(path, "rb", buffering=0)

    def close(self) -> None:
        self.file.close()

    def spec(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read(self, name: str, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor ``name``, in ``memory`` (uint8, large enough) if given, else in memory of its own."""
        dtype, shape, begin, end = self.entries[name]
        data = torch.empty(end - begin, dtype=torch.uint8) if memory is None else memory[: end - begin]
        view, done = memoryview(data.numpy()), 0
        try:
            self.file.seek(self.data_start + begin)
            while done < len(view) and (n := self.file.readinto(view[done:])):
                done += n
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.path} ({e}); re-download it") from e
        if done != len(view):
            raise CheckpointError(f"cannot read tensor {name} from {self.path}: the file is truncated; re-download it")
        return data.view(dtype).reshape(shape)


def _output_spec(job: _ShardJob, src: _ShardFile, name: str) -> Tuple[str, Tuple[int, ...], torch.dtype]:
    """``(name, shape, dtype)`` of an output tensor; refuses what cannot be converted before anything is written."""
    dtype, shape = src.spec(name)
    where, scale_name = f"tensor {name} in {src.path}", name + SCALE_SUFFIX
    if dtype == torch.float8_e4m3fn:
        if scale_name not in job.scale_files:
            raise CheckpointError(f"{where} is float8_e4m3fn but the checkpoint has no {scale_name}")
        return name, shape, torch.bfloat16
    if scale_name in job.scale_files:
        raise CheckpointError(f"{where} has a {scale_name} but is {dtype}, not float8_e4m3fn")
    if dtype.is_floating_point and dtype.itemsize == 1:
        raise CheckpointError(f"{where} is {dtype}; only float8_e4m3fn with block scales is supported")
    return name, shape, dtype


class _Scratch:
    """Memory reused from tensor to tensor and shard to shard, grown as needed.

    A fresh allocation of tens of MB costs a page fault per 4 KiB page, which on
    the machines measured takes about as long as dequantising into it; a worker
    keeps its buffers instead, so its memory stays at a few of the largest
    tensors it met.
    """

    def __init__(self):
        self._buffers: Dict[object, torch.Tensor] = {}

    def get(self, key, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of buffer ``key`` (uint8), valid until the next ``get`` of ``key``."""
        if key not in self._buffers or self._buffers[key].numel() < nbytes:
            self._buffers.pop(key, None)  # freed before its successor is allocated
            self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[key][:nbytes]

    def clear(self) -> None:
        self._buffers.clear()


_SCRATCH = _Scratch()


def _converted(job: _ShardJob, src: _ShardFile, shard, plan) -> Iterator[torch.Tensor]:
    """The output tensors of ``plan``, one at a time, in ``_SCRATCH``'s memory.

    Two output buffers alternate because ``_ahead`` produces the next tensor while
    the writer still writes this one; the FP8 bytes need one, only dequantisation
    reads them.
    """
    for i, (name, shape, dtype) in enumerate(plan):
        memory = _SCRATCH.get(("out", i % 2), writers.tensor_nbytes(shape, dtype))
        if src.spec(name)[0] != torch.float8_e4m3fn:
            yield src.read(name, memory)
            continue
        scale_name = name + SCALE_SUFFIX
        scale = shard(job.scale_files[scale_name]).read(scale_name)
        weight = src.read(name, _SCRATCH.get("fp8", src.nbytes(name)))
        try:
            tensor = dequantize_fp8_block(weight, scale, job.block, out=memory.view(dtype).view(shape))
        except ValueError as e:
            raise CheckpointError(f"tensor {name} in {src.path}: {e}") from e
        yield tensor


_END = object()


def _ahead(items: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``items``, each produced in a thread while the caller consumes the one before.

    Reading and dequantising the next tensor (torch kernels and file reads release
    the GIL) overlaps writing and checksumming this one (so do ``write`` and
    ``zlib.crc32``): a shard costs about the larger of the two instead of their sum.
    The caller must be done with a tensor when it asks for the next one (the
    writer is), as its memory is then reused.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as producer:
        pending = producer.submit(next, items, _END)
        while (item := pending.result()) is not _END:
            pending = producer.submit(next, items, _END)
            yield item


def _convert_shard(job: _ShardJob) -> Dict[str, object]:
    """Writes one BF16 shard atomically, tensor by tensor; returns its digest for the manifest."""
    with contextlib.ExitStack() as stack:
        files: Dict[str, _ShardFile] = {}

        def shard(filename: str) -> _ShardFile:
            if filename not in files:
                files[filename] = _ShardFile(os.path.join(job.input_dir, filename))
                stack.callback(files[filename].close)
            return files[filename]

        src = shard(job.filename)
        stored, listed = set(src.entries), set(job.names)
        if stored != listed:
            raise CheckpointError(f"{src.path} does not hold the tensors {INDEX_FILE} assigns to it (missing: "
                                  f"{sorted(listed - stored)[:5]}, not listed: {sorted(stored - listed)[:5]})")
        plan = [_output_spec(job, src, name) for name in job.names if not name.endswith(SCALE_SUFFIX)]
        out_path = os.path.join(job.output_dir, job.filename)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        # Closed (its producer thread joined) before the files it reads.
        tensors = stack.enter_context(contextlib.closing(_ahead(_converted(job, src, shard, plan))))
        # One torch thread: the second core is the writer's (or another worker's).
        stack.enter_context(io.single_threaded_torch())
        with io.atomic_write(out_path) as tmp:
            return writers.save_safetensors_streamed(plan, tensors, tmp, metadata=src.metadata)


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
    if not any(name.endswith(SCALE_SUFFIX) for name in weight_map):
        # Without block scales there is no FP8 weight to cast: the output would be a copy.
        raise CheckpointError(f"{input_dir} is not an FP8 checkpoint (no *{SCALE_SUFFIX} tensors); it needs no "
                              "fp8-to-bf16 conversion, use it as it is")
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
    byte. ``workers`` shards are converted at a time, each worker holding about
    its shard's largest tensor in memory (FP8 and BF16). With ``resume`` an interrupted run in ``output_dir``
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

        try:
            io.parallel_map(_convert_shard, [job for job in jobs if job.filename in todo], workers,
                            on_result=finished, label=lambda job: os.path.join(input_dir, job.filename))
        finally:
            _SCRATCH.clear()  # with one worker the shards were converted in this process

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
