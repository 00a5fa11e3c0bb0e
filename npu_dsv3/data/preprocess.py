"""``npu-dsv3 data preprocess``: jsonl / json / parquet -> megatron indexed datasets.

Flags follow MindSpeed-LLM's ``preprocess_data.py``; so do the outputs:
``{prefix}_{key}_document.bin/.idx`` for pretraining text and
``{prefix}_packed_{input_ids,labels,attention_mask}_document.bin/.idx`` for instruction data
(train with ``--data-path {prefix}``).

How a run goes: the inputs are cut into chunks (:mod:`npu_dsv3.data.reader`); each worker
tokenizes whole chunks into temporary indexed datasets; the main process then concatenates
them in chunk order (or packs them, ``--pack``) into the outputs. Chunks do not depend on
``--workers``, so neither do the output bytes. Outputs appear under their final names only
when complete, ``.idx`` last, after any older ``.idx`` of the same name was removed: an
interrupted run never leaves a pair that looks complete.

Malformed records (bad JSON, missing key, wrong type, empty text, broken conversation) are
counted per reason. More than ``--max-malformed-fraction`` of them (default 0: any) fails the
run before anything is written; the summary line always reports them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy

from npu_dsv3.argtypes import positive_int
from npu_dsv3.checkpoint.io import TEMP_SUFFIX, atomic_write, parallel_map, progress
from npu_dsv3.data.chat_template import PROMPT_TYPES
from npu_dsv3.data.handlers import HANDLERS, IGNORE_INDEX, Malformed, make_handler, parse_map_keys
from npu_dsv3.data.packing import best_fit_decreasing, pack_sequence
from npu_dsv3.data.reader import Chunk, input_files, line_number, plan_chunks, read_chunk
from npu_dsv3.data.tokenizer import TOKENIZER_TYPES, load_tokenizer

_log = logging.getLogger(__name__)

ENCODE_BATCH = 1000  # records per tokenizer call: large enough to amortise the call, small in memory
MAX_EXAMPLES = 5  # malformed records shown by location


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="training data: preprocess raw text into megatron indexed datasets")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = sub.add_parser(
        "preprocess", help="jsonl/json/parquet -> megatron .bin/.idx with an HF tokenizer",
        description="Tokenize jsonl/json/parquet records into megatron indexed datasets (MindSpeed-LLM "
        "preprocess_data.py flags and output names). Prints one JSON summary line.")
    p.add_argument("--input", required=True, help="a file, a directory or a glob of .jsonl/.json/.parquet files")
    p.add_argument("--output-prefix", required=True, help="outputs are {prefix}_..._document.bin/.idx")
    p.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=TOKENIZER_TYPES,
                   help="an HF tokenizer, or NullTokenizer (text of space-separated ids) (default %(default)s)")
    p.add_argument("--tokenizer-name-or-path", help="local HF tokenizer directory (PretrainedFromHF)")
    p.add_argument("--vocab-size", type=positive_int, help="NullTokenizer: ids 0..N-1 are text, N is eod")
    p.add_argument("--handler-name", default="GeneralPretrainHandler", choices=list(HANDLERS),
                   help="pretraining text, or Alpaca / ShareGPT instruction records (default %(default)s)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="GeneralPretrainHandler: record fields to tokenize, one dataset each (default: text)")
    p.add_argument("--append-eod", action="store_true", help="end each pretraining document with the eos token")
    p.add_argument("--prompt-type", default="deepseek3", choices=PROMPT_TYPES, help="chat template (instruction data)")
    p.add_argument("--map-keys", help="instruction field names as JSON, e.g. '{\"prompt\": \"question\"}' "
                   "(Alpaca: prompt, query, response, system, history; ShareGPT: messages, system, tags)")
    p.add_argument("--seq-length", type=int,
                   help="instruction data: samples longer than this are dropped (and counted); with --pack, "
                   "the length of every packed sequence")
    p.add_argument("--pack", action="store_true", help="pack instruction samples into --seq-length sequences")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--chunk-mb", type=float, default=16.0,
                   help="JSON-lines input is split into chunks of this many MiB (default 16); parquet by row group")
    p.add_argument("--max-malformed-fraction", type=float, default=0.0,
                   help="fail when more than this fraction of records is malformed (default 0: any)")
    return data


def run(args: argparse.Namespace) -> int:
    summary = preprocess(Job.from_args(args))
    print(json.dumps(summary))
    return 0


@dataclass(frozen=True)
class Job:
    """One preprocessing run: the flags of ``npu-dsv3 data preprocess``, by their dest, with their defaults."""

    input: str
    output_prefix: str
    tokenizer_type: str = "PretrainedFromHF"
    tokenizer_name_or_path: Optional[str] = None
    vocab_size: Optional[int] = None
    handler_name: str = "GeneralPretrainHandler"
    json_keys: Tuple[str, ...] = ("text",)
    append_eod: bool = False
    prompt_type: str = "deepseek3"
    map_keys: Optional[str] = None
    seq_length: Optional[int] = None
    pack: bool = False
    workers: int = 1
    chunk_mb: float = 16.0
    max_malformed_fraction: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Job":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "json_keys": tuple(values["json_keys"])})


# --------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class Options:
    """Everything a worker needs to turn a chunk into token ids (picklable)."""

    tokenizer: tuple  # (type, name_or_path, vocab_size)
    handler: str
    json_keys: tuple
    append_eod: bool
    prompt_type: str
    map_keys: Optional[str]
    seq_length: Optional[int]

    def make_handler(self):
        return make_handler(self.handler, json_keys=self.json_keys, append_eod=self.append_eod,
                            prompt_type=self.prompt_type, map_keys=parse_map_keys(self.map_keys))


@dataclass(frozen=True)
class Task:
    chunk: Chunk
    prefix: str  # temporary per-chunk prefix; datasets at {prefix}_{key}
    dtype: str
    options: Options


def _chunk_stats() -> dict:
    return {"records": 0, "documents": 0, "tokens": 0, "too_long": 0,
            "malformed": collections.Counter(), "examples": []}


def process_chunk(task: Task) -> dict:
    """Tokenize one chunk into ``{task.prefix}_{key}.bin/.idx``; returns its counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    handler = task.options.make_handler()
    tokenizer = load_tokenizer(*task.options.tokenizer)
    builders = {key: IndexedDatasetBuilder(f"{task.prefix}_{key}.bin", dtype=numpy.dtype(task.dtype).type)
                for key in handler.keys}
    stats = _chunk_stats()

    def reject(where: str, reason: str) -> None:
        stats["malformed"][reason] += 1
        if len(stats["examples"]) < MAX_EXAMPLES:
            stats["examples"].append((where, reason))

    def flush(batch: List[tuple]) -> None:
        encoded = handler.encode([parsed for _, parsed in batch], tokenizer)
        for (where, _), sample in zip(batch, encoded):
            if isinstance(sample, Malformed):
                reject(where, str(sample))
                continue
            n = len(sample[handler.keys[0]])
            if handler.instruction and task.options.seq_length and n > task.options.seq_length:
                stats["too_long"] += 1
                continue
            for key in handler.keys:
                builders[key].add_document(sample[key], [len(sample[key])])
            stats["documents"] += 1
            stats["tokens"] += n

    batch: List[tuple] = []
    for where, record in read_chunk(task.chunk):
        stats["records"] += 1
        if isinstance(record, str):
            reject(where, record)
            continue
        try:
            batch.append((where, handler.parse(record)))
        except Malformed as e:
            reject(where, str(e))
        if len(batch) == ENCODE_BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    for key, builder in builders.items():
        builder.finalize(f"{task.prefix}_{key}.idx")
    return stats


