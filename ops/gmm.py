"""Grouped GEMM over experts: ``gmm(x, weight, tokens_per_expert) -> [T, N]``.

``x`` is ``[T, K]`` with rows sorted by expert, ``weight`` is ``[E, K, N]`` and
``tokens_per_expert`` is ``[E]`` counts (zeros allowed). Row block ``e`` of the
output is ``x_e @ weight[e]``; backward gives dx and dW (dW deferred to the W step
inside a DualPipeV zero-bubble B step, see ``npu_dsv3.ops.weight_grad``).

- NPU: ``torch_npu.npu_grouped_matmul`` on single tensors (split_item 3) with the
  cumulative ``group_list`` tensor (group_list_type 0): group_type 0 splits M for
  y and dx; dW is the K-split grouped GEMM (group_type 2) of x^T and dy. (torch_npu
  has no ``npu_gmm``: that name is MindSpeed's wrapper around the same kernel.)
- Portable: ``torch._grouped_mm`` where the build accepts the operands (its
  CPU kernel needs 16-byte aligned strides), otherwise every expert's rows are
  padded to the largest count and one ``bmm`` runs: never a loop over experts.
"""

import torch

from npu_dsv3.ops._npu import on_npu, torch_npu
from npu_dsv3.ops import weight_grad


def group_list(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Counts -> the cumulative row offsets npu_grouped_matmul's ``group_list`` and ``_grouped_mm``'s ``offs`` take."""
    return torch.cumsum(tokens_per_expert.to(torch.int64), 0)


def _check(x, weight, tokens_per_expert):
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"gmm expects x [T, K] and weight [E, K, N]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if tokens_per_expert.numel() != weight.shape[0]:
        raise ValueError(f"tokens_per_expert has {tokens_per_expert.numel()} entries for {weight.shape[0]} experts")


_SINGLE_TENSOR_OUT = 3  # split_item: x and y are single tensors
_SPLIT_M = 0
_SPLIT_K = 2
_CUMULATIVE = 0  # group_list_type: group_list holds cumulative ends


def _grouped_matmul(x, weight, offsets, group_type):
    return torch_npu().npu_grouped_matmul(
        [x], [weight], bias=None, group_list=offsets, split_item=_SINGLE_TENSOR_OUT,
        group_type=group_type, group_list_type=_CUMULATIVE,
    )[0]


class _NpuGMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        x = x.contiguous()  # the kernel does not take a transposed x for group_type 0
        ctx.save_for_backward(x, weight, offsets)
        return _grouped_matmul(x, weight, offsets, _SPLIT_M)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # autograd may hand over an expanded (stride 0) gradient
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_matmul(grad_out, weight.transpose(1, 2), offsets, _SPLIT_M)
        if ctx.needs_input_grad[1]:
            # K-split: x^T [K, M] and dy [M, N], grouped along M -> [E, K, N].
            grad_w = weight_grad.weight_gradient(weight, lambda: _grouped_matmul(x.t(), grad_out, offsets, _SPLIT_K))
        return grad_x, grad_w, None


def npu_gmm(x, weight, tokens_per_expert):
    """The torch_npu path (also run against the emulation in the tests)."""
    return _NpuGMM.apply(x, weight, group_list(tokens_per_expert).to(x.device))


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if any((s * t.element_size()) % 16 for s in t.shape):
            return False
    return True


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # autograd may hand over a stride-0 (expanded) gradient
        grad_x = grad_w = None
        # Transposed views, not copies: the kernel takes either stride order, and a copy of
        # every expert's weight on each backward costs more than the GEMM's packing.
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, weight.transpose(1, 2), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad.weight_gradient(weight, lambda: torch._grouped_mm(x.t(), grad_out, offs=offsets))
        return grad_x, grad_w, None


def _padded_gmm(x, weight, tokens_per_expert):
    """Rows scattered into an ``[E, max_rows, K]`` buffer, one bmm, gathered back."""
    num_experts = weight.shape[0]
    counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
    max_rows = int(counts.max())
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    flat_index = expert_of_row * max_rows + slot
    padded = x.new_zeros(num_experts * max_rows, x.shape[1]).index_copy(0, flat_index, x)
    out = torch.bmm(padded.view(num_experts, max_rows, x.shape[1]), weight)
    return out.view(num_experts * max_rows, weight.shape[2]).index_select(0, flat_index)


def gmm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    _check(x, weight, tokens_per_expert)
    if x.shape[0] == 0:
        # Keep every weight in the graph so it still receives a (zero) gradient.
        return x @ weight.sum(0) * 0
    if on_npu(x):
        return npu_gmm(x, weight, tokens_per_expert)
    if x.dtype == weight.dtype and _grouped_mm_ok(x, weight):
        return _GroupedMM.apply(x, weight, group_list(tokens_per_expert).to(device=x.device, dtype=torch.int32))
    return _padded_gmm(x, weight, tokens_per_expert)
