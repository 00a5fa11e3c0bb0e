"""What training reads: megatron's GPTDataset (pretraining, blended) and the instruction
dataset over ``npu-dsv3 data preprocess``'s ``{prefix}_packed_*_document`` files.

Both give megatron's sample dict: ``tokens``, ``labels`` (next token; 0 where the loss is
off), ``loss_mask``, ``position_ids`` and, with ``create_attention_mask``, a boolean
``attention_mask`` [1, s, s] where True hides a key from a query (megatron's convention).
The instruction dataset also gives ``cu_seqlens``, the document starts for packed-sequence
attention (``npu_dsv3.ops.mla_attention(..., cu_seqlens=...)``); ``SampleStream`` and
``collate_instruction`` turn its samples into fine-tuning micro-batches.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy
import torch

from npu_dsv3.data.handlers import IGNORE_INDEX, INSTRUCTION_KEYS
from npu_dsv3.data.tokenizer import Tokenizer


class _GPTTokenizer:
    """What GPTDatasetConfig reads from a tokenizer. No ``pad``: pretraining documents hold no
    padding, and a pad id equal to eod (DeepSeek-V3 pads with eos) would make megatron stop
    masking pad labels, with a warning per dataset; its default pad id (-1) matches no token."""

    def __init__(self, tokenizer: Tokenizer, prefixes: Sequence[str] = ()):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        # megatron hashes the dataset config, tokenizer included, to name its index caches, but not the
        # data: with the files' sizes and times in the hash, data written again under the same prefix
        # gets new caches instead of indices into the old documents.
        self.unique_identifiers = OrderedDict(kind=tokenizer.kind, name_or_path=tokenizer.name_or_path,
                                              vocab_size=tokenizer.vocab_size,
                                              data_files=[_file_stamp(p) for p in prefixes])


def _file_stamp(prefix: str) -> List[int]:
    stats = [os.stat(prefix + suffix) for suffix in (".bin", ".idx")]
    return [n for st in stats for n in (st.st_size, st.st_mtime_ns)]


def _require(prefix: str, what: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"{what} {prefix}: {prefix}.bin / {prefix}.idx not found (or incomplete); "
                                f"write them with npu-dsv3 data preprocess")
    _check_complete(prefix)


def _check_complete(prefix: str) -> None:
    """One line naming a truncated (or mismatched) .idx or .bin, before anything reads a sample."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", False)
    except (AssertionError, ValueError, struct.error, OSError) as e:
        raise ValueError(f"{prefix}.idx cannot be read ({e}): it is truncated or not written by npu-dsv3 data "
                         "preprocess; write the data again") from None
    lengths, pointers = index.sequence_lengths, index.sequence_pointers
    expected = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size if len(lengths) else 0
    found = os.path.getsize(prefix + ".bin")
    if found != expected:
        raise ValueError(f"{prefix}.bin holds {found} bytes where {prefix}.idx describes {expected}: it is "
                         "truncated or from another preprocessing run; write the data again")


def _check_cache_dir(prefixes: Sequence[str], path_to_cache: Optional[str]) -> None:
    """Where megatron writes the index caches must be writable: --data-cache-path, or else beside each
    prefix (megatron's default, ``PREFIX/cache``)."""
    from npu_dsv3.argtypes import output_dir_problem

    if path_to_cache:
        problem = output_dir_problem(path_to_cache)
        if problem:
            raise ValueError(f"--data-cache-path {path_to_cache}: {problem}; give a directory this run can write")
        return
    for prefix in prefixes:
        problem = output_dir_problem(os.path.join(prefix, "cache"))
        if problem:
            raise ValueError(f"--data-path {prefix}: megatron keeps its index caches beside the data, and {problem}: "
                             "pass --data-cache-path DIR (a writable directory)")


