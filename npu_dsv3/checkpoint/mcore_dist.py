"""HF <-> megatron-core's distributed checkpoint (``--save-format torch_dist``).

The format ``megatron.core.dist_checkpointing`` saves and loads: tensors are
stored once, under global keys and offsets, so a run of any TP / PP / EP layout
loads it (megatron reshards on load). The tensors of such a checkpoint are the
ones the single-rank model holds, cut the way its ``sharded_state_dict`` cuts
them (gated fc1 weights as gate and up halves, experts one by one), and each
of those pieces is exactly one HF tensor. So a conversion is a renaming:

- the plan (keys, offsets, shapes, dtypes) comes from megatron itself: the
  single-rank model built on the meta device and its ``sharded_state_dict()``;
- which HF tensor fills which piece comes from ``rank_state.chunk_state_dict``
  (the one HF -> megatron mapping of this package), traced once on tiny
  stand-in tensors (:func:`_trace_sources`);
- torch's DCP writer asks for each piece when it writes it (``LazyPlanner`` in :func:`_strategy`),
  and a file is at most ``FILE_BYTES``, so memory stays at a few tensors
  whatever the model size.

The only layout flag that changes the bytes is the tensor-parallel size: megatron
pads the vocabulary to a multiple of 128 x TP, and a checkpoint only loads into
runs with the same padded size. Layer keys count real layers: megatron numbers
them by their global position, so noop layers are only allowed at the end.
"""

import copy
import json
import os
import threading
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from npu_dsv3.checkpoint import io, writers
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.safe_load import load_torch
from npu_dsv3.checkpoint.sources import (RELEASE, HFInput, WithHFDtypes, check_mtp_copies, conversion_configs,
                                         conversion_input, dequantized_sources, finish_output_dir, model_config,
                                         target_flag, tracked_dir)
from npu_dsv3.layout import LayoutError, ParallelLayout, PipelineLayout

FORMAT = "torch_dist"
FILE_BYTES = 1 << 30  # one .distcp file: what the writer holds at most before the file is closed
RESULTS_DIR = ".npu_dsv3_dcp"  # per-file write results, so --resume can skip finished files


# --------------------------------------------------------------------------- the plan


class Piece:
    """One tensor of the checkpoint: where it lives (key, offset) and the HF tensor it holds."""

    __slots__ = ("sharded", "key", "offset", "shape", "dtype", "hf_name", "rows")

    def __init__(self, sharded, shape, dtype, hf_name, rows):
        self.sharded = sharded  # megatron's ShardedTensor, data on the meta device
        self.key, self.offset, self.shape, self.dtype = sharded.key, tuple(sharded.global_offset), tuple(shape), dtype
        self.hf_name = hf_name
        self.rows = rows  # rows the HF tensor fills; the rest (vocabulary padding) are zeros

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def _single_rank_config(hf_config: dict, dtype: torch.dtype):
    from npu_dsv3.lora.nf4_base import is_nf4_config

    # Per-expert MLPs: megatron stores GroupedMLP's experts the same way, and each is small. NF4 experts
    # exist in grouped form only, and store a piece per expert themselves.
    return model_config(hf_config, is_nf4_config(hf_config), params_dtype=dtype, bf16=dtype == torch.bfloat16,
                        use_cpu_initialization=True, perform_initialization=False)


