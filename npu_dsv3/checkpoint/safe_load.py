"""The one reader of pickled checkpoint files: nothing in a checkpoint can run code.

Every checkpoint format megatron and MindSpeed-LLM write is, in part, a pickle: DCP's ``.metadata``,
the byte records inside ``.distcp`` files (RNG state, extra state), megatron's ``common.pt`` and
sharded-object files, the legacy ``model_optim_rng.pt`` / ``distrib_optim.pt``. Unpickling calls
whatever the pickle names, so a crafted file runs code. Here each of them is read by one unpickler
that resolves only an allow-list of globals (torch's weights-only list, plus what these formats
hold: ``argparse.Namespace`` args with torch dtypes and megatron enums, numpy RNG state, DCP's
metadata classes) and restores attributes only on instances of those classes. Anything else stops
the read before it is built: :class:`UnsafeCheckpointError`, one line naming the file and the type.
A truncated or damaged file is a :class:`CheckpointError` naming the file.

torch's and megatron's readers come here through the replacements below, which
``npu_dsv3.features.checkpoint_safety`` patches in; npu_dsv3's own readers call :func:`load_torch` /
:func:`load_pickle`.
"""

import _compat_pickle
import contextlib
import contextvars
import functools
import io
import os
import pickle
import types
from typing import Any, BinaryIO, Dict, Optional, Union

from npu_dsv3.checkpoint.hf_reader import CheckpointError

_ALLOWED_KINDS = ("tensors, containers, numbers, strings, argparse.Namespace, numpy arrays, torch dtypes, "
                  "megatron enums, DCP metadata")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds a type outside the allow-list: unpickling it could run code."""


class _Refused(pickle.UnpicklingError):
    """Raised inside an unpickler, which does not know the file's name; the readers below add it."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _dotted(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _plain_dtype(obj, align=False, copy=False):
    """``numpy.dtype`` as an unpickled checkpoint may build it: never an object dtype, whose arrays would
    hold references rather than numbers, and always a copy, so that the pickle's BUILD (the dtype's state)
    cannot alter numpy's shared instance of a builtin dtype."""
    import numpy

    dtype = numpy.dtype(obj, align, True)
    if dtype.hasobject:
        raise _Refused("a numpy array of Python objects")
    return dtype


def _numpy_globals() -> Dict[str, Any]:
    """RNG state (``np.random.get_state()``): arrays, dtypes and scalars, under numpy 1's and numpy 2's
    module names (a checkpoint written with either loads with either)."""
    import numpy

    reconstruct = numpy.empty(0).__reduce__()[0]
    scalar = numpy.float64(0).__reduce__()[0]
    out = {"numpy.ndarray": numpy.ndarray, "numpy.dtype": _plain_dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{module}._reconstruct"] = reconstruct
        out[f"{module}.scalar"] = scalar
    return out


def _enum_globals(*modules: str) -> Dict[str, Any]:
    import enum
    import importlib

    out = {}
    for name in modules:
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, type) and issubclass(value, enum.Enum):
                out[_dotted(value)] = value
    return out


@functools.lru_cache(maxsize=1)
def _allowed() -> Dict[str, Any]:
    """Dotted name -> the object a checkpoint's pickle may name."""
    import argparse
    import pathlib

    import torch._weights_only_unpickler as weights_only
    from torch.distributed._shard.sharded_tensor import metadata as sharded_metadata
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as dcp
    from torch.distributed.checkpoint import planner

    allowed = dict(weights_only._get_allowed_globals())
    allowed["argparse.Namespace"] = argparse.Namespace
    allowed["builtins.frozenset"] = frozenset
    allowed.update(_numpy_globals())
    # megatron's enums: Megatron-LM keeps e.g. AttnBackend and ModelType in the args it saves.
    allowed.update(_enum_globals("megatron.core.enums", "megatron.core.transformer.enums"))
    for cls in (dcp.Metadata, dcp.MetadataIndex, dcp.StorageMeta, dcp.TensorStorageMetadata, dcp.BytesStorageMetadata,
                dcp.ChunkStorageMetadata, dcp.TensorProperties, dcp._MEM_FORMAT_ENCODING, filesystem._StorageInfo,
                # megatron's fully parallel save keeps every rank's save plan in the metadata
                planner.SavePlan, planner.WriteItem, planner.WriteItemType, planner.TensorWriteData,
                planner.BytesIOWriteData, filesystem._StoragePrefix,
                # torch < 2.4 pickled DCP's tensor properties under their old home
                sharded_metadata.TensorProperties, sharded_metadata.MEM_FORMAT_ENCODING):
        allowed[_dotted(cls)] = cls
    # DCP's StorageMeta.checkpoint_id; Python 3.13 moved the class to pathlib._local
    for module in ("pathlib", "pathlib._local"):
        allowed[f"{module}.PosixPath"] = pathlib.PosixPath
        allowed[f"{module}.PurePosixPath"] = pathlib.PurePosixPath
    return allowed


