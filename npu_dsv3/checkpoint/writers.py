"""Writers that put a checkpoint file on disk one tensor at a time.

A converter's output file can be far larger than memory (a 671B rank file is
7.5 GB), so neither writer ever holds more than the piece being written:

- :func:`save_torch_streamed` writes what ``torch.save(payload)`` writes (the zip
  format megatron's ``model_optim_rng.pt`` uses) from a payload skeleton and one
  producer per tensor;
- :func:`save_safetensors_streamed` writes a safetensors file header first, then
  each tensor as it is produced.

Both return the file's manifest digest (:func:`npu_dsv3.checkpoint.io.file_digest`'s
format) computed from the bytes as they were written, so recording a finished
file needs no second read of it.
"""

import json
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from npu_dsv3.checkpoint import io

# Bytes go out 8 MiB per write call: on the VMs measured here one write of a few hundred MB into
# a new file ran at 0.4-1.1 GB/s and the same bytes in 8 MiB pieces at 4.6-5.0 GB/s; Linux also
# moves at most ~2 GiB per call. The CRC of a piece is taken while it is still in cache.
WRITE_CHUNK = 8 << 20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's elements as raw bytes in row-major order (no copy when it is contiguous)."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + WRITE_CHUNK], offset + done)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0:
        part = os.pread(fd, min(size, WRITE_CHUNK), offset)
        if not part:
            raise OSError(f"unexpected end of file at byte {offset}")
        parts.append(part)
        offset, size = offset + len(part), size - len(part)
    return b"".join(parts)


# --------------------------------------------------------------------------- torch zip


@dataclass(frozen=True)
class ZipRecord:
    """A record of a torch zip file: where its bytes, its CRC-32 and both copies of the CRC live."""

    name: str
    data_offset: int
    size: int
    crc: int  # as the central directory records it
    local_crc_offset: int
    central_crc_offset: int

    @property
    def index(self) -> int:
        """torch's storage key (storages are numbered in pickling order), or -1 for torch's own records."""
        parent, _, key = self.name.rpartition("/")
        return int(key) if parent.endswith("/data") and key.isdigit() else -1


def zip_records(path: str) -> List[ZipRecord]:
    """Every record of a torch zip file, in the central directory's order; only the headers are read.

    zipfile finds each entry's local header (zip64 included); the central
    directory is walked by hand because zipfile does not say where each entry's
    central record is, and the CRC must be patched there too.
    """
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos = zf.infolist()
        cd_offsets, pos = [], zf.start_dir
        for _ in infos:
            f.seek(pos)
            fixed = f.read(46)
            name_len, extra_len, comment_len = struct.unpack("<HHH", fixed[28:34])
            cd_offsets.append(pos)
            pos += 46 + name_len + extra_len + comment_len
        records = []
        for info, cd in zip(infos, cd_offsets):
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            records.append(ZipRecord(info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size,
                                     info.CRC, info.header_offset + 14, cd + 16))
    return records


def _storage_records(path: str) -> List[ZipRecord]:
    """The tensor storage records of a torch zip file, by storage key."""
    return sorted((r for r in zip_records(path) if r.index >= 0), key=lambda r: r.index)


def _fake(obj, mode):
    """``obj`` with every tensor replaced by a FakeTensor of its shape and dtype, each with its
    own storage: what ``skip_data(materialize_fake_tensors=True)`` saves as a CPU tensor."""
    if isinstance(obj, torch.Tensor):
        with mode:
            return torch.empty(tuple(obj.shape), dtype=obj.dtype)
    if isinstance(obj, dict):
        return {key: _fake(value, mode) for key, value in obj.items()}
    return obj


def save_torch_streamed(skeleton, producers: Sequence[Callable[[], Iterable[torch.Tensor]]], path: str) -> dict:
    """``torch.save(payload, path)`` without ever holding the payload's tensors together.

    ``skeleton`` is the payload (nested dicts) with tensors that only need a shape
    and a dtype: meta tensors. ``producers[i]`` belongs to the i-th tensor met in
    pickling order (depth first, dict order) and returns pieces whose bytes,
    concatenated, are that tensor's row-major data in its dtype: a grouped expert
    weight can come one expert at a time.

    How: ``torch.save`` under ``torch.serialization.skip_data`` writes the whole
    zip (pickle, 64-byte aligned uncompressed records, central directory) with
    holes where the storage bytes go. Each producer's bytes are written into
    their hole as they come, and the record's CRC-32 (zero in the skeleton) is
    computed on the way and patched into its local and central headers. torch's
    reader does not check CRCs, but Python's zipfile and ``unzip -t`` do, and at
    6 GB/s the CRC is cheap next to the write; it also yields the manifest digest
    of the whole file by combining the record CRCs with the CRCs of the few
    kilobytes between them. The result is byte for byte a normal torch file:
    ``torch.load`` (``weights_only``, ``mmap``), megatron and MindSpeed read it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Into an open file: torch names a file's records after the path it is given, which here is a
    # temporary name with a random part (``io.atomic_write``); a file object gets the fixed "archive/".
    with torch.serialization.skip_data(materialize_fake_tensors=True), open(path, "wb") as f:
        torch.save(_fake(skeleton, FakeTensorMode()), f)
    records = _storage_records(path)
    if [r.index for r in records] != list(range(len(producers))):
        raise ValueError(f"the skeleton has {len(records)} tensor storages, but {len(producers)} producers were given")
    fd = os.open(path, os.O_RDWR)
    try:
        crcs = [_fill(fd, record, produce()) for record, produce in zip(records, producers)]
        for record, crc in zip(records, crcs):
            packed = struct.pack("<I", crc)
            os.pwrite(fd, packed, record.local_crc_offset)
            os.pwrite(fd, packed, record.central_crc_offset)
        return _file_digest_from_records(fd, records, crcs)
    finally:
        os.close(fd)


def _fill(fd: int, record: ZipRecord, pieces: Iterable[torch.Tensor]) -> int:
    """Writes ``pieces`` into ``record``'s hole; their CRC-32."""
    crc, written = 0, 0
    for piece in pieces:
        data = tensor_bytes(piece)
        if written + len(data) > record.size:
            raise ValueError(f"tensor storage {record.index}: the producer gave more than its {record.size} bytes")
        _pwrite_all(fd, data, record.data_offset + written)
        crc = zlib.crc32(data, crc)
        written += len(data)
    if written != record.size:
        raise ValueError(f"tensor storage {record.index}: the producer gave {written} of its {record.size} bytes")
    return crc


