"""Weight-gradient deferral, the zero-bubble "W split" DualPipeV's ``B`` and ``W`` steps run on.

During a ``B`` step the schedule opens ``deferring()``; every layer that supports the
split computes its input gradient at once and hands the weight-gradient GEMM to
``defer`` instead of running it. The ``W`` step later runs the collected closures,
which add into the weights' gradients exactly where autograd would have put them
(``accumulate``). Layers that do not call ``defer`` (norms, the router, the
embedding) compute their weight gradients inside ``B`` as usual.

One schedule runs per process and single-threaded, so a module-level list is the store.
"""

import contextlib
from typing import Callable, Iterator, List, Optional

import torch

from npu_dsv3.patching import Patch, register

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


def _linear_backward(original):
    """megatron's local linear backward (ColumnParallelLinear / RowParallelLinear without TE), with
    its weight-gradient GEMM deferred inside a B step.

    Outside a B step, or with the paths that write ``main_grad`` themselves (gradient-accumulation
    fusion, the output layer's deferred-embedding buffer), megatron's own backward runs unchanged.
    The communication stays in B, in megatron's order: the sequence-parallel gather of the input
    (into its own tensor, as megatron's shared gather buffer is reused by the next layer) and the
    input gradient's all-reduce or reduce-scatter.
    """

    def backward(ctx, grad_output):
        if _pending is None or ctx.gradient_accumulation_fusion or ctx.grad_output_buffer is not None:
            return original(ctx, grad_output)
        from megatron.core.tensor_parallel import layers

        input, weight = ctx.saved_tensors
        group = ctx.tp_group
        total_input = input
        if ctx.sequence_parallel:
            total_input = input.new_empty((input.shape[0] * group.size(), *input.shape[1:]))
            layers.dist_all_gather_func(total_input, input, group=group)
        grad_input = grad_output.matmul(weight)
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        if ctx.sequence_parallel:
            reduced = input.new_empty(input.shape)
            layers.dist_reduce_scatter_func(reduced, grad_input, group=group)
            grad_input = reduced
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=group)
        grad_output, total_input = layers.prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
        weight_gradient(weight, lambda: grad_output.t().matmul(total_input))
        return grad_input, None, grad_bias, None, None, None, None, None, None

    return backward


register(
    Patch(
        name="dualpipev.linear_weight_grad_split",
        feature="dualpipev",
        target="megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.backward",
        replacement=_linear_backward,
        wrap=True,
        why="DualPipeV's zero-bubble B steps compute the input gradient and leave the weight-gradient GEMM "
        "to a later W step; megatron's local linear has no such split",
    )
)
