"""Weight-gradient deferral primitives, the zero-bubble "W split" DualPipeV's ``B`` and ``W`` steps run on.

During a ``B`` step the schedule opens ``deferring()``; every layer that supports the
split computes its input gradient at once and hands the weight-gradient GEMM to
``defer`` instead of running it. The ``W`` step later runs the collected closures,
which add into the weights' gradients exactly where autograd would have put them
(``accumulate``). Layers that do not call ``defer`` (norms, the router, the
embedding) compute their weight gradients inside ``B`` as usual.

The grouped-GEMM op (``gmm``) and the linear-backward patch
(``npu_dsv3.schedules.weight_grad``) call ``weight_gradient``; the schedule opens and runs.
One schedule runs per process and single-threaded, so a module-level list is the store.
"""

import contextlib
from typing import Callable, Iterator, List, Optional

import torch

_pending: Optional[List[Callable[[], None]]] = None


@contextlib.contextmanager
def deferring() -> Iterator[List[Callable[[], None]]]:
    """Collect the weight-gradient closures of the backward run inside; yields their list."""
    global _pending
    if _pending is not None:
        raise RuntimeError("weight-gradient deferral is already open; a B step cannot nest in another")
    _pending = []
    try:
        yield _pending
    finally:
        _pending = None


def is_deferring() -> bool:
    """Whether a B step is collecting weight gradients now."""
    return _pending is not None


def defer(compute: Callable[[], None]) -> bool:
    """Queue ``compute`` when a B step is collecting; False means no deferral is open and the
    caller runs it now. (For work that is not a weight gradient, e.g. a benchmark's cost.)"""
    if _pending is None:
        return False
    _pending.append(compute)
    return True


def weight_gradient(weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """For an autograd function's backward: ``compute()`` now, as the gradient it returns for
    ``weight``; or, inside a B step, None, with ``compute`` queued to add into ``weight``'s
    gradient at the W step."""
    if _pending is None:
        return compute()
    _pending.append(lambda: accumulate(weight, compute()))
    return None


def accumulate(weight: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` where autograd and megatron's DDP hook would: ``main_grad`` when the parameter
    has one (DDP's buffer), otherwise ``.grad``. A weight that is a whole-tensor view of its
    parameter (the grouped experts' ``[E, K, N]`` view) passes the gradient back in the
    parameter's shape, as autograd's view backward does."""
    param = weight
    if weight._base is not None:
        param = weight._base
        if param.numel() != weight.numel() or not param.is_contiguous():
            raise ValueError(f"cannot defer the weight gradient of a partial view {tuple(weight.shape)} "
                             f"of a {tuple(param.shape)} parameter")
        grad = grad.reshape(param.shape)
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        main_grad.add_(grad.to(main_grad.dtype))
    elif param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def run(closures: List[Callable[[], None]]) -> None:
    """The W step: every deferred weight gradient of one (micro-batch, chunk). Without autograd,
    as inside backward: the saved activations require grad, and the sums must not record a graph."""
    with torch.no_grad():
        for compute in closures:
            compute()