# --------------------------------------------------------------------------- main process


def _validate(args: Job, handler) -> None:
    from npu_dsv3.argtypes import output_dir_problem

    problem = output_dir_problem(os.path.dirname(os.path.abspath(args.output_prefix)))
    if problem:  # found now, not after the tokenizing
        raise ValueError(f"--output-prefix {args.output_prefix}: {problem}; give a prefix in a directory this run "
                         "can write")
    if not 0.0 <= args.max_malformed_fraction <= 1.0:
        raise ValueError(f"--max-malformed-fraction must lie in [0, 1], got {args.max_malformed_fraction}")
    if args.chunk_mb <= 0:
        raise ValueError(f"--chunk-mb must be positive, got {args.chunk_mb}")
    if args.seq_length is not None and args.seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {args.seq_length}")
    if not handler.instruction:
        if args.pack:
            raise ValueError("--pack is for instruction handlers: pretraining text is cut into --seq-length "
                             "samples by GPTDataset at training time")
        if args.seq_length is not None:
            raise ValueError("--seq-length is for instruction handlers: pretraining documents are stored whole")
    elif args.pack and args.seq_length is None:
        raise ValueError("--pack needs --seq-length (the length of each packed sequence)")


def _merge(stats: List[dict]) -> dict:
    total = _chunk_stats()
    for s in stats:
        for k in ("records", "documents", "tokens", "too_long"):
            total[k] += s[k]
        total["malformed"].update(s["malformed"])
        total["examples"] += s["examples"][:MAX_EXAMPLES - len(total["examples"])]
    return total