def _trace_sources(config) -> Dict[str, Tuple[List[str], bool]]:
    """``{single-rank parameter: ([HF names stacked along its rows], whether zero rows pad it)}``.

    Runs ``chunk_state_dict`` on 1 x 2 stand-ins whose values name their HF tensor
    (the second column tells a transpose apart), with a one-row vocabulary; the
    rows of each result say which HF tensors the parameter stacks, in order.
    """
    from npu_dsv3.checkpoint.rank_state import chunk_state_dict

    ids: Dict[str, int] = {}
    names: List[str] = []

    def stand_in(name: str) -> torch.Tensor:
        if name not in ids:
            ids[name] = len(names) + 1  # 0 marks padding rows
            names.append(name)
        return torch.tensor([[float(ids[name]), ids[name] + 0.5]], dtype=torch.float64)

    probe = copy.copy(config)
    probe.vocab_size = 1
    single = ParallelLayout(PipelineLayout(config.num_layers, mtp_num_layers=config.mtp_num_layers or 0),
                            grouped_gemm=False)
    traced = {}
    for param, value in chunk_state_dict(probe, single, stand_in, 0, 0, 0, 0).items():
        rows = value.reshape(-1, 2) if value.dim() == 2 else value.reshape(-1, 1)
        if value.dim() == 2 and not torch.equal(rows[:, 1] - rows[:, 0], (rows[:, 0] > 0) * 0.5):
            raise LayoutError(f"{param} is not a stack of HF tensors along its rows: torch_dist cannot "
                              "be written for this layout yet")
        sources = [names[int(i) - 1] for i in rows[:, 0].tolist() if i > 0]
        traced[param] = (sources, bool((rows[:, 0] == 0).any()))
    return traced


def _meta_model(config, padded_vocab: int):
    from npu_dsv3.distributed import ensure_single_process_group
    from npu_dsv3.model.builder import build_model

    ensure_single_process_group()
    with torch.device("meta"):
        return build_model(config, padded_vocab=padded_vocab)


def plan_pieces(hf_config: dict, dtype: torch.dtype, padded_vocab: Optional[int] = None,
                dtype_of: Optional[Callable[[str], torch.dtype]] = None):
    """The checkpoint's sharded state dict (megatron's, data left on the meta device), its pieces in
    HF checkpoint order, and the model config. ``padded_vocab``: embedding rows (default: TP 1's).

    Pieces keep the dtype ``dtype_of(HF name)`` gives (a checkpoint may mix bf16 and
    fp32), except where megatron keeps a parameter in another dtype than the model's
    (the fp32 expert bias)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from npu_dsv3.checkpoint.rank_state import hf_layer
    from npu_dsv3.config import padded_vocab_size
    from npu_dsv3.lora.nf4_base import split_name

    config = _single_rank_config(hf_config, dtype)
    model = _meta_model(config, padded_vocab or padded_vocab_size(config.vocab_size))
    owner = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    sources = _trace_sources(config)
    sharded = model.sharded_state_dict()
    pieces: List[Piece] = []

    def add(sh_ten: ShardedTensor, param: torch.Tensor):
        name = owner[id(param)]
        hf_names, pad = sources[name]
        param_rows = param.shape[0]
        per_source = (param_rows - (param_rows - config.vocab_size if pad else 0)) // len(hf_names)
        start = sh_ten.data.storage_offset() // max(param.stride(0), 1) if param.dim() else 0
        index, within = divmod(start, per_source)
        rows = sh_ten.data.shape[0] if sh_ten.data.dim() else 1
        if within or (not pad and rows != per_source) or sh_ten.data.shape[1:] != param.shape[1:]:
            raise LayoutError(f"{sh_ten.key} does not cover whole HF tensors; torch_dist cannot be written")
        shape = (1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape)
        kept = param.dtype if param.dtype != config.params_dtype or dtype_of is None else dtype_of(hf_names[index])
        pieces.append(Piece(sh_ten, shape, kept, hf_names[index], per_source if pad else None))

    for value in list(nested_values(sharded)):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            for sh_ten in nested_values(built) if isinstance(built, (dict, list)) else [built]:
                add(sh_ten, value.data)
        elif isinstance(value, ShardedTensor):
            add(value, value.data if value.data._base is None else value.data._base)
    # HF checkpoint order; an NF4 tensor's codes and scales together (the quantizing reader's cache holds few)
    order = {}
    for i, p in enumerate(pieces):
        order.setdefault(split_name(p.hf_name)[0], i)
    pieces.sort(key=lambda p: (hf_layer(p.hf_name), order[split_name(p.hf_name)[0]]))
    return sharded, pieces, config


def _placeholders(sharded, pieces) -> dict:
    """The sharded state dict megatron saves, in HF checkpoint order: each piece with a zero-byte
    stand-in of its shape and dtype as data (DCP plans from shapes; the writer asks for the
    bytes later), and the model's other entries (``_extra_state`` objects) as they are."""
    import dataclasses

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    # On the meta device: megatron's save makes every stand-in contiguous, which would allocate an
    # expanded CPU scalar at full size, i.e. the whole model.
    out = {str(i): dataclasses.replace(p.sharded, dtype=p.dtype,
                                       data=torch.empty(p.sharded.local_shape, dtype=p.dtype, device="meta"))
           for i, p in enumerate(pieces)}
    for value in nested_values(sharded):
        if isinstance(value, ShardedObject):
            out[str(len(out))] = value
        elif not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            raise TypeError(f"unexpected {type(value).__name__} in the model's sharded state dict")
    return out


