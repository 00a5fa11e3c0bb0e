"""Input files -> chunks -> records.

A chunk is a byte range of a JSON-lines file, one row group of a parquet file, or a whole
``.json`` file holding one array. Chunks depend on the files and ``chunk_bytes`` only, never
on the number of workers, so the output is the same whatever ``--workers`` is.

A JSON-lines chunk owns the lines that *start* inside its byte range; the reader of a chunk
skips the partial line at its start (the previous chunk reads it to its end).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple, Union

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Chunk:
    path: str
    kind: str  # "jsonl" | "json_array" | "parquet"
    start: int  # jsonl: byte offset; parquet: row group
    end: int  # jsonl: byte offset (exclusive); parquet: row group + 1
    nbytes: int  # input bytes it stands for (progress)

    def __str__(self) -> str:
        if self.kind == "jsonl":
            return f"{self.path} bytes {self.start}..{self.end}"
        return f"{self.path} row group {self.start}" if self.kind == "parquet" else self.path


# A record, or the reason a line could not be one, with where it was found.
Item = Tuple[str, Union[dict, str]]


def input_files(spec: str) -> List[str]:
    """``--input``: a file, a directory (its .jsonl/.json/.parquet files) or a glob; sorted."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(SUFFIXES)]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"--input {spec}: no file found (a file, a directory or a glob of "
                                f"{', '.join(SUFFIXES)} files)")
    unknown = [f for f in files if not f.endswith(SUFFIXES)]
    if unknown:
        raise ValueError(f"--input: {unknown[0]} is not one of {', '.join(SUFFIXES)}")
    return sorted(files)


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pq.ParquetFile(path)


def plan_chunks(files: List[str], chunk_bytes: int) -> List[Chunk]:
    chunks: List[Chunk] = []
    for path in files:
        size = os.path.getsize(path)
        if path.endswith(".parquet"):
            groups = _parquet_file(path).num_row_groups
            chunks += [Chunk(path, "parquet", g, g + 1, size // max(groups, 1)) for g in range(groups)]
        elif path.endswith(".json") and _is_json_array(path):
            chunks.append(Chunk(path, "json_array", 0, size, size))
        else:
            chunks += [Chunk(path, "jsonl", s, min(s + chunk_bytes, size), min(chunk_bytes, size - s))
                       for s in range(0, size, chunk_bytes)]
    return chunks


def read_chunk(chunk: Chunk) -> Iterator[Item]:
    """``(location, record)`` for each record; ``(location, reason)`` for a line that is not one."""
    if chunk.kind == "parquet":
        rows = _parquet_file(chunk.path).read_row_group(chunk.start).to_pylist()
        yield from ((f"{chunk.path} row group {chunk.start} row {i}", row) for i, row in enumerate(rows))
    elif chunk.kind == "json_array":
        yield from _read_json_array(chunk.path)
    else:
        yield from _read_jsonl(chunk)


def _read_json_array(path: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        try:
            records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            # One broken array loses every record in it: that is an error, not a malformed record.
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: a .json input holds one array of records (or JSON lines)")
    for i, record in enumerate(records):
        yield f"{path} record {i}", record if isinstance(record, dict) else "not a JSON object"


def _read_jsonl(chunk: Chunk) -> Iterator[Item]:
    with open(chunk.path, "rb") as f:
        if chunk.start > 0:
            f.seek(chunk.start - 1)
            f.readline()  # the rest of a line that started in the previous chunk
        while True:
            offset = f.tell()
            if offset >= chunk.end:
                return
            line = f.readline()
            if not line:
                return
            if not line.strip():
                continue
            where = f"{chunk.path} byte {offset}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield where, "bad JSON"
                continue
            yield where, record if isinstance(record, dict) else "not a JSON object"


def line_number(location: str) -> str:
    """``path byte N`` -> ``path:line``: counted only for the few reported examples."""
    path, sep, offset = location.rpartition(" byte ")
    if not sep:
        return location
    newlines, left = 0, int(offset)
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 20))
            newlines += block.count(b"\n")
            left -= len(block)
    return f"{path}:{newlines + 1}"