@functools.lru_cache(maxsize=1)
def _buildable() -> tuple:
    """The classes whose instances a pickle may give attributes (its BUILD opcode): the allowed ones but
    enums, whose members are shared by the whole process."""
    import enum

    import numpy

    classes = {v for v in _allowed().values() if isinstance(v, type) and not issubclass(v, enum.Enum)}
    return tuple(classes | {numpy.dtype})


class _Unpickler(pickle._Unpickler):
    """pickle's own unpickler restricted two ways: ``find_class`` resolves only allowed names, and BUILD
    (which sets attributes) applies only to instances of allowed classes, never to a class itself, so a
    pickle cannot rewire an allowed class either. The Python implementation, because the C one's BUILD
    cannot be checked."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # protocol 2 (torch.save) writes Python 2's names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full not in _allowed():
            raise _Refused(full)
        return _allowed()[full]

    def _load_build(self) -> None:
        inst = self.stack[-2]
        if isinstance(inst, type):
            raise _Refused(f"attributes set on the class {_dotted(inst)}")
        if not isinstance(inst, _buildable()):
            raise _Refused(f"attributes set on a {_dotted(type(inst))}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


# What torch.load calls for pickle_module: it subclasses ``Unpickler`` (adding its storage handling) and
# reads the legacy format's headers with ``load``.
_PICKLE_MODULE = types.SimpleNamespace(__name__=__name__, Unpickler=_Unpickler,
                                       load=lambda file, **kwargs: _Unpickler(file, **kwargs).load())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def _reading(name: str):
    """Any failure to read ``name`` as one line: a refused type, or a truncated or damaged file."""
    try:
        yield
    except _Refused as e:
        raise UnsafeCheckpointError(f"{name} holds {e.what}, outside what a checkpoint may hold ({_ALLOWED_KINDS}): "
                                    "refused, because unpickling it could run code") from None
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {name}: it is truncated or damaged ({_first_line(e)})") from e


def load_pickle(source: Union[str, BinaryIO], name: str = "") -> Any:
    """A plain pickle (DCP's ``.metadata``) from a path or an open binary file, through the allow-list."""
    with _reading(name or str(source)):
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return _Unpickler(f).load()
        return _Unpickler(source).load()


def _refuse_torchscript(source: BinaryIO) -> None:
    """torch.load hands a TorchScript archive to ``torch.jit.load`` instead of its unpickler, and
    TorchScript runs the archive's ``__setstate__`` code; a checkpoint is never one. Asked the way
    torch.load asks it, so the two cannot disagree about a file."""
    from torch import serialization

    start = source.tell()
    try:
        if not serialization._is_zipfile(source):  # torch's legacy format: read by the unpickler
            return
        with serialization._open_zipfile_reader(source) as archive:
            torchscript = serialization._is_torchscript_zip(archive)
    finally:
        source.seek(start)
    if torchscript:
        raise _Refused("a TorchScript archive")


def load_torch(source: Union[str, BinaryIO], name: str = "", map_location=None, mmap: bool = False) -> Any:
    """What ``torch.save`` wrote (a path or a seekable binary file), through the allow-list; torch itself
    reads the zip records and storages."""
    import torch

    with _reading(name or str(source)):
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                _refuse_torchscript(f)
        else:
            _refuse_torchscript(source)
        return torch.load(source, map_location=map_location, pickle_module=_PICKLE_MODULE, weights_only=False,
                          mmap=mmap)


# --------------------------------------------------------------------------- torch DCP and megatron readers

# The DCP reader whose read_data is running: a byte record's error then names the file holding it.
_READER: contextvars.ContextVar = contextvars.ContextVar("npu_dsv3_dcp_reader", default=None)


def read_metadata(self, *args, **kwargs):
    """``FileSystemReader.read_metadata`` with the allow-list: the original unpickles ``.metadata`` freely."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        metadata = load_pickle(f, str(path))
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {_dotted(type(metadata))}, not the metadata of a distributed "
                              "checkpoint")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _record_name(read_item) -> str:
    reader = _READER.get()
    if reader is None:
        return f"the byte record {read_item.storage_index.fqn}"
    info = reader.storage_data[read_item.storage_index]
    return f"{reader.fs.concat_path(reader.path, info.relative_path)} (record {read_item.storage_index.fqn})"


def load_bytes(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` (megatron's planner inherits it) with the allow-list: the original
    is ``torch.load(weights_only=False)``."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = load_torch(value, _record_name(read_item))
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def _check_files(reader, plan) -> None:
    """Each local file the plan reads exists and reaches the last byte the metadata gives it."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    if not isinstance(reader.fs, FileSystem):
        return
    needed: Dict[str, int] = {}
    for item in plan.items:
        info = reader.storage_data[item.storage_index]
        path = str(reader.fs.concat_path(reader.path, info.relative_path))
        needed[path] = max(needed.get(path, 0), info.offset + info.length)
    for path, end in sorted(needed.items()):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint's .metadata lists it")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"{path} is truncated: {size} bytes, its .metadata needs {end}")


def checked_read_data(original):
    def read_data(self, plan, planner):
        _check_files(self, plan)
        token = _READER.set(self)
        try:
            return original(self, plan, planner)
        except CheckpointError:
            raise
        except Exception as e:  # torch.load of a damaged tensor record: torch names neither file nor tensor
            raise CheckpointError(f"cannot read the tensors of {self.path}: a file is damaged or does not "
                                  f"match its .metadata ({_first_line(e)})") from e
        finally:
            _READER.reset(token)

    return read_data


def unwrapped_errors(original):
    """DCP gathers every rank's exceptions into one CheckpointException (a BaseException whose text is
    each rank's traceback); a CheckpointError of ours among them is re-raised as itself, one line."""

    def _load_state_dict(*args, **kwargs):
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            return original(*args, **kwargs)
        except CheckpointException as e:
            ours = dcp_failure(e, CheckpointError)
            if ours is None:
                raise
            raise ours from e

    return _load_state_dict


def dcp_failure(e, types) -> Optional[BaseException]:
    """The first rank's exception of type ``types`` in DCP's CheckpointException ``e``, which bundles every
    rank's exception with its traceback as text; None when there is none of those types."""
    found = [exc for _, (exc, _) in sorted(e.failures.items()) if isinstance(exc, types)]
    return found[0] if found else None


def load_common(self, checkpoint_dir):
    """``TorchCommonLoadStrategy.load_common`` (megatron's ``common.pt``) with the allow-list."""
    from megatron.core.dist_checkpointing.mapping import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
    if not os.path.isfile(path):
        raise CheckpointingException(f"Common file {path} does not exist")
    return load_torch(path, map_location="cpu")


def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
    """``TorchCommonLoadStrategy.load_sharded_objects`` (one ``.pt`` per object) with the allow-list."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import CheckpointingException

    def load(sh_obj):
        path = os.path.join(checkpoint_dir, f"{sh_obj.unique_key}.pt")
        if not os.path.isfile(path):  # the name megatron wrote before it kept the key's suffix
            path = os.path.join(checkpoint_dir, f"{os.path.splitext(sh_obj.unique_key)[0]}.pt")
        if not os.path.isfile(path):
            raise CheckpointingException(f"Object shard {os.path.join(checkpoint_dir, sh_obj.unique_key)}.pt "
                                         "not found")
        return load_torch(path)

    return dict_list_map_inplace(load, sharded_objects_state_dict)