# --------------------------------------------------------------------------- writing


def _pack_files(items, prefix: str) -> List[Tuple[str, list]]:
    """DCP write items cut into files of at most ``FILE_BYTES`` (a bigger tensor gets its own), in plan order."""
    from torch.distributed.checkpoint.planner import WriteItemType

    def size(item) -> int:
        if item.type == WriteItemType.BYTE_IO:
            return 0
        n = item.tensor_data.properties.dtype.itemsize
        for s in item.tensor_data.size if item.tensor_data.chunk is None else item.tensor_data.chunk.sizes:
            n *= s
        return n

    groups = io.pack_shards(((i, size(item)) for i, item in enumerate(items)), FILE_BYTES)
    return [(f"{prefix}{n}.distcp", [items[i] for i in group]) for n, group in enumerate(groups)]


def _result_json(result) -> dict:
    info = result.storage_data
    return {"fqn": result.index.fqn, "offset": None if result.index.offset is None else list(result.index.offset),
            "index": result.index.index, "size": result.size_in_bytes, "path": info.relative_path,
            "at": info.offset, "length": info.length, "transforms": info.transform_descriptors}


def _result(entry: dict):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    offset = None if entry["offset"] is None else torch.Size(entry["offset"])
    return WriteResult(index=MetadataIndex(entry["fqn"], offset, entry["index"]), size_in_bytes=entry["size"],
                       storage_data=_StorageInfo(entry["path"], entry["at"], entry["length"],
                                                 transform_descriptors=entry["transforms"]))


