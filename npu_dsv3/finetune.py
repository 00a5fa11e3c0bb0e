"""``torchrun --nproc-per-node N -m npu_dsv3.finetune <flags>``: full-parameter supervised fine-tuning.

MindSpeed-LLM's SFT flags (``--stage sft --is-instruction-dataset --prompt-type deepseek3
--variable-seq-lengths``, weights from ``--load``, fresh optimizer and iteration 0) over the
instruction data of ``npu-dsv3 data preprocess`` (``--data-path PREFIX`` reads
``PREFIX_packed_{input_ids,labels,attention_mask}_document``). Prompt tokens and padding carry
no loss. The training loop is ``npu_dsv3.pretrain``'s (``npu_dsv3.training.loop``); the data,
with ``--split``, ``--reset-attention-mask`` and ``--variable-seq-lengths``, is
``npu_dsv3.training.data.instruction_source``.
"""

import sys

from npu_dsv3.pretrain import main as _main


def main(argv=None) -> int:
    return _main(argv, mode="finetune")


if __name__ == "__main__":
    sys.exit(main())
