"""HF <-> megatron's legacy per-rank checkpoint (``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``).

The layout MindSpeed-LLM users load with ``--load``: one file per (tensor,
pipeline, expert) rank, each holding that rank's model chunks (``model`` or
``model0``, ``model1``, ... with virtual pipeline stages) under megatron's local
names (``decoder.layers.{i}`` counts from 0 in each chunk, noop layers included).
Each rank file is streamed: its structure comes from the tensors' shapes alone,
then each tensor is built from the HF tensors it needs and written into place
(``writers.save_torch_streamed``), so memory stays at about one HF tensor
whatever the model or rank-file size. The way back reads rank-file tensors with
``pread`` as it needs them and writes each safetensors shard header first, one
rebuilt HF tensor at a time.
"""

import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Dict, Iterator, Optional, Tuple

import torch

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.safe_load import load_torch
from npu_dsv3.checkpoint.rank_state import (HFFromRanks, chunk_state_dict, chunk_state_pieces, effective_hf_config,
                                            with_mtp_copies)
from npu_dsv3.checkpoint.sources import (RELEASE, HFInput, WithHFDtypes, check_mtp_copies, conversion_configs,
                                         conversion_input, copy_hf_extras, dequantized_sources, finish_output_dir,
                                         model_config, target_flag, tracked_dir)
from npu_dsv3.layout import LAYOUT_DEFAULTS, ParallelLayout, converter_flag

MODEL_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: every saved tensor gets its own.
    return tensor.contiguous().clone()


def rank_file(root: str, par: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int, tag: str = RELEASE) -> str:
    return os.path.join(root, tag, par.rank_dir(tp_rank, pp_rank, ep_rank), MODEL_FILE)


def tracked_tag(root: str) -> str:
    """The checkpoint directory a reader of ``root`` opens: the one its tracker names (a training save's
    ``iter_XXXXXXX`` or a converter's ``release``), ``release`` without a tracker."""
    return os.path.basename(tracked_dir(root) or RELEASE)


def rank_payload(config, par, get, tp_rank, pp_rank, ep_rank) -> dict:
    """A rank file's whole content in memory: the reference the streamed writer is tested against."""
    payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    for chunk in range(par.pipeline.num_chunks):
        sd = chunk_state_dict(config, par, get, tp_rank, pp_rank, ep_rank, chunk)
        payload[par.chunk_key(chunk)] = {k: _owned(v) for k, v in sd.items()}
    return payload


def load_rank(root: str, par: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
    """A rank file's payload with meta tensors: only the pickle is read (through the allow-list). Each
    tensor's storage carries ``_checkpoint_offset``, where its bytes start in the file."""
    path = rank_file(root, par, tp_rank, pp_rank, ep_rank, tracked_tag(root))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint was not written with tensor / pipeline / expert "
                              f"parallel sizes {par.tp} / {par.pipeline.pp} / {par.ep}")
    return load_torch(path, map_location="meta")


class _CheckedRecords:
    """The zip records of one rank file, each checked against its CRC-32 before its bytes are used.

    A torch zip file records the CRC-32 of every record (torch's reader checks none):
    torch's own records (the pickle, a few kB) are checked on opening; a storage's
    CRC is computed as ``_read_tensor`` reads it, so a tensor that covers its storage
    costs no second pass (a view of part of a storage gets its storage checked once
    on its own). Where the converter's manifest lists the file, the file's digest
    rebuilt from the recorded CRCs and the bytes between records must match it, so
    the headers and the pickle are checked too. A record whose CRC is 0 was written
    without one (``torch.serialization.set_crc32_options(False)``) and cannot be checked.
    """

    def __init__(self, path: str, manifest_entry: dict = None):
        from npu_dsv3.checkpoint import io, writers

        self.path = path
        try:
            records = writers.zip_records(path)
            digest = None if manifest_entry is None else writers.digest_from_records(path)
        except (OSError, zipfile.BadZipFile, struct.error) as e:
            raise CheckpointError(f"{path} is damaged: cannot read its zip records ({e}); "
                                  "re-convert or restore it") from e
        if digest != manifest_entry:
            raise CheckpointError(f"{path} is damaged: its size and CRC-32 {digest} differ from those "
                                  f"{io.MANIFEST_FILE} recorded ({manifest_entry}); re-convert or restore it")
        self.storages = {r.data_offset: r for r in records if r.index >= 0}
        self.checked = set()
        for record in records:
            if record.index < 0:
                self.check(record)

    def check(self, record, crc: int = None) -> None:
        """Refuses the file if ``record``'s bytes (``crc``: their CRC-32, if already computed) are not
        the ones its header describes; each record is read for this at most once."""
        from npu_dsv3.checkpoint import writers

        if record.crc == 0 or (crc is None and record.data_offset in self.checked):
            return
        if crc is None:
            crc = writers.record_crc(self.path, record)
        if crc != record.crc:
            raise CheckpointError(f"{self.path} is damaged: record {record.name} has CRC-32 {crc:08x}, its zip "
                                  f"header says {record.crc:08x}; re-convert or restore it")
        self.checked.add(record.data_offset)