def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class AtomicFileSystem(FileSystem):
        """Each .distcp file appears under its name only once complete (and fsync'ed)."""

        def create_stream(self, path, mode):
            import contextlib

            @contextlib.contextmanager
            def stream():
                with io.atomic_write(str(path)) as tmp, open(tmp, mode) as f:
                    yield f

            return stream()

    class DigestingFile:
        """The stream DCP writes a file through, keeping the size and CRC-32 of its bytes: the
        manifest's digest without reading the file again."""

        def __init__(self, f):
            self.f, self.size, self.crc = f, 0, 0

        def write(self, data) -> int:
            data = memoryview(data).cast("B")
            for start in range(0, len(data), writers.WRITE_CHUNK):
                piece = data[start:start + writers.WRITE_CHUNK]
                self.f.write(piece)
                self.crc = zlib.crc32(piece, self.crc)
            self.size += len(data)
            return len(data)

        def tell(self) -> int:
            return self.f.tell()

        def flush(self) -> None:
            self.f.flush()

    class StreamingWriter(FileSystemWriter):
        """torch's DCP file writer, with files of bounded size written by ``workers`` threads, each
        recorded in the job's manifest as it completes so ``--resume`` skips it."""

        def __init__(self, path, job_dir: str, manifest, workers: int, on_file: Callable[[int], None]):
            super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1)
            self.fs = AtomicFileSystem()
            self.job_dir, self.manifest, self.workers, self.on_file = job_dir, manifest, workers, on_file

        def write_data(self, plan, planner):
            from concurrent.futures import ThreadPoolExecutor

            results, todo = [], []
            for name, items in _pack_files(plan.items, plan.storage_data.prefix):
                stored = self._stored(name)
                if stored is None:
                    todo.append((name, items))
                else:
                    results.extend(stored)

            record_lock = threading.Lock()

            def data(item):
                if item.type == WriteItemType.BYTE_IO:
                    return planner.resolve_data(item)
                tensor = planner.resolve_data(item).detach()
                # torch.save writes a tensor's whole storage: a view gets storage of its own.
                return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor

            def write(job):
                name, items = job
                written = []
                # One item at a time, each dropped once written (torch's _write_files_from_queue keeps
                # every tensor of a file until the file is closed); byte items first, as torch writes them.
                with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as f:
                    stream = DigestingFile(f)
                    for item in sorted(items, key=lambda item: item.type != WriteItemType.BYTE_IO):
                        written.append(_write_item(self.transforms, stream, data(item), item, name,
                                                   self.serialization_format))
                os.makedirs(os.path.dirname(self._results_path(name)), exist_ok=True)
                io.atomic_write_json([_result_json(r) for r in written], self._results_path(name))
                with record_lock:  # the manifest is one JSON file rewritten per record
                    self.manifest.record(self._relpath(name), io.digest_of(stream.size, stream.crc))
                self.on_file(sum(r.size_in_bytes for r in written))
                return written

            crc = torch.serialization.get_crc32_options()
            # Each tensor is a torch.save zip whose CRC-32s cost ~20% of the write; DCP reads them back
            # with torch.load, which never checks them, and the manifest's digest covers the whole file.
            torch.serialization.set_crc32_options(False)
            try:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    for written in pool.map(write, todo):
                        results.extend(written)
            finally:
                torch.serialization.set_crc32_options(crc)
            future = torch.futures.Future()
            future.set_result(results)
            return future

        def _relpath(self, name: str) -> str:
            return os.path.relpath(os.path.join(str(self.path), name), self.job_dir)

        def _results_path(self, name: str) -> str:
            return os.path.join(self.job_dir, RESULTS_DIR, self._relpath(name) + ".json")

        def _stored(self, name: str) -> Optional[list]:
            """The write results of a file an earlier run finished, or None."""
            if not self.manifest.done(self._relpath(name)):
                return None
            try:
                with open(self._results_path(name), encoding="utf-8") as f:
                    return [_result(entry) for entry in json.load(f)]
            except (OSError, ValueError, KeyError):
                return None

    return StreamingWriter


def _save_strategy(planner, writer):
    """megatron's torch_dist save with the DCP writer ``writer(directory)`` run in this process and
    ``planner``: the same files as megatron's own writer, which instead forks helper processes."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException

    from npu_dsv3.checkpoint.safe_load import dcp_failure

    class InProcessSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            try:
                dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer(checkpoint_dir), planner=planner)
            except CheckpointException as e:
                # a full disk or a refused write is the one thing to say, not every rank's traceback
                plain = dcp_failure(e, (OSError, CheckpointError))
                if plain is None:
                    raise
                raise plain from e

    return InProcessSave(FORMAT, 1)


def in_process_save_strategy(threads: int = 2):
    """What training saves with: torch's DCP file writer, ``threads`` files per rank, fsync'ed."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import FileSystemWriter

    return _save_strategy(MCoreSavePlanner(flatten_state_dict=False),
                          lambda path: FileSystemWriter(path, thread_count=threads, sync_files=True))