def _file_digest_from_records(fd: int, records: Sequence[ZipRecord], crcs: Sequence[int]) -> dict:
    """The whole file's digest: the bytes between records are read back (headers and pickle,
    a few kB), the records' CRCs are combined in."""
    size = os.fstat(fd).st_size
    crc, pos = 0, 0
    for record, record_crc in sorted(zip(records, crcs), key=lambda rc: rc[0].data_offset):
        crc = zlib.crc32(_pread_all(fd, record.data_offset - pos, pos), crc)
        crc = io.crc32_combine(crc, record_crc, record.size)
        pos = record.data_offset + record.size
    crc = zlib.crc32(_pread_all(fd, size - pos, pos), crc)
    return io.digest_of(size, crc)


def digest_from_records(path: str) -> dict:
    """A torch zip file's manifest digest (``io.file_digest``'s) from the CRC-32s its headers record
    for the storages and the bytes between them: all but the storage bytes are read. It equals
    ``io.file_digest(path)`` when every storage holds the bytes its recorded CRC describes."""
    records = _storage_records(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _file_digest_from_records(fd, records, [r.crc for r in records])
    finally:
        os.close(fd)


def record_crc(path: str, record: ZipRecord) -> int:
    """The CRC-32 of ``record``'s bytes as they are in the file now, read a chunk at a time."""
    crc = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in range(0, record.size, WRITE_CHUNK):
            crc = zlib.crc32(_pread_all(fd, min(WRITE_CHUNK, record.size - start), record.data_offset + start), crc)
    finally:
        os.close(fd)
    return crc


# --------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


def _header_bytes(plan: Sequence[Tuple[str, Sequence[int], torch.dtype]], metadata: Dict[str, str] = None) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``plan``'s
    ``(name, shape, dtype)`` tensors back to back in that order; the JSON is padded
    with spaces to a multiple of 8 bytes so every tensor starts aligned, as
    safetensors itself does."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape, dtype in plan:
        end = offset + tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_safetensors_streamed(plan: Sequence[Tuple[str, Sequence[int], torch.dtype]], tensors: Iterator[torch.Tensor],
                              path: str, metadata: Dict[str, str] = None,
                              on_tensor: Callable[[int], None] = None) -> dict:
    """A safetensors file of ``plan``'s tensors, written header first and then each
    tensor from ``tensors`` (in ``plan``'s order) as it arrives, sequentially.
    ``on_tensor(n_bytes)`` after each tensor (a progress bar). Loads with
    ``safetensors.torch.load_file`` and transformers like ``save_file``'s output."""
    header = _header_bytes(plan, metadata)
    crc, size = zlib.crc32(header), len(header)
    with open(path, "wb") as f:
        f.write(header)
        for (name, shape, dtype), tensor in zip(plan, tensors):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: planned as {tuple(shape)} {dtype}, produced as "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")
            data = tensor_bytes(tensor)
            for start in range(0, len(data), WRITE_CHUNK):
                piece = data[start:start + WRITE_CHUNK]
                f.write(piece)
                crc = zlib.crc32(piece, crc)
            size += len(data)
            if on_tensor is not None:
                on_tensor(len(data))
    if size != len(header) + sum(tensor_nbytes(shape, dtype) for _, shape, dtype in plan):
        raise ValueError(f"{path}: fewer tensors were produced than planned")
    return io.digest_of(size, crc)


def safetensors_dtype(name: str) -> Optional[torch.dtype]:
    """The torch dtype of a safetensors dtype name ("BF16", "F8_E4M3", ...), None if unknown."""
    for dtype, known in _SAFETENSORS_DTYPES.items():
        if known == name:
            return dtype
    return None


def dtype_from_safetensors(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16", "F8_E4M3", ...)."""
    dtype = safetensors_dtype(name)
    if dtype is None:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return dtype
