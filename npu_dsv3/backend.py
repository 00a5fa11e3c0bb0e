"""Device backend: choose npu / cuda / cpu, and make megatron-core run on it.

Selection (``select_backend``)
------------------------------
``NPU_DSV3_DEVICE`` = ``npu`` | ``cuda`` | ``cpu`` forces a backend (empty or
unset = auto); asking for one this machine cannot run raises
``BackendUnavailableError`` saying what is missing. Auto: ``npu`` if
``torch_npu`` imports and ``torch.npu.is_available()``, else ``cuda`` if
``torch.cuda.is_available()``, else ``cpu``.

What each backend sets up (``init_backend``, run by ``import npu_dsv3``)
------------------------------------------------------------------------
* npu: ``import torch_npu`` and ``torch_npu.contrib.transfer_to_npu``, which
  maps ``torch.cuda.*``, ``device="cuda"`` and the nccl backend to npu / hccl
  for the whole process (torch_npu's own, irreversible patching: megatron-core
  is written against torch.cuda and this is how it runs on Ascend).
  Distributed backend "hccl".
* cuda: nothing; "nccl".
* cpu: "gloo", and the CPU adapter below.

The CPU adapter (cpu backend only; its patches: ``npu_dsv3.features.cpu_backend``)
-----------------------------------------------------------------------------
megatron-core 0.16.1 calls ``torch.cuda`` directly everywhere: it allocates
with ``device=torch.cuda.current_device()``, overlaps communication with
``torch.cuda.Stream``/``Event``, seeds dropout through a CUDA RNG tracker, and
writes ``device="cuda"`` literals. On a CPU-only torch every one of those raises
(or, for ``torch.cuda.manual_seed`` / megatron's ``_set_cuda_rng_state``,
silently does nothing: they are queued for a CUDA init that never comes). The
adapter treats "the CUDA device" as the CPU, which is all megatron needs to
run its real code paths on gloo -- the same structure it runs on Ascend.
Each item is a registry patch (listed by ``npu-dsv3 patches``, revertible):

* ``torch.cuda.current_device`` -> ``torch.device("cpu")``, so
  ``device=torch.cuda.current_device()`` and ``.to(...)`` land on CPU.
* ``torch.cuda.synchronize`` / ``empty_cache`` -> no-ops (CPU ops are synchronous).
* ``torch.cuda.Stream`` / ``current_stream`` / ``default_stream`` / ``stream`` /
  ``Event`` -> no-op objects: there is one serial CPU "stream", so waits are
  no-ops, all streams compare equal, and ``Event.elapsed_time`` is wall time.
* ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` and
  megatron's ``tensor_parallel.random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` -> the CPU default generator. CPU dropout draws from
  that generator, so ``get_cuda_rng_tracker().fork()`` really switches the
  dropout stream. Consequence: the "CUDA" and the CPU RNG are one stream here
  (``torch.cuda.manual_seed`` reseeds CPU randomness too).
* ``torch.Tensor.record_stream`` -> no-op: it takes a stream argument (parsed
  before any torch function mode sees the call) and has no CPU kernel.
* megatron's ``tensor_parallel.mappings._gather_along_first_dim`` with uneven
  ``output_split_sizes`` (the alltoall dispatcher under TP x EP) -> pad every
  rank's part to the largest, gather equal sizes, slice: gloo's ``all_gather``
  refuses tensors of different sizes. Even splits take megatron's own path.
* ``torch.cuda.nvtx.range_push`` / ``range_pop`` -> no-ops (``nvtx.range`` uses them).
* A ``TorchFunctionMode`` (entered on apply, exited on revert) that rewrites
  CUDA device arguments to CPU: ``device="cuda"``/``torch.device("cuda", i)``
  keyword arguments of any torch function or tensor method, positional devices
  of ``Tensor.to``, and ``Tensor.cuda()``. It also reports CPU tensor types as
  CUDA ones (``x.type()`` -> ``"torch.cuda.FloatTensor"``) because megatron's
  optimizers and ``clip_grad_by_total_norm_fp32`` reject parameters whose
  ``type()`` is not a ``torch.cuda.*`` name. Torch function modes are thread-local: the rewrite is
  active in the thread that applied the adapter (the main thread) only.

Deliberately NOT done: ``torch.cuda.is_available()`` stays False and
``device_count()`` stays 0 (code that asks gets the truth); CUDA graphs,
``MemPool``, TransformerEngine, and ``torch.autocast("cuda")`` are not emulated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "select_backend",
    "require_backend",
    "init_backend",
    "current_backend",
    "device",
    "dist_backend",
]

BACKENDS = ("npu", "cuda", "cpu")
ENV_VAR = "NPU_DSV3_DEVICE"
_DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class BackendUnavailableError(RuntimeError):
    """The requested device backend cannot run on this machine."""


# --------------------------------------------------------------------------- selection


def _npu_probe() -> tuple[bool, str]:
    """(usable, why not). Importing torch_npu is the only way to know."""
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch_npu is not installed"
    try:
        import torch_npu  # noqa: F401
    except Exception as e:  # ImportError, or OSError from missing CANN libraries
        return False, f"`import torch_npu` failed: {e!r}"
    if not torch.npu.is_available():
        return False, "torch_npu imports but torch.npu.is_available() is False (no NPU visible)"
    return True, ""


def require_backend(name: str) -> None:
    """Raise BackendUnavailableError, saying what is missing, unless ``name`` can run here."""
    if name == "npu":
        ok, why = _npu_probe()
        if not ok:
            raise BackendUnavailableError(
                f"{ENV_VAR}=npu but {why}. Install the torch_npu release that matches "
                f"torch {torch.__version__} and source CANN's environment "
                f"(e.g. `source /usr/local/Ascend/ascend-toolkit/set_env.sh`), check `npu-smi info` "
                f"and ASCEND_RT_VISIBLE_DEVICES; or unset {ENV_VAR} to auto-select."
            )
    elif name == "cuda" and not torch.cuda.is_available():
        missing = (
            f"this torch build ({torch.__version__}) has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
        raise BackendUnavailableError(
            f"{ENV_VAR}=cuda but {missing}. Install a CUDA build of torch on a GPU machine, "
            f"or set {ENV_VAR}=cpu / unset it to auto-select."
        )


def select_backend() -> str:
    """"npu", "cuda" or "cpu" for this process (see the module docstring)."""
    raw = os.environ.get(ENV_VAR, "")
    requested = raw.strip().lower()
    if requested and requested not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not a device backend; valid values: {', '.join(BACKENDS)} "
            f"(or unset it to auto-select)"
        )
    if requested:
        require_backend(requested)
        return requested

    ok, why = _npu_probe()
    if ok:
        return "npu"
    if importlib.util.find_spec("torch_npu") is not None:
        # Installed but unusable: on an Ascend node this is a broken CANN setup, and
        # silently training on another device would be worse than a loud warning.
        warnings.warn(f"npu_dsv3: not using the NPU: {why}", RuntimeWarning, stacklevel=2)
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


_current: str | None = None


def init_backend(name: str | None = None) -> str:
    """Select (unless ``name`` is given) and set up the backend; idempotent."""
    global _current
    if _current is not None:
        if name is not None and name != _current:
            raise RuntimeError(f"backend already initialised as {_current!r}, cannot switch to {name!r}")
        return _current
    name = name or select_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "npu":
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401  (side effect: cuda -> npu)
    _current = name
    return name


def current_backend() -> str:
    return init_backend()


def device() -> torch.device:
    """The torch.device this process computes on (its current device index)."""
    b = current_backend()
    if b == "npu":
        return torch.device("npu", torch.npu.current_device())
    if b == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend name: hccl / nccl / gloo."""
    return _DIST_BACKEND[current_backend()]