def _check_malformed(total: dict, limit: float) -> None:
    bad = sum(total["malformed"].values())
    if bad:
        shown = "; ".join(f"{line_number(where)}: {reason}" for where, reason in total["examples"])
        _log.warning(f"npu-dsv3 data preprocess: {bad} malformed record(s) skipped: {shown}")
    if total["records"] and bad / total["records"] > limit:
        reasons = ", ".join(f"{n} {reason}" for reason, n in total["malformed"].most_common())
        raise ValueError(f"{bad} of {total['records']} records are malformed ({reasons}), more than "
                         f"--max-malformed-fraction {limit}; nothing was written. Fix the input or raise the limit")
    if total["documents"] == 0:
        raise ValueError("no document to write (every record was malformed or too long)")


@contextlib.contextmanager
def _outputs(prefixes: Dict[str, str], dtype):
    """Builders writing ``{prefix}.bin`` per key; on success every .bin is renamed into place,
    then every .idx (so a complete-looking pair is a complete one)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def drop_stale_idx(exc_type, exc, tb) -> bool:
        # Runs before any rename: an old .idx must not pair with a new .bin if we die midway.
        if exc_type is None:
            for prefix in prefixes.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(prefix + ".idx")
        return False

    with contextlib.ExitStack() as stack:
        idx = {k: stack.enter_context(atomic_write(p + ".idx")) for k, p in prefixes.items()}
        bins = {k: stack.enter_context(atomic_write(p + ".bin")) for k, p in prefixes.items()}
        stack.push(drop_stale_idx)
        builders = {k: IndexedDatasetBuilder(bins[k], dtype=dtype) for k in prefixes}
        yield builders
        for k, builder in builders.items():
            builder.finalize(idx[k])


def _concatenate(builders: dict, chunk_prefixes: List[str]) -> None:
    # megatron's add_index runs gc.collect() on every call, which walks every live object:
    # 0.26 s per call with transformers loaded, minutes for thousands of chunks. Frozen
    # objects are skipped, and none of them is garbage made here.
    gc.freeze()
    try:
        for prefix in chunk_prefixes:
            for key, builder in builders.items():
                builder.add_index(f"{prefix}_{key}")
    finally:
        gc.unfreeze()


def _pack(builders: dict, chunk_prefixes: List[str], seq_length: int, pad_id: int) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    inputs = [IndexedDataset(f"{p}_input_ids") for p in chunk_prefixes]
    labels = [IndexedDataset(f"{p}_labels") for p in chunk_prefixes]
    where = [(c, i) for c, ds in enumerate(inputs) for i in range(len(ds))]
    lengths = numpy.concatenate([ds.sequence_lengths for ds in inputs]).tolist()
    packs = best_fit_decreasing(lengths, seq_length)
    for pack in packs:
        samples = [{"input_ids": inputs[c][i], "labels": labels[c][i]} for c, i in (where[j] for j in pack)]
        for key, values in pack_sequence(samples, seq_length, pad_id, IGNORE_INDEX).items():
            builders[key].add_document(values, [seq_length])
    return len(packs)


def preprocess(args: Job) -> dict:
    """Runs the whole job; returns the summary (also what ``run`` prints). Notes on skipped records go to
    this module's logger."""
    from megatron.core.datasets.indexed_dataset import DType

    start = time.perf_counter()
    options = Options((args.tokenizer_type, args.tokenizer_name_or_path, args.vocab_size), args.handler_name,
                      args.json_keys, args.append_eod, args.prompt_type, args.map_keys, args.seq_length)
    handler = options.make_handler()
    _validate(args, handler)
    if args.workers > 1:
        # Forked workers tokenize in parallel already; HF's own thread pool would oversubscribe.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(*options.tokenizer)
    # int32 where labels hold -100; else megatron's choice: uint16 below 65500 ids.
    dtype = numpy.int32 if handler.instruction else DType.optimal_dtype(tokenizer.vocab_size)
    chunks = plan_chunks(input_files(args.input), max(1, int(args.chunk_mb * (1 << 20))))

    out_dir, name = os.path.split(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = os.path.join(out_dir, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    os.makedirs(tmp_dir)
    try:
        tasks = [Task(c, os.path.join(tmp_dir, f"chunk{i:06d}"), numpy.dtype(dtype).name, options)
                 for i, c in enumerate(chunks)]
        stats = _tokenize(tasks, args.workers, start)
        total = _merge(stats)
        _check_malformed(total, args.max_malformed_fraction)
        prefixes = {k: f"{args.output_prefix}_{handler.output_name(k)}" for k in handler.keys}
        packed = None
        with _outputs(prefixes, dtype) as builders:
            if args.pack:
                packed = _pack(builders, [t.prefix for t in tasks], args.seq_length, tokenizer.pad)
            else:
                _concatenate(builders, [t.prefix for t in tasks])
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _summary(args, total, prefixes, packed, time.perf_counter() - start)


def _tokenize(tasks: List[Task], workers: int, start: float) -> List[dict]:
    bar = progress(sum(t.chunk.nbytes for t in tasks), desc="preprocess")
    done = {"documents": 0, "tokens": 0}

    def on_result(task: Task, stats: dict) -> None:
        done["documents"] += stats["documents"]
        done["tokens"] += stats["tokens"]
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{done['documents'] / elapsed:.0f} docs/s, {done['tokens'] / elapsed:.0f} tokens/s",
                            refresh=False)
        bar.update(task.chunk.nbytes)

    try:
        return parallel_map(process_chunk, tasks, workers=workers, on_result=on_result, label=lambda t: str(t.chunk))
    finally:
        bar.close()


def _summary(args: Job, total: dict, prefixes: Dict[str, str], packed: Optional[int], seconds: float) -> dict:
    summary = {
        "output_prefix": args.output_prefix,
        "datasets": sorted(prefixes.values()),
        "handler": args.handler_name,
        "records": total["records"],
        "documents": total["documents"],
        "tokens": total["tokens"],
        "malformed": sum(total["malformed"].values()),
        "malformed_by_reason": dict(total["malformed"].most_common()),
        "dropped_longer_than_seq_length": total["too_long"],
        "workers": args.workers,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total["tokens"] / max(seconds, 1e-9)),
    }
    if packed is not None:
        summary["packed_sequences"] = packed
    if total["too_long"]:
        _log.warning(f"npu-dsv3 data preprocess: {total['too_long']} sample(s) longer than --seq-length "
                     f"{args.seq_length} dropped")
    return summary
