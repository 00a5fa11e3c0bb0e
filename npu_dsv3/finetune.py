"""``torchrun --nproc-per-node N -m npu_dsv3.finetune <flags>``: full-parameter supervised fine-tuning.

MindSpeed-LLM's SFT flags (``--stage sft --is-instruction-dataset --prompt-type deepseek3
--variable-seq-lengths``, weights from ``--load``, fresh optimizer and iteration 0) over the
instruction data of ``npu-dsv3 data preprocess`` (``--data-path PREFIX`` reads
``PREFIX_packed_{input_ids,labels,attention_mask}_document``). Prompt tokens and padding carry
no loss. The training loop is ``npu_dsv3.pretrain``'s; this module gives it the data:

- ``--split`` cuts the samples into train / valid / test ranges; training reads its range in a
  fresh seeded permutation each epoch, evaluation reads the valid range in order.
- ``--reset-attention-mask``: every document of a packed sample attends only to itself and
  its positions restart; the micro-batch's samples go end to end into one sequence with
  ``cu_seqlens`` (megatron's THD packed-sequence format), so any micro-batch size works.
  Without it a micro-batch is [micro-batch size, length], each sample one causal sequence.
- ``--variable-seq-lengths``: each micro-batch is padded to its longest sample (rounded up to
  a multiple of the tensor-parallel size under sequence parallelism) instead of
  ``--seq-length``; the pipeline then sends each activation's shape ahead of it.
"""

import sys
from functools import partial

from npu_dsv3.pretrain import DataSource, dataset_microbatches, main as _main, nth_global_batch


def instruction_source(args) -> DataSource:
    """The training (and, with ``--eval-iters``, validation) micro-batches of ``--data-path``."""
    from npu_dsv3.data.dataset import InstructionDataset, SampleStream, parse_data_path, split_ranges
    from npu_dsv3.data.tokenizer import load_tokenizer

    prefixes, _ = parse_data_path(args.data_path)
    if len(prefixes) != 1:
        raise ValueError(f"--data-path {' '.join(args.data_path)}: fine-tuning reads one instruction dataset "
                         "prefix (blends are for pretraining)")
    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_name_or_path)
    if tokenizer.vocab_size > args.hf["vocab_size"]:
        raise ValueError(f"the tokenizer in {args.tokenizer_name_or_path} has {tokenizer.vocab_size} tokens, more "
                         f"than the model's vocabulary ({args.hf['vocab_size']}): not this model's tokenizer")
    data = InstructionDataset(prefixes[0], reset_attention_mask=args.reset_attention_mask)
    longest = int(data.sequence_lengths.max())
    if longest > args.seq_length:
        raise ValueError(f"{prefixes[0]} holds a sample of {longest} tokens, longer than --seq-length "
                         f"{args.seq_length}: raise --seq-length or preprocess with --seq-length {args.seq_length} "
                         "(longer samples are then dropped)")
    (train_begin, train_end), (valid_begin, valid_end), _ = split_ranges(args.split, len(data))
    if train_end == train_begin:
        raise ValueError(f"--split {args.split} leaves none of the {len(data)} samples of {prefixes[0]} to train on")
    train = SampleStream(data, train_begin, train_end, seed=args.seed)
    valid = None
    if args.eval_iters:
        if valid_end == valid_begin:
            raise ValueError(f"--eval-iters {args.eval_iters}: --split {args.split} gives the validation split none "
                             f"of the {len(data)} samples of {prefixes[0]}; give it a larger share or --eval-iters 0")
        valid = SampleStream(data, valid_begin, valid_end)
    collate = partial(_collate, args, tokenizer.pad)
    packed = args.reset_attention_mask
    # The shape megatron's schedule sizes fixed-length pipeline messages by.
    shape = (args.micro_batch_size * args.seq_length, 1) if packed else (args.seq_length, args.micro_batch_size)
    return DataSource(partial(dataset_microbatches, args, train, collate=collate),
                      None if valid is None else
                      partial(nth_global_batch, args, partial(dataset_microbatches, args, valid, collate=collate)),
                      *shape)


def _collate(args, pad_id: int, samples):
    from npu_dsv3.data.dataset import collate_instruction

    length = args.seq_length
    if args.variable_seq_lengths:
        multiple = args.tensor_model_parallel_size if args.sequence_parallel else 1
        longest = max(len(s["tokens"]) for s in samples)
        length = -(-longest // multiple) * multiple
    return collate_instruction(samples, length, pad_id, packed=args.reset_attention_mask)


def main(argv=None) -> int:
    return _main(argv, mode="finetune")


if __name__ == "__main__":
    sys.exit(main())