def parse_data_path(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path``: ``"PREFIX"``, ``"P1 P2"`` or ``"W1 P1 W2 P2"`` (weights, megatron's format)."""
    from megatron.core.datasets.utils import get_blend_from_list

    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ValueError("--data-path is empty")
    if len(items) % 2 == 0 and not all(_is_number(w) for w in items[::2]):
        raise ValueError(f"--data-path {' '.join(items)}: expected PREFIX ... or WEIGHT PREFIX WEIGHT PREFIX ...")
    prefixes, weights = get_blend_from_list(items)
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
    return prefixes, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_pretrain_datasets(data_path: Union[str, Sequence[str]], *, seq_length: int, sizes: Sequence[int],
                            tokenizer: Tokenizer, split: str = "969,30,1", seed: int = 1234,
                            reset_position_ids: bool = False, reset_attention_mask: bool = False,
                            eod_mask_loss: bool = False, create_attention_mask: bool = True,
                            path_to_cache: Optional[str] = None):
    """(train, valid, test) GPTDatasets blended by weight, through megatron's
    BlendedMegatronDatasetBuilder; ``sizes``: samples wanted per split (0: that split is None).

    ``reset_position_ids`` / ``reset_attention_mask`` restart positions / attention after each
    eod token: preprocess with ``--append-eod`` for them to see document ends.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not torch.distributed.is_initialized():
        raise ValueError("build_pretrain_datasets needs torch.distributed initialised (megatron's dataset "
                         "caches are written by rank 0); in one process: "
                         "npu_dsv3.distributed.ensure_single_process_group()")
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        _require(prefix, "--data-path")
    _check_cache_dir(prefixes, path_to_cache)
    if path_to_cache:
        os.makedirs(path_to_cache, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=path_to_cache, tokenizer=_GPTTokenizer(tokenizer, prefixes),
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask)
    # Every rank builds its own view: the caches land in path_to_cache (or beside the data).
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


class InstructionDataset(torch.utils.data.Dataset):
    """The samples of ``{prefix}_packed_{input_ids,labels,attention_mask}_document``.

    ``reset_attention_mask``: in a packed sequence, positions restart at each document and a
    token attends only within its document (``cu_seqlens`` marks them); without it the pack is
    one causal sequence. Either way no label crosses a document boundary and prompt and
    padding tokens carry no loss. Unpacked files give one sample of its own length per index.
    """

    def __init__(self, prefix: str, reset_attention_mask: bool = True, create_attention_mask: bool = False):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        self.reset_attention_mask = reset_attention_mask
        self.create_attention_mask = create_attention_mask
        _refuse_pretraining_data(prefix)
        self.data = {}
        for key in INSTRUCTION_KEYS:
            path = f"{prefix}_packed_{key}_document"
            _require(path, "instruction data")
            self.data[key] = IndexedDataset(path)
        lengths = {key: len(ds) for key, ds in self.data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{prefix}_packed_*_document hold different sample counts {lengths}: "
                             f"not one preprocessing run")

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    @property
    def sequence_lengths(self) -> numpy.ndarray:
        """Tokens per sample, read from the index (no sample is loaded)."""
        return self.data["input_ids"].sequence_lengths

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        ids, stored_labels, doc = (numpy.asarray(self.data[k][idx], dtype=numpy.int64) for k in INSTRUCTION_KEYS)
        # Position t predicts token t+1, unless t+1 starts another document (or t is last).
        labels = numpy.append(stored_labels[1:], IGNORE_INDEX)
        labels[numpy.append(doc[1:] != doc[:-1], True)] = IGNORE_INDEX
        loss_mask = labels != IGNORE_INDEX
        starts = _document_starts(doc) if self.reset_attention_mask else numpy.array([0, len(ids)])
        sample = {
            "tokens": torch.from_numpy(ids),
            "labels": torch.from_numpy(numpy.where(loss_mask, labels, 0)),
            "loss_mask": torch.from_numpy(loss_mask.astype(numpy.float32)),
            "position_ids": torch.from_numpy(_positions(starts)),
            "cu_seqlens": torch.from_numpy(starts.astype(numpy.int32)),
        }
        if self.create_attention_mask:
            sample["attention_mask"] = _block_causal_mask(starts)
        return sample


def _refuse_pretraining_data(prefix: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for candidate in (prefix, f"{prefix}_text_document"):
        if IndexedDataset.exists(candidate) and not IndexedDataset.exists(f"{prefix}_packed_input_ids_document"):
            raise ValueError(f"{candidate}.bin/.idx is pretraining data (one token stream per document); "
                             f"fine-tuning reads instruction data {prefix}_packed_{{input_ids,labels,attention_mask}}"
                             f"_document: npu-dsv3 data preprocess --handler-name AlpacaStyleInstructionHandler "
                             f"(or SharegptStyleInstructionHandler) --output-prefix {prefix}")


def split_ranges(split: str, count: int) -> List[Tuple[int, int]]:
    """[begin, end) of the train, valid and test samples of ``count`` under ``--split``, rounded as
    megatron's dataset builder rounds its document splits."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    bounds = numpy.concatenate([[0.0], numpy.cumsum(parse_and_normalize_split(split))])
    return [(int(round(a * count)), int(round(b * count))) for a, b in zip(bounds[:-1], bounds[1:])]


class SampleStream:
    """Samples [begin, end) of ``dataset`` as an endless stream: item g is from pass g // n (an
    epoch), in a permutation seeded by (seed, pass), or in order when ``seed`` is None."""

    def __init__(self, dataset, begin: int, end: int, seed: Optional[int] = None):
        self.dataset, self.begin, self.count, self.seed = dataset, begin, end - begin, seed
        self._pass, self._order = None, None

    def __getitem__(self, g: int) -> Dict[str, torch.Tensor]:
        epoch, i = divmod(g, self.count)
        if self.seed is not None:
            if epoch != self._pass:
                self._pass = epoch
                self._order = numpy.random.default_rng([self.seed, epoch]).permutation(self.count)
            i = int(self._order[i])
        return self.dataset[self.begin + i]


def collate_instruction(samples: Sequence[Dict[str, torch.Tensor]], length: int, pad_id: int,
                        packed: bool) -> Dict[str, torch.Tensor]:
    """One micro-batch of instruction samples, each padded to ``length`` (``pad_id``, no loss).

    ``packed``: the samples end to end as one [1, n x length] sequence whose ``cu_seqlens`` mark
    every document of every sample, a sample's padding being a document of its own, with
    positions restarting per document: megatron's THD layout for packed-sequence attention.
    Otherwise a [n, length] batch, positions 0..length-1, without ``cu_seqlens``.
    """
    rows: Dict[str, List[torch.Tensor]] = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    starts = []
    for i, sample in enumerate(samples):
        size = len(sample["tokens"])
        if size > length:
            raise ValueError(f"an instruction sample of {size} tokens does not fit in {length} (--seq-length)")
        pad = length - size
        rows["tokens"].append(torch.nn.functional.pad(sample["tokens"], (0, pad), value=pad_id))
        rows["labels"].append(torch.nn.functional.pad(sample["labels"], (0, pad)))
        rows["loss_mask"].append(torch.nn.functional.pad(sample["loss_mask"], (0, pad)))
        own = sample["cu_seqlens"].numpy().astype(numpy.int64)
        own = numpy.append(own, length) if pad else own
        rows["position_ids"].append(torch.from_numpy(_positions(own) if packed else numpy.arange(length)))
        starts.append(own[:-1] + i * length)
    if not packed:
        return {k: torch.stack(v) for k, v in rows.items()}
    batch = {k: torch.cat(v).unsqueeze(0) for k, v in rows.items()}
    batch["cu_seqlens"] = torch.from_numpy(numpy.append(numpy.concatenate(starts), len(samples) * length)
                                           .astype(numpy.int32))
    return batch


def _document_starts(doc: numpy.ndarray) -> numpy.ndarray:
    """[0, start of each later document (padding counts as one), length]."""
    return numpy.concatenate([[0], numpy.flatnonzero(doc[1:] != doc[:-1]) + 1, [len(doc)]])


def _positions(starts: numpy.ndarray) -> numpy.ndarray:
    lengths = numpy.diff(starts)
    return numpy.arange(starts[-1]) - numpy.repeat(starts[:-1], lengths)


def _block_causal_mask(starts: numpy.ndarray) -> torch.Tensor:
    n = int(starts[-1])
    segment = torch.from_numpy(numpy.repeat(numpy.arange(len(starts) - 1), numpy.diff(starts)))
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & (segment[:, None] == segment[None, :])
    return ~allowed.unsqueeze(0)