def _read_tensor(path: str, meta: torch.Tensor, records: _CheckedRecords) -> torch.Tensor:
    """The data of ``meta`` (a tensor of ``load_rank``'s payload) read with ``pread`` into memory of
    its own: freed with the tensor, unlike the pages of a memory map, which stay resident while the
    file is mapped. The bytes are checked against their record's CRC-32 (``_CheckedRecords``)."""
    from npu_dsv3.checkpoint.writers import WRITE_CHUNK

    size, stride = tuple(meta.shape), meta.stride()
    # Elements from the first to the last the view reaches (a view may skip some: a transpose).
    span = 1 + sum((n - 1) * st for n, st in zip(size, stride)) if meta.numel() else 0
    out = torch.empty(span * meta.element_size(), dtype=torch.uint8)
    record = records.storages.get(meta.untyped_storage()._checkpoint_offset)
    begin = meta.untyped_storage()._checkpoint_offset + meta.storage_offset() * meta.element_size()
    if record is None:
        raise CheckpointError(f"{path} is damaged: its pickle places a tensor at byte {begin}, where no record is")
    whole = begin == record.data_offset and len(out) == record.size
    view, done, crc = memoryview(out.numpy()), 0, 0
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        # In chunks, each checksummed while it is in cache.
        while done < len(view) and (n := f.readinto(view[done:done + WRITE_CHUNK])):
            crc = zlib.crc32(view[done:done + n], crc) if whole else crc
            done += n
    if done != len(view):
        raise CheckpointError(f"cannot read a tensor of {path}: the file is truncated")
    records.check(record, crc if whole else None)
    return out.view(meta.dtype).as_strided(size, stride)


class _PreadChunk:
    """A model chunk of a rank file as ``HFFromRanks`` reads it: ``name in chunk`` and ``chunk[name]``,
    each tensor read from the file when asked for (see :func:`_read_tensor`).

    The ``recent`` tensors last read (shared by the chunks of one source) are kept:
    GroupedMLP's ``weight1`` / ``weight2`` hold all local experts and are asked for once
    per expert, consecutively; anything else is read once.
    """

    def __init__(self, path: str, meta: dict, records: _CheckedRecords, recent: OrderedDict, keep: int):
        self.path, self.meta, self.records, self.recent, self.keep = path, meta, records, recent, keep

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def __getitem__(self, name: str) -> torch.Tensor:
        key = (self.path, name)
        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        tensor = _read_tensor(self.path, self.meta[name], self.records)
        self.recent[key] = tensor
        while len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return tensor