def _strategy(resolve, writer):
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        """Tensors come from ``resolve(key, offset)`` when the writer reaches them, not from the state dict."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return resolve(write_item.index.fqn, tuple(write_item.index.offset))

    return _save_strategy(LazyPlanner(flatten_state_dict=False), writer)


def write_dist(get: Callable[[str], torch.Tensor], meta_get: Callable[[str], torch.Tensor], hf_config: dict,
               save_dir: str, manifest, vocab_tp: int = 1, workers: int = 1, progress: bool = True,
               thread_safe: bool = True) -> dict:
    """The torch_dist checkpoint of the model whose HF tensors ``get`` returns (``meta_get``: their
    shapes and dtypes, without reading), in ``save_dir/release``.

    ``vocab_tp``: the tensor-parallel size of the runs that will load it (vocabulary
    padding). ``thread_safe``: whether ``get`` may run in several writer threads at once.
    """
    from megatron.core import dist_checkpointing

    from npu_dsv3.config import padded_vocab_size

    vocab = hf_config["vocab_size"]
    dtype = meta_get("model.norm.weight").dtype
    sharded, pieces, config = plan_pieces(hf_config, dtype, padded_vocab_size(vocab, vocab_tp),
                                          lambda name: meta_get(name).dtype)
    by_place = {(p.key, p.offset): p for p in pieces}
    lock = threading.Lock() if not thread_safe else None

    def resolve(key: str, offset: tuple) -> torch.Tensor:
        piece = by_place[(key, offset)]
        if lock is None:
            tensor = get(piece.hf_name)
        else:
            with lock:
                tensor = get(piece.hf_name)
        tensor = tensor.to(piece.dtype)
        if piece.rows is not None:  # the vocabulary, padded with zero rows
            padded = tensor.new_zeros(piece.shape[-2:])
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        local = piece.shape[len(piece.shape) - tensor.dim():]
        if tuple(tensor.shape) != local:
            raise CheckpointError(f"{piece.hf_name} has shape {tuple(tensor.shape)}, the model config gives "
                                  f"{local}: config.json and weights disagree")
        return tensor.reshape(piece.shape)

    release = os.path.join(save_dir, RELEASE)
    os.makedirs(release, exist_ok=True)
    total = sum(p.nbytes for p in pieces)
    with io.progress(total, "hf2mcore torch_dist", enabled=progress) as bar:
        writer = _writer_class()
        strategy = _strategy(resolve, lambda path: writer(path, save_dir, manifest, workers,
                                                         lambda n: bar.update(n)))
        state = {"model": _placeholders(sharded, pieces), "checkpoint_version": 3.0, "iteration": 0}
        dist_checkpointing.save(state, release, sharded_strategy=strategy, validate_access_integrity=False)
    return {"pieces": len(pieces), "bytes": total}


# --------------------------------------------------------------------------- reading


def release_dir(load_dir: str) -> Optional[str]:
    """The directory of the checkpoint ``load_dir``'s tracker names, if it is a torch_dist one."""
    directory = tracked_dir(load_dir)
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, ValueError):
        return None
    return directory if backend == FORMAT else None


