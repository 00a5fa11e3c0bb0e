"""Streaming checkpoint I/O shared by the converters: atomic writes, a checksum
manifest that makes long jobs resumable, a bytes/s progress bar, a process-pool map.

A conversion job writes many large files into one output directory. The rules
that keep such a directory trustworthy when a job dies half-way:

- every file appears under its final name only once it is complete
  (:func:`atomic_write`), so nothing there "looks complete but isn't";
- :class:`Manifest` lists the files a job finished, with size and sha256, so a
  rerun with ``--resume`` skips exactly the files that are intact;
- :func:`prepare_output_dir` refuses a non-empty directory unless resuming, so
  a typo in a path never silently overwrites another checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import sys
import uuid
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = ".npu_dsv3_manifest.json"
# Temp files are hidden and carry this suffix: a crash (kill -9) can leave one
# behind, and nobody mistakes it for an output; prepare_output_dir removes them.
TEMP_SUFFIX = ".npu_dsv3-tmp"
HASH_CHUNK = 16 << 20


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: str) -> None:
    # The rename itself lives in the directory entry; without this a power loss
    # can forget a file whose data was already fsync'ed. Not possible on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _new_file_mode() -> int:
    # The umask can only be read by setting it, which races with threads creating
    # files; so it is read once per process.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yields a temporary path in ``path``'s directory; write the file there.

    On normal exit the temp file is fsync'ed and renamed onto ``path`` (atomic on
    POSIX and Windows). On an exception it is removed and ``path`` is untouched.
    A path (not a file object) is yielded so any writer works: ``open``,
    ``safetensors.torch.save_file``, ``shutil.copyfile``. The file gets the mode
    of any new file (0666 less the umask): safetensors alone creates 0600 files,
    which other users of a shared cluster could not read.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str,
                            metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_json(obj, path: str, sort_keys: bool = False) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")


def atomic_copy(src: str, dst: str) -> None:
    """Byte-for-byte copy (symlinks followed, as in an HF cache snapshot)."""
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


# --------------------------------------------------------------------------- manifest


def file_digest(path: str) -> Dict[str, object]:
    """``{"size", "sha256"}`` of a file, read in 16 MiB chunks (constant memory).

    sha256 runs at 1.2-1.5 GB/s per core (measured here), about the cost of
    reading the file once more; it catches truncation and bit rot, which a size
    check alone does not.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _intact(path_and_entry) -> bool:
    path, entry = path_and_entry
    # Size first: a truncated file is found without hashing it.
    try:
        if os.path.getsize(path) != entry["size"]:
            return False
    except OSError:
        return False
    return file_digest(path) == entry