def rank_plan(config, par, meta_get, get, tp_rank, pp_rank, ep_rank):
    """What ``writers.save_torch_streamed`` needs to write ``rank_payload``: the payload with
    meta tensors (``chunk_state_dict`` run on ``meta_get``'s shapes, no data) and one
    producer per tensor, in the payload's order (``chunk_state_pieces`` on ``get``)."""
    skeleton = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    producers = []
    for chunk in range(par.pipeline.num_chunks):
        shapes = chunk_state_dict(config, par, meta_get, tp_rank, pp_rank, ep_rank, chunk)
        pieces = chunk_state_pieces(config, par, get, tp_rank, pp_rank, ep_rank, chunk)
        if list(shapes) != list(pieces):
            raise RuntimeError(f"chunk_state_pieces disagrees with chunk_state_dict on chunk {chunk}: "
                               f"{sorted(set(shapes) ^ set(pieces)) or 'the order differs'}")
        skeleton[par.chunk_key(chunk)] = shapes
        producers += pieces.values()
    return skeleton, producers


def legacy_source(root: str, config, par: ParallelLayout) -> HFFromRanks:
    """HF tensors by name from a legacy checkpoint: rank files' pickles loaded on first use, tensors
    read when needed, so memory holds a few tensors whatever the checkpoint size."""
    return _legacy_source(root, config, par, meta=False)


def legacy_meta_source(root: str, config, par: ParallelLayout) -> HFFromRanks:
    """``legacy_source`` giving meta tensors: every HF tensor's shape and dtype, no data read."""
    return _legacy_source(root, config, par, meta=True)


def _legacy_source(root: str, config, par: ParallelLayout, meta: bool) -> HFFromRanks:
    from npu_dsv3.checkpoint import io

    payloads: Dict[Tuple[int, int, int], dict] = {}
    checked: Dict[Tuple[int, int, int], _CheckedRecords] = {}
    # What the converter that wrote ``root`` recorded (nothing for a checkpoint saved by training).
    digests = io.Manifest(root).files if os.path.isfile(os.path.join(root, io.MANIFEST_FILE)) else {}
    # The weight1 and weight2 of the expert-tensor-parallel ranks one expert is rebuilt from.
    recent, keep = OrderedDict(), 2 * par.etp

    tag = tracked_tag(root)

    def fetch(tp_rank, pp_rank, ep_rank, chunk):
        key = (tp_rank, pp_rank, ep_rank)
        path = rank_file(root, par, *key, tag)
        if key not in payloads:
            if os.path.isfile(path):  # else load_rank says what is missing; the pickle is checked before it is read
                checked[key] = _CheckedRecords(path, digests.get(os.path.relpath(path, root)))
            payloads[key] = load_rank(root, par, *key)
        name = par.chunk_key(chunk)
        if name not in payloads[key]:
            raise CheckpointError(f"{path} has no '{name}': the checkpoint was not written with "
                                  f"{par.pipeline.num_chunks} model chunks per pipeline rank (virtual pipeline stages)")
        if meta:
            return payloads[key][name]
        return _PreadChunk(path, payloads[key][name], checked[key], recent, keep)

    return HFFromRanks(config, par, fetch, lambda *key: rank_file(root, par, *key, tag))


