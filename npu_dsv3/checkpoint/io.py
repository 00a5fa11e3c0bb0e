"""Streaming checkpoint I/O shared by the converters: atomic writes, a checksum
manifest that makes long jobs resumable, a bytes/s progress bar, a process-pool map.

A conversion job writes many large files into one output directory. The rules
that keep such a directory trustworthy when a job dies half-way:

- every file appears under its final name only once it is complete
  (:func:`atomic_write`), so nothing there "looks complete but isn't";
- :class:`Manifest` lists the files a job finished, with size and CRC-32, so a
  rerun with ``--resume`` skips exactly the files that are intact;
- :func:`prepare_output_dir` refuses a non-empty directory unless resuming, so
  a typo in a path never silently overwrites another checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import ctypes
import functools
import json
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
    """``{"size", "crc32"}`` of a file, read in 16 MiB chunks (constant memory).

    Writers compute the same digest from the bytes as they write them
    (``npu_dsv3.checkpoint.writers``), so recording a file costs no second read;
    this function re-reads only to verify a file on ``--resume``. CRC-32 rather
    than sha256: the manifest guards against truncation and accidental corruption
    (a crash, bit rot, a partial copy), not against deliberate tampering. The size
    catches truncation; CRC-32 catches every burst error up to 32 bits and any
    other change with probability 1 - 2**-32. zlib.crc32 runs at 6.4 GB/s per core
    here against sha256's 1.9 GB/s (SHA-NI), and unlike sha256 two CRCs combine
    (:func:`crc32_combine`), which lets a writer that fills a file out of order
    still checksum it without reading it back. Entries recorded with another
    algorithm (older manifests) simply do not match, so those files are redone.
    """
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return digest_of(size, crc)


def digest_of(size: int, crc: int) -> Dict[str, object]:
    """The manifest entry of a file of ``size`` bytes whose CRC-32 is ``crc``."""
    return {"size": size, "crc32": f"{crc:08x}"}


# CRC-32 of A + B from crc(A), crc(B) and len(B), as zlib's crc32_combine (which
# Python does not expose): multiply crc(A) by x^(8 len(B)) modulo the CRC polynomial,
# in the bit-reflected representation zlib uses. About 50 microseconds per call.
_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p for k = 0..63, x^1 first
for _ in range(63):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and ``len2 = len(b)``."""
    p, k = 1 << 31, 3  # x^0; len2 bytes are 8 * len2 = 2^3 * len2 bits
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 63], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


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
        """Marks a finished file; ``digest`` (:func:`file_digest`'s format) if its writer already computed it."""
        self.files[relpath] = digest or file_digest(os.path.join(self.directory, relpath))
        self.save()

    def forget(self, relpath: str) -> None:
        if self.files.pop(relpath, None) is not None:
            self.save()


def check_output_path(directory: str) -> None:
    """``directory`` can be the output of a job: a directory, or absent under a writable directory. Jobs call
    it before reading their input, so a wrong output path fails in one line before the work starts."""
    from npu_dsv3.argtypes import output_dir_problem

    problem = output_dir_problem(directory)
    if problem:
        raise ValueError(f"output directory {directory}: {problem}; choose another")


def _finished_no_file(directory: str) -> bool:
    """True if all ``directory`` holds is what a job that died before finishing any file leaves:
    its manifest listing no file and/or temp files (at least one of them), and folders of those."""
    traces = False
    manifest = os.path.join(directory, MANIFEST_FILE)
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            if name.endswith(TEMP_SUFFIX) or (path == manifest and _records_nothing(directory)):
                traces = True
            else:
                return False
    return traces


def _records_nothing(directory: str) -> bool:
    try:
        return not Manifest(directory).files
    except ValueError:  # unreadable: not ours to judge, prepare_output_dir's checks refuse it
        return False


def _clear_traces(directory: str) -> None:
    """Removes what ``_finished_no_file`` accepted: the files, then the folders they were in."""
    for dirpath, dirs, names in os.walk(directory, topdown=False):
        for name in names:
            os.remove(os.path.join(dirpath, name))
        for name in dirs:
            os.rmdir(os.path.join(dirpath, name))


def prepare_output_dir(directory: str, resume: bool, job: Dict[str, object]) -> Manifest:
    """Creates ``directory`` (or checks it may be resumed) and returns its manifest.

    Without ``resume`` the directory must be absent or empty. With it, a non-empty
    directory must hold a manifest of the same ``job``; temp files of a killed run
    are removed. A directory left by a job that failed before finishing any file
    counts as empty, for any job: there is nothing in it to keep.
    """
    check_output_path(directory)
    os.makedirs(directory, exist_ok=True)
    if _finished_no_file(directory):
        _clear_traces(directory)
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


def safetensors_header(path: str) -> Tuple[Dict[str, dict], int]:
    """The JSON header of a safetensors file, ``{name: {"dtype", "shape", "data_offsets"}}`` (and
    ``__metadata__``), and the file offset the data offsets count from; the tensor bytes are not read."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_len)), 8 + header_len


def safetensors_nbytes(path: str) -> int:
    """Sum of the tensor byte sizes in a safetensors file, from its header alone
    (what an HF index calls ``total_size``)."""
    return sum(end - start for key, info in safetensors_header(path)[0].items() if key != "__metadata__"
               for start, end in [info["data_offsets"]])


def pack_shards(sizes: Iterable[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Names in order, cut into consecutive shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own): the rule HF's ``save_pretrained`` follows."""
    shards: List[List[str]] = []
    shard_bytes = 0
    for name, size in sizes:
        if not shards or shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker die with ``parent_pid``. A worker whose converter was killed (kill -9, OOM
    killer) would otherwise finish its item, holding hundreds of MB, then wait forever for work.
    Linux: the kernel sends SIGKILL when the parent dies. Elsewhere: a thread polls the parent pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # it died before prctl took effect
                    os._exit(1)
                return
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _worker_init(parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    # Workers are forked. A forked child that enters an OpenMP parallel region the
    # parent already used hangs (GNU OpenMP is not fork-safe; reproduced with torch
    # 2.13), so each worker computes single-threaded: parallelism is across items.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch on one thread for the duration (restored after).

    Conversion work is copies and transposes, which a second OpenMP thread barely
    speeds up on an idle machine but which stall when another process holds a core:
    OpenMP threads wait for a descheduled peer. Measured on this 2-core VM with one
    other job running: a transposing bf16 copy ran at 0.10 GB/s with 2 threads and
    4.3 GB/s with 1. Parallelism comes from ``--workers`` (processes) instead.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
                                                initializer=_worker_init, initargs=(os.getpid(),)) as pool:
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
