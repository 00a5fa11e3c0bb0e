"""The output head's vocabulary padding kept out of the softmax.

Megatron pads the vocabulary to a multiple of 128 x TP rows, so the padding
depends on the layout (DeepSeek-V3's 129280 needs none at TP 1 or 2 and 256
rows at TP 4). Left in, the padded rows' logits enter the softmax: the loss
then differs from transformers' and from one layout to another. Their logits
are set to the lowest finite value instead, which takes them out of the
softmax (and out of the gradient) on every rank.
"""

import torch


def mask_vocab_padding(output_layer, vocab_size: int) -> None:
    """Hooks ``output_layer`` (megatron's vocab-parallel ``ColumnParallelLinear``) so that the logits
    of rows ``vocab_size`` and above are the lowest finite value; a rank without padding is left as is."""
    if output_layer.gather_output:
        rows, first = output_layer.output_size, 0
    else:
        rows = output_layer.output_size_per_partition
        first = output_layer.tp_group.rank() * rows
    real = max(0, min(rows, vocab_size - first))
    if real == rows:
        return

    def hide_padding(_module, _inputs, output):
        logits, bias = output
        padded = torch.arange(logits.shape[-1], device=logits.device) >= real
        return logits.masked_fill(padded, torch.finfo(logits.dtype).min), bias

    output_layer.register_forward_hook(hide_padding)