class Manifest:
    """The files a job finished in ``directory``, stored as ``<directory>/.npu_dsv3_manifest.json``.

    ``job`` describes what produces the directory (command, input path); resuming
    with a different job is refused, since mixing files from two inputs would give
    a checkpoint that loads but is wrong. The manifest is rewritten atomically
    after each :meth:`record`, so it only ever lists files that were complete.
    """

    VERSION = 1

    def __init__(self, directory: str, job: Optional[Dict[str, object]] = None):
        self.directory = directory
        self.path = os.path.join(directory, MANIFEST_FILE)
        self.job = job or {}
        self.files: Dict[str, Dict[str, object]] = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    stored = json.load(f)
                stored_job, self.files = stored["job"], dict(stored["files"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path} is not a readable manifest ({e}); delete it to redo every file") from e
            if job is not None and stored_job != job:
                raise ValueError(f"{directory} was written by another job ({stored_job}), not by this one ({job}); "
                                 f"use another output directory")
            self.job = stored_job

    def save(self) -> None:
        atomic_write_json({"version": self.VERSION, "job": self.job, "files": self.files}, self.path, sort_keys=True)

    def done(self, relpath: str) -> bool:
        """True if ``relpath`` was recorded and is still byte-identical; otherwise forgets it."""
        entry = self.files.get(relpath)
        if entry is not None and _intact((os.path.join(self.directory, relpath), entry)):
            return True
        self.forget(relpath)
        return False

    def pending(self, relpaths: Sequence[str], workers: int = 1) -> List[str]:
        """The subset of ``relpaths`` that is not :meth:`done`, hashing ``workers`` files at a time."""
        recorded = [p for p in relpaths if p in self.files]
        checks = parallel_map(_intact, [(os.path.join(self.directory, p), self.files[p]) for p in recorded],
                              workers, label=lambda args: args[0])
        for relpath, ok in zip(recorded, checks):
            if not ok:
                self.forget(relpath)
        return [p for p in relpaths if p not in self.files]

    def record(self, relpath: str, digest: Optional[Dict[str, object]] = None) -> None:
        """Marks a finished file; ``digest`` (from :func:`file_digest`) if a worker already hashed it."""
        self.files[relpath] = digest or file_digest(os.path.join(self.directory, relpath))
        self.save()

    def forget(self, relpath: str) -> None:
        if self.files.pop(relpath, None) is not None:
            self.save()


def prepare_output_dir(directory: str, resume: bool, job: Dict[str, object]) -> Manifest:
    """Creates ``directory`` (or checks it may be resumed) and returns its manifest.

    Without ``resume`` the directory must be absent or empty. With it, a non-empty
    directory must hold a manifest of the same ``job``; temp files of a killed run
    are removed.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"output path {directory} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    entries = os.listdir(directory)
    if entries and not resume:
        raise ValueError(f"output directory {directory} is not empty; pass --resume to continue an interrupted "
                         f"job there (intact files are kept), or choose an empty directory")
    if entries and MANIFEST_FILE not in entries:
        raise ValueError(f"cannot resume in {directory}: it has no {MANIFEST_FILE}, so it was not written "
                         f"by this tool; choose an empty directory")
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            if name.endswith(TEMP_SUFFIX):
                os.remove(os.path.join(dirpath, name))
    manifest = Manifest(directory, job)
    manifest.save()
    return manifest


# --------------------------------------------------------------------------- safetensors header


def safetensors_nbytes(path: str) -> int:
    """Sum of the tensor byte sizes in a safetensors file, from its header alone
    (what an HF index calls ``total_size``)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return sum(end - start for key, info in header.items() if key != "__metadata__"
               for start, end in [info["data_offsets"]])


# --------------------------------------------------------------------------- progress


def progress(total_bytes: int, desc: str, enabled: bool = True, done_bytes: int = 0):
    """A tqdm bar on stderr counting bytes (shows MB/s, GB/s); ``update(n_bytes)``.

    ``done_bytes``: work finished by an earlier run; shown as done but left out of
    the rate, so a resumed job does not report an impossible speed.
    """
    from tqdm import tqdm

    return tqdm(total=total_bytes, initial=done_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------- parallel map


def _worker_init() -> None:
    # Workers are forked. A forked child that enters an OpenMP parallel region the
    # parent already used hangs (GNU OpenMP is not fork-safe; reproduced with torch
    # 2.13), so each worker computes single-threaded: parallelism is across items.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _pool_context():
    # fork: workers start instantly and need no `if __name__ == "__main__"` guard in
    # the caller (`python -m npu_dsv3` has none); spawn where fork does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _named(exc: BaseException, name: str) -> BaseException:
    """The exception with ``name`` in its message, same type when possible (the CLI
    turns ValueError / FileNotFoundError into a one-line error)."""
    if name in str(exc):
        return exc
    try:
        return type(exc)(f"{name}: {exc}")
    except Exception:
        return exc


def parallel_map(fn: Callable, items: Iterable, workers: int = 1,
                 on_result: Optional[Callable] = None, label: Callable[[object], str] = str) -> list:
    """``[fn(item) for item in items]`` on ``workers`` processes (1: in this process).

    ``fn`` and the items must be picklable (module-level function). Results come
    back in the order of ``items``; ``on_result(item, result)`` is called in this
    process as each item finishes (in completion order), e.g. to record it in a
    manifest or advance a progress bar. The first exception stops the job: pending
    items are cancelled, running ones finish (and still get ``on_result``), and the
    exception is re-raised with ``label(item)`` in its message.
    """
    items = list(items)
    results = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            try:
                results[i] = fn(item)
            except Exception as e:
                named = _named(e, label(item))
                if named is e:
                    raise
                raise named from e
            if on_result is not None:
                on_result(item, results[i])
        return results

    first_error = None
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=_pool_context(),
                                                initializer=_worker_init) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                if first_error is None:
                    first_error = (error, label(items[i]))
                    for other in futures:
                        other.cancel()
                continue
            results[i] = future.result()
            if on_result is not None:
                on_result(items[i], results[i])
    if first_error is not None:
        error, name = first_error
        if isinstance(error, concurrent.futures.process.BrokenProcessPool):
            raise RuntimeError(f"a worker process died while working on {name} or another item (killed for "
                               f"lack of memory? use fewer --workers)") from error
        named = _named(error, name)
        if named is error:
            raise error
        raise named from error
    return results