class DistSource:
    """HF tensors by name from a torch_dist checkpoint, the same ``names()`` / ``get()`` as ``HFFromRanks``.

    Each ``get`` reads one piece, so any reading order costs the same and memory holds
    one tensor. A piece stored as one chunk of its own (what this converter and a
    single-rank save write) is read straight from its byte range; otherwise a DCP
    load assembles it from whatever chunks the checkpoint's writer (any training
    layout) stored.
    """

    def __init__(self, directory: str, hf_config: dict):
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
            CachedMetadataFileSystemReader)

        self.directory = directory
        self.reader = CachedMetadataFileSystemReader(directory)
        try:
            stored = self.reader.read_metadata().state_dict_metadata
        except Exception as e:  # a missing or foreign .metadata
            raise CheckpointError(f"cannot read the torch_dist metadata in {directory} ({e})") from e
        embedding = stored.get("embedding.word_embeddings.weight")
        norm = stored.get("decoder.final_layernorm.weight")
        if embedding is None or norm is None:
            raise CheckpointError(f"{directory} holds no DeepSeek-V3 model (no embedding or final norm)")
        _, self.pieces, self.config = plan_pieces(hf_config, norm.properties.dtype, embedding.size[0])
        for piece in self.pieces:
            if piece.key in stored:
                piece.dtype = stored[piece.key].properties.dtype
        for piece in self.pieces:
            if piece.key not in stored:
                raise CheckpointError(f"{piece.key} is missing from {directory}: config.json and the checkpoint "
                                      "disagree")
        self._index = {p.hf_name: i for i, p in enumerate(self.pieces)}
        self._storage = self.reader.read_metadata().storage_data
        self._whole = {(p.key, p.offset) for p in self.pieces
                       if any(tuple(c.offsets) == p.offset and tuple(c.sizes) == p.shape for c in stored[p.key].chunks)}

    def names(self) -> List[str]:
        return [p.hf_name for p in self.pieces]

    def shape(self, name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype ``get(name)`` returns, without reading."""
        piece = self.pieces[self._index[name]]
        shape = list(piece.sharded.local_shape)
        if piece.rows is not None:
            shape[0] = piece.rows
        return torch.empty(shape, dtype=piece.dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise CheckpointError(f"{name} is not a tensor of this model")
        piece = self.pieces[self._index[name]]
        if (piece.key, piece.offset) in self._whole:
            buffer = self._read_chunk(piece)
        else:
            buffer = self._load(piece)
        buffer = buffer.reshape(piece.sharded.local_shape)
        return buffer[: piece.rows] if piece.rows is not None else buffer

    def _read_chunk(self, piece: Piece) -> torch.Tensor:
        """The piece's own chunk: its bytes, one ``torch.save`` record (DCP's format), read directly."""
        import io as bytes_io

        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage[MetadataIndex(piece.key, torch.Size(piece.offset))]
        path = os.path.join(self.directory, info.relative_path)
        if info.transform_descriptors:  # compressed or otherwise transformed: DCP knows how to undo it
            return self._load(piece)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            raise CheckpointError(f"cannot read {piece.key} at {piece.offset} from {path} ({e})") from e
        if len(data) != info.length:
            raise CheckpointError(f"{path} is truncated: {size} bytes, its .metadata needs {info.offset + info.length}")
        tensor = load_torch(bytes_io.BytesIO(data), f"{path} ({piece.key} at {piece.offset})", map_location="cpu")
        if tuple(tensor.shape) != piece.shape or tensor.dtype != piece.dtype:
            raise CheckpointError(f"{piece.key} at {piece.offset} in {path} is {tuple(tensor.shape)} "
                                  f"{tensor.dtype}, the metadata says {piece.shape} {piece.dtype}")
        return tensor

    def _load(self, piece: Piece) -> torch.Tensor:
        import dataclasses

        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreLoadPlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
        from torch.distributed.checkpoint import load as dcp_load

        buffer = torch.empty(piece.shape, dtype=piece.dtype)
        # The leading axes (layer, expert) as plain axes of the chunk: megatron then reads one chunk
        # of the global tensor on its own instead of expecting every chunk of the key.
        sharded = dataclasses.replace(piece.sharded, data=buffer, dtype=piece.dtype, local_shape=piece.shape,
                                      prepend_axis_num=0)
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys({"0": sharded})
        try:
            dcp_load(mcore_to_pyt_state_dict(flat, True), storage_reader=self.reader, planner=MCoreLoadPlanner())
        except Exception as e:
            raise CheckpointError(f"cannot read {piece.key} at {piece.offset} from {self.directory} ({e})") from e
        return buffer


# --------------------------------------------------------------------------- conversion jobs


class DistInput:
    """A conversion's input that is a torch_dist checkpoint (see ``sources.HFInput``); it carries its own
    layout."""

    layout = None

    def __init__(self, directory: str):
        self.directory = directory

    def getters(self, hf_config: dict):
        source = DistSource(release_dir(self.directory), hf_config)
        return source.get, source.shape


class _Shapes:
    def __init__(self, get):
        self.get = get


def _check_target(config, flags: dict, command: str) -> None:
    """The layout flags must describe a layout training accepts; torch_dist then fits every such layout
    with the same tensor-parallel size (the vocabulary padding)."""
    for flag in ("moe_tp_extend_ep", "mla_mm_split"):
        if flags.get(flag):
            raise LayoutError(f"--{flag.replace('_', '-')} is written only with --save-format torch: the model "
                              "megatron builds (whose sharded state dict torch_dist stores) does not have it")
    layout = ParallelLayout.from_flags(config, **flags, flag=target_flag(command)).pipeline
    real = [i for i in range(layout.num_layers) if layout.real_layer(i) is not None]
    if real != list(range(config.num_layers)):
        raise LayoutError("--noop-layers must be the last layers with --save-format torch_dist: its keys number "
                          "layers by position, so a noop layer in the middle would shift every layer after it")


def convert_to_dist(source, save_dir: str, flags: dict, command: str, workers: int = 1,
                    resume: bool = False, progress: bool = True) -> dict:
    """A torch_dist checkpoint in ``save_dir`` (``release/`` + tracker, config.json, tokenizer files)
    from ``source`` (a conversion input: ``sources.HFInput``, ``mcore_legacy.LegacyInput``, ``DistInput``),
    for runs with the layout ``flags`` give."""
    import time

    start = time.monotonic()
    source_hf, hf_config = conversion_configs(source, flags)
    config = model_config(hf_config, True)
    _check_target(config, flags, command)
    get, meta_get = conversion_input(source, source_hf, hf_config)
    thread_safe = isinstance(source, HFInput)  # the megatron sources cache the pieces they assemble
    if isinstance(source, HFInput):
        check_mtp_copies(config, get)
    manifest = io.prepare_output_dir(save_dir, resume, {"command": command,
                                                        "input": os.path.realpath(source.directory),
                                                        "layout": flags, "format": FORMAT})
    summary = write_dist(get, meta_get, hf_config, save_dir, manifest, flags.get("tensor_model_parallel_size", 1),
                         workers, progress, thread_safe)
    finish_output_dir(source.directory, save_dir, manifest, hf_config, meta_get)
    return {**summary, "seconds": time.monotonic() - start}


def convert_dist_to_hf(load_dir: str, save_dir: str, mtp_num_layers: Optional[int] = None, resume: bool = False,
                       progress: bool = True, wrap=None, job: Optional[dict] = None) -> dict:
    """torch_dist checkpoint -> HF safetensors shards, index, config.json and tokenizer files
    (``mtp_num_layers=0``: without the MTP layer). ``wrap`` turns the source of HF tensors into the one
    written (LoRA's merge, ``npu_dsv3.lora.export.MergedSource``); ``job`` adds to the manifest's job."""
    import time

    from npu_dsv3.checkpoint.mcore_legacy import write_hf_checkpoint
    from npu_dsv3.checkpoint.rank_state import effective_hf_config
    from npu_dsv3.config import load_hf_config

    start = time.monotonic()
    hf_config = effective_hf_config(load_hf_config(load_dir), {"mtp_num_layers": mtp_num_layers},
                                    select_layers=False)
    source = DistSource(release_dir(load_dir), hf_config)
    shapes = _Shapes(source.shape)
    if source.config.qlora:  # an NF4 base (--qlora-nf4): HF weights are its dequantized values
        source, shapes, hf_config = dequantized_sources(source, shapes, source.config, hf_config, load_dir)
    shapes = WithHFDtypes(shapes, load_dir)
    source = WithHFDtypes(wrap(source) if wrap else source, load_dir)
    manifest = io.prepare_output_dir(save_dir, resume, {"command": "convert mcore2hf", "format": FORMAT,
                                                        "input": os.path.realpath(load_dir),
                                                        "mtp_num_layers": mtp_num_layers, **(job or {})})
    summary = write_hf_checkpoint(source, hf_config, load_dir, save_dir, manifest, progress, shapes=shapes)
    return {**summary, "seconds": time.monotonic() - start}


def convert_to_legacy(load_dir: str, save_dir: str, flags: dict, workers: int = 1, resume: bool = False,
                      progress: bool = True) -> dict:
    """torch_dist checkpoint -> legacy per-rank files of the layout ``flags`` give."""
    from npu_dsv3.checkpoint.mcore_legacy import write_layout

    return write_layout(DistInput(load_dir), save_dir, flags, "convert reshard", workers, resume, progress)