def set_local_device() -> None:
    """Binds this process to its device: torchrun starts one process per NPU / GPU of a node, and each
    must compute on device LOCAL_RANK, not all on device 0. Nothing to do on cpu."""
    b = current_backend()
    if b != "cpu":
        (torch.npu if b == "npu" else torch.cuda).set_device(int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------- CPU adapter

_CPU = torch.device("cpu")


def cpu_current_device() -> torch.device:
    return _CPU


def noop(*args, **kwargs) -> None:
    return None


def nvtx_noop(*args, **kwargs) -> int:
    return 0  # torch's range_push/range_pop return the nesting depth


class CpuEvent:
    """Stands in for torch.cuda.Event. CPU work is done when the call returns, so
    an event is complete as soon as it is recorded; timing is wall-clock."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_):
        self.enable_timing = enable_timing
        self._time: float | None = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Events were not created with enable_timing=True")
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time() needs both events recorded")
        return (end_event._time - self._time) * 1000.0  # milliseconds, like CUDA


class CpuStream:
    """Stands in for torch.cuda.Stream. There is one serial CPU "stream": every
    instance compares equal, so megatron's `current_stream() != side_stream`
    checks see no side stream, and all waits are no-ops."""

    cuda_stream = 0

    def __init__(self, device=None, priority: int = 0, **_):
        self.priority = priority
        self.device = _CPU

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, CpuStream)

    def __hash__(self) -> int:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_THE_STREAM = CpuStream()


def cpu_current_stream(device=None) -> CpuStream:
    return _THE_STREAM


def cpu_stream_context(stream=None):
    return contextlib.nullcontext(stream)


def cuda_get_rng_state(device="cuda") -> torch.Tensor:
    return torch.get_rng_state()


def cuda_set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.set_rng_state(new_state)


def cuda_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def megatron_get_cuda_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states do not exist on the CPU backend")
    return torch.get_rng_state()  # already a fresh tensor, so `clone` needs no extra copy


def megatron_set_cuda_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states do not exist on the CPU backend")
    torch.set_rng_state(new_state)


def _is_cuda(dev) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _tensor_cuda(func, args, kwargs):
    # Tensor.cuda(device=None, non_blocking=False, memory_format=...) -> stay on CPU.
    return args[0].cpu(memory_format=kwargs.get("memory_format", torch.preserve_format))


def _tensor_to(func, args, kwargs):
    args = tuple(_CPU if _is_cuda(a) else a for a in args)
    if _is_cuda(kwargs.get("device")):
        kwargs = {**kwargs, "device": _CPU}
    return func(*args, **kwargs)


def _tensor_type(func, args, kwargs):
    result = func(*args, **kwargs)
    if len(args) == 1 and not kwargs and args[0].device.type == "cpu":  # the getter form only
        return "torch.cuda." + result[len("torch."):]
    return result


def record_stream(self, stream) -> None:
    # Memory is not reused across streams on the CPU: nothing to record.
    return None


def host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    # megatron's version copies only CUDA tensors, so on CPU the all-to-all split sizes stay
    # tensors, which all_to_all_single refuses; take the host copy (a list-like array) here too.
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().numpy().copy()
    return tensor


def gather_uneven_first_dim(original):
    """Wraps megatron's ``_gather_along_first_dim``. Under TP x EP the alltoall dispatcher gathers
    each TP rank's received tokens with per-rank ``output_split_sizes``, as one ``all_gather`` into
    tensors of different sizes, which gloo refuses. Every rank pads its part to the largest size,
    megatron's equal-size gather runs, and the padding is sliced off. It is called inside
    megatron's gather/reduce-scatter autograd functions, whose backward stays megatron's."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = original(padded, group, None, use_global_buffer).view(len(output_split_sizes), *padded.shape)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])

    return gather


_TENSOR_METHODS = {
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.to: _tensor_to,
    torch.Tensor.type: _tensor_type,
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU (see the module docstring).

    Cost: every torch call made while the mode is active passes through this
    Python method; the fast path is one dict lookup and one kwargs lookup.
    Measured on torch 2.13 CPU: +1 us per call (2.0 vs 1.0 us for an 8-element
    add); forward+backward of a 256->1024->256 MLP on 64 rows: 1.25 vs 1.23 ms
    (~2%). Model-sized ops make it noise.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _TENSOR_METHODS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


class _ModeSwitch:
    """Holds the active CudaToCpuMode. The patch registry only sets and deletes
    attributes, so entering/exiting the mode is done by this property: setting
    ``mode`` enters the mode, deleting it exits -- the mode is then applied,
    listed and reverted like every other patch."""

    def __init__(self) -> None:
        self._mode: CudaToCpuMode | None = None

    @property
    def mode(self) -> CudaToCpuMode | None:
        return self._mode

    @mode.setter
    def mode(self, new: CudaToCpuMode) -> None:
        if self._mode is not None:
            raise RuntimeError("the CUDA->CPU device mode is already active")
        # Enter it beneath the modes active in this thread: the patches are applied when megatron.core is
        # first imported, which may happen inside `with torch.device("meta"):`, and leaving that block pops
        # the top of the mode stack, which must be the block's own mode, not this one.
        above = [torch.overrides._pop_mode() for _ in range(torch._C._len_torch_function_stack())]
        try:
            new.__enter__()
        finally:
            for mode in reversed(above):
                torch.overrides._push_mode(mode)
        self._mode = new

    @mode.deleter
    def mode(self) -> None:
        top = torch.overrides._get_current_function_mode()
        if top is not self._mode:
            # Exiting pops the top of the (thread-local) mode stack: never pop someone else's.
            raise RuntimeError(
                "cannot exit the CUDA->CPU device mode: it is not the innermost torch function "
                "mode in this thread (exit the modes entered after it first, or revert from the "
                "thread that applied it)"
            )
        self._mode.__exit__(None, None, None)
        self._mode = None


cuda_to_cpu = _ModeSwitch()


class _CallableModule(types.ModuleType):
    """`npu_dsv3.backend` is this module, and `npu_dsv3.backend()` is the backend
    name: a package attribute cannot be both a submodule and a function, because
    importing the submodule rebinds the package attribute to it."""

    def __call__(self) -> str:
        return current_backend()


sys.modules[__name__].__class__ = _CallableModule