def read_hf_tensors(root: str, config, par: ParallelLayout) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model from a legacy checkpoint, in checkpoint order."""
    return legacy_source(root, config, par).hf_tensors()


class LegacyInput:
    """A conversion's input that is a legacy checkpoint, written with the ``layout`` flags (see
    ``sources.HFInput``)."""

    def __init__(self, directory: str, layout: dict):
        self.directory, self.layout = directory, layout

    def getters(self, hf_config: dict):
        config = model_config(hf_config, self.layout.get("moe_grouped_gemm", LAYOUT_DEFAULTS["moe_grouped_gemm"]))
        # only reshard reads a legacy checkpoint by its flags; it prefixes them all (--source-num-layer-list)
        par = ParallelLayout.from_flags(config, **self.layout, flag=converter_flag("source", prefix_all=True))
        return legacy_source(self.directory, config, par).get, legacy_meta_source(self.directory, config, par).get


# --------------------------------------------------------------------------- conversion jobs

MAX_SHARD_BYTES = 5 * 10**9


def _write_rank(job) -> dict:
    """One rank file, streamed (runs in a worker); returns its digest for the manifest."""
    from npu_dsv3.checkpoint import io, writers

    source, save_dir, source_hf, hf_config, flags, ranks = job
    config = model_config(hf_config, flags.get("moe_grouped_gemm", LAYOUT_DEFAULTS["moe_grouped_gemm"]))
    par = ParallelLayout.from_flags(config, **flags)
    path = rank_file(save_dir, par, *ranks)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    get, meta_get = conversion_input(source, source_hf, hf_config)
    skeleton, producers = rank_plan(config, par, meta_get, get, *ranks)
    with io.atomic_write(path) as tmp:
        return writers.save_torch_streamed(skeleton, producers, tmp)


def write_layout(source, save_dir: str, flags: dict, command: str, workers: int, resume: bool,
                 progress: bool) -> dict:
    """Every rank file of the layout ``flags`` give, from ``source`` (a conversion input: ``sources.HFInput``,
    ``LegacyInput``, ``mcore_dist.DistInput``); config.json, tokenizer
    files and, last, the tracker (a directory that has it is complete)."""
    import time

    from npu_dsv3.checkpoint import io

    start = time.monotonic()
    source_hf, hf_config = conversion_configs(source, flags)
    config = model_config(hf_config, flags.get("moe_grouped_gemm", LAYOUT_DEFAULTS["moe_grouped_gemm"]))
    par = ParallelLayout.from_flags(config, **flags, flag=target_flag(command))
    get, meta_get = conversion_input(source, source_hf, hf_config)
    if isinstance(source, HFInput):
        check_mtp_copies(config, get)
    job = {"command": command, "input": os.path.realpath(source.directory), "layout": flags}
    manifest = io.prepare_output_dir(save_dir, resume, job)
    rel = {ranks: os.path.relpath(rank_file(save_dir, par, *ranks), save_dir) for ranks in par.ranks()}
    todo = set(manifest.pending(list(rel.values()), workers))
    jobs = [(source, save_dir, source_hf, hf_config, flags, ranks) for ranks, path in rel.items() if path in todo]
    with io.progress(None, command.split()[-1], enabled=progress) as bar, io.single_threaded_torch():

        def finished(job, digest):
            manifest.record(rel[job[-1]], digest)
            bar.update(digest["size"])

        io.parallel_map(_write_rank, jobs, workers, on_result=finished,
                        label=lambda job: rank_file(save_dir, par, *job[-1]))
    finish_output_dir(source.directory, save_dir, manifest, hf_config, meta_get)
    return {"rank_files": len(rel), "written": len(jobs), "seconds": time.monotonic() - start}


def convert_hf_to_legacy(hf_dir: str, save_dir: str, flags: dict, workers: int = 1, resume: bool = False,
                         progress: bool = True) -> dict:
    """HF (BF16, FP32 or DeepSeek's FP8 release) -> legacy per-rank checkpoint in the layout ``flags`` give.

    Writes ``release/mp_rank_*/model_optim_rng.pt`` (one worker per rank file)
    and the HF ``config.json`` beside them (the model config for the way back).
    """
    return write_layout(HFInput(hf_dir), save_dir, flags, "convert hf2mcore", workers, resume, progress)


def reshard_legacy(load_dir: str, save_dir: str, source_flags: dict, target_flags: dict, workers: int = 1,
                   resume: bool = False, progress: bool = True) -> dict:
    """Legacy checkpoint in layout A -> layout B directly: each target rank file takes the
    pieces it needs from the source rank files, never a whole HF model."""
    return write_layout(LegacyInput(load_dir, source_flags), save_dir, target_flags, "convert reshard", workers,
                         resume, progress)


def write_hf_checkpoint(source, hf_config: dict, extras_dir: str, save_dir: str, manifest, progress: bool = True,
                        max_shard_bytes: int = MAX_SHARD_BYTES, shapes=None, desc: str = "mcore2hf") -> dict:
    """HF safetensors shards (<= ``max_shard_bytes``) + index + config.json from ``source``, into
    ``save_dir`` (already prepared, ``manifest`` its ``io.Manifest``).

    ``source`` has ``names()`` (HF names in checkpoint order) and ``get(name)`` (builds one
    tensor); ``shapes`` has the same ``get`` returning tensors of the right shape and dtype,
    meta tensors ideally (default: ``source``, which then builds every tensor twice). Every
    shard is planned from the shapes, then written header first and filled tensor by tensor
    as ``source`` builds them, so memory stays at about one tensor whatever the shard size.
    Shards already in the manifest and intact are kept without building their tensors. MTP's
    embedding and head copies are written as HF checkpoints store them; tokenizer files are
    copied from ``extras_dir``; the index comes last (a directory that has one is complete).
    """
    import time

    from npu_dsv3.checkpoint import io, writers

    start = time.monotonic()
    names = with_mtp_copies(source.names(), hf_config)
    plan = {}
    for name, read_as in names:
        tensor = (shapes or source).get(read_as)
        plan[name] = (tuple(tensor.shape), tensor.dtype)
    sizes = {name: writers.tensor_nbytes(*plan[name]) for name in plan}
    shards = {f"model-{i + 1:05d}.safetensors": shard
              for i, shard in enumerate(io.pack_shards(sizes.items(), max_shard_bytes))}
    done = {file for file in shards if manifest.done(file)}
    read_as = dict(names)
    with io.progress(sum(sizes.values()), desc, enabled=progress,
                     done_bytes=sum(sizes[n] for file in done for n in shards[file])) as bar:
        for file, shard in shards.items():
            if file in done:
                continue
            with io.atomic_write(os.path.join(save_dir, file)) as tmp:
                digest = writers.save_safetensors_streamed([(n, *plan[n]) for n in shard],
                                                           (source.get(read_as[n]) for n in shard), tmp,
                                                           metadata={"format": "pt"}, on_tensor=bar.update)
            manifest.record(file, digest)
    copy_hf_extras(extras_dir, save_dir, manifest)
    io.atomic_write_json(hf_config, os.path.join(save_dir, "config.json"))
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    io.atomic_write_json({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                         os.path.join(save_dir, "model.safetensors.index.json"), sort_keys=True)
    return {"shards": len(shards), "bytes": sum(sizes.values()), "seconds": time.monotonic() - start}


def convert_legacy_to_hf(load_dir: str, save_dir: str, flags: dict, resume: bool = False, progress: bool = True,
                         max_shard_bytes: int = MAX_SHARD_BYTES, wrap=None, job: Optional[dict] = None) -> dict:
    """Legacy per-rank checkpoint -> HF safetensors shards (<= ``max_shard_bytes``) + index + config.json.
    ``wrap`` turns the source of HF tensors into the one written (LoRA's merge); ``job`` adds to the
    manifest's job.

    Tensors are rebuilt one at a time from the rank files' records and written
    straight into their planned shard (``write_hf_checkpoint``). Shard contents are
    deterministic, so ``resume`` keeps intact finished shards.
    """
    import time

    from npu_dsv3.checkpoint import io
    from npu_dsv3.config import load_hf_config

    start = time.monotonic()
    # Rank files fix the layers; only MTP may be left out (--mtp-num-layers 0).
    hf_config = effective_hf_config(load_hf_config(load_dir), flags, select_layers=False)
    config = model_config(hf_config, flags.get("moe_grouped_gemm", LAYOUT_DEFAULTS["moe_grouped_gemm"]))
    par = ParallelLayout.from_flags(config, **flags, flag=converter_flag("source"))
    manifest = io.prepare_output_dir(save_dir, resume, {"command": "convert mcore2hf",
                                                        "input": os.path.realpath(load_dir), "layout": flags,
                                                        **(job or {})})
    source, shapes = legacy_source(load_dir, config, par), legacy_meta_source(load_dir, config, par)
    if config.qlora:  # an NF4 base (--qlora-nf4): HF weights are its dequantized values
        source, shapes, hf_config = dequantized_sources(source, shapes, config, hf_config, load_dir)
    with io.single_threaded_torch():
        summary = write_hf_checkpoint(WithHFDtypes(wrap(source) if wrap else source, load_dir), hf_config,
                                      load_dir, save_dir, manifest, progress, max_shard_bytes,
                                      shapes=WithHFDtypes(shapes, load_dir))
    return {**summary, "seconds": time.monotonic() - start}
