"""Grouped GEMM over experts: ``gmm(x, weight, tokens_per_expert) -> [T, N]``.

``x`` is ``[T, K]`` with rows sorted by expert, ``weight`` is ``[E, K, N]`` and
``tokens_per_expert`` is ``[E]`` counts (zeros allowed). Row block ``e`` of the
output is ``x_e @ weight[e]``.

The portable path uses ``torch._grouped_mm`` where the build accepts the
operands (its CPU kernel needs 16-byte aligned strides), and otherwise pads
every expert's rows to the largest count and runs one ``bmm``: never a Python
loop over experts.
"""

import torch


def _offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Cumulative row counts, the ``group_list`` / ``offs`` form the kernels take."""
    return torch.cumsum(tokens_per_expert.to(torch.int64), 0).to(torch.int32)


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if any((s * t.element_size()) % 16 for s in t.shape):
            return False
    return hasattr(torch, "_grouped_mm")


def _padded_gmm(x, weight, tokens_per_expert):
    """Rows scattered into an ``[E, max_rows, K]`` buffer, one bmm, gathered back."""
    num_experts = weight.shape[0]
    counts = tokens_per_expert.to(torch.int64)
    max_rows = int(counts.max()) if counts.numel() else 0
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    flat_index = expert_of_row * max_rows + slot
    padded = x.new_zeros(num_experts * max_rows, x.shape[1])
    padded = padded.index_copy(0, flat_index, x).view(num_experts, max_rows, x.shape[1])
    out = torch.bmm(padded, weight).view(num_experts * max_rows, weight.shape[2])
    return out.index_select(0, flat_index)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, weight.transpose(1, 2).contiguous(), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x.t().contiguous(), grad_out, offs=offsets)
        return grad_x, grad_w, None


def gmm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"gmm expects x [T, K] and weight [E, K, N]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if tokens_per_expert.numel() != weight.shape[0]:
        raise ValueError(
            f"tokens_per_expert has {tokens_per_expert.numel()} entries for {weight.shape[0]} experts"
        )
    if x.shape[0] == 0:
        # Keep every weight in the graph so it still receives a (zero) gradient.
        return x @ weight.sum(0) * 0
    if x.dtype == weight.dtype and _grouped_mm_ok(x, weight):
        return _GroupedMM.apply(x, weight, _offsets(tokens_per_expert).to(x.device))
    return _padded_gmm(x, weight, tokens_per_expert.to(x.device))
