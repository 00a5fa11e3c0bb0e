"""The linear backward of the zero-bubble "W split": megatron's local linear hands its
weight-gradient GEMM to ``npu_dsv3.ops.weight_grad`` inside a DualPipeV ``B`` step (see there
for the deferral itself). ``npu_dsv3.features.dualpipev`` patches it in."""

import torch

from npu_dsv3.ops import weight_grad


def linear_backward(original):
    """megatron's local linear backward (ColumnParallelLinear / RowParallelLinear without TE), with
    its weight-gradient GEMM deferred inside a B step.

    Outside a B step, or with the paths that write ``main_grad`` themselves (gradient-accumulation
    fusion, the output layer's deferred-embedding buffer), megatron's own backward runs unchanged.
    The communication stays in B, in megatron's order: the sequence-parallel gather of the input
    (into its own tensor, as megatron's shared gather buffer is reused by the next layer) and the
    input gradient's all-reduce or reduce-scatter.
    """

    def backward(ctx, grad_output):
        if not weight_grad.is_deferring() or ctx.gradient_accumulation_fusion or ctx.grad_output_buffer is not None:
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
        weight_grad.weight_gradient(weight, lambda: grad_output.t().matmul(total_input))
        return grad_input, None, grad_bias, None, None, None, None, None, None

    return backward

