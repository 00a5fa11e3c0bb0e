"""What the training loop reads: a ``DataSource`` of this data-parallel rank's micro-batches.

Pretraining reads mock tokens or GPTDataset splits of ``--data-path`` (``pretrain_source``);
fine-tuning reads the instruction data of ``npu-dsv3 data preprocess`` (``instruction_source``):

- ``--split`` cuts the samples into train / valid / test ranges; training reads its range in a
  fresh seeded permutation each epoch, evaluation reads the valid range in order.
- ``--reset-attention-mask``: every document of a packed sample attends only to itself and
  its positions restart; the micro-batch's samples go end to end into one sequence with
  ``cu_seqlens`` (megatron's THD packed-sequence format), so any micro-batch size works.
  Without it a micro-batch is [micro-batch size, length], each sample one causal sequence.
- ``--variable-seq-lengths``: each micro-batch is padded to its longest sample (rounded up to
  a multiple of the tensor-parallel size under sequence parallelism) instead of
  ``--seq-length``; the pipeline then sends each activation's shape ahead of it.

Every data-parallel rank reads its own slice of each global batch, in the same
order whatever the layout, so a run of any layout sees the data a single
process would see.
"""

from functools import partial
from typing import Callable, Dict, Iterator, NamedTuple, Optional

import torch

Batches = Iterator[Dict[str, torch.Tensor]]

# Validation batch j of --mock-data is drawn with seed offset VALIDATION_SEEDS + j, which no
# training iteration reaches (torch's CPU generator keeps a seed's low 32 bits only).
VALIDATION_SEEDS = 2 ** 31


class DataSource(NamedTuple):
    """What the training loop reads: ``train(n)``, this data-parallel rank's micro-batches of the
    global batch that starts after n consumed samples; ``valid(j)``, those of validation batch j
    (None: no evaluation); and the (sequence length, micro-batch size) megatron's schedule sizes
    pipeline messages by."""

    train: Callable[[int], Batches]
    valid: Optional[Callable[[int], Batches]]
    seq_length: int
    micro_batch_size: int


def mock_microbatches(args, iteration: int, validation: bool = False) -> Batches:
    """This data-parallel rank's micro-batches of iteration ``iteration``: the global batch is drawn
    from a generator seeded by (seed, iteration), so every layout trains on the same tokens."""
    from megatron.core import parallel_state

    stream = VALIDATION_SEEDS if validation else 0
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + stream + iteration)
    vocab = args.hf["vocab_size"]
    ids = torch.randint(0, vocab, (args.global_batch_size, args.seq_length + 1), generator=generator)
    per_rank = args.micro_batch_size * args.num_microbatches
    rank = parallel_state.get_data_parallel_rank()
    ids = ids[rank * per_rank:(rank + 1) * per_rank]
    positions = torch.arange(args.seq_length).expand(args.micro_batch_size, args.seq_length)
    for m in range(args.num_microbatches):
        chunk = ids[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]
        yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "position_ids": positions,
               "loss_mask": torch.ones(args.micro_batch_size, args.seq_length)}


def _mock_train(args, consumed_samples: int) -> Batches:
    # Synthetic tokens have no position in a corpus to keep: batch k of this --global-batch-size.
    return mock_microbatches(args, consumed_samples // args.global_batch_size)


def _stack(samples) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in
            ("tokens", "labels", "loss_mask", "position_ids")}


def dataset_microbatches(args, dataset, consumed_samples: int, collate=_stack) -> Batches:
    """The same slicing over a dataset (megatron's GPTDataset, or instruction samples): the global batch
    after ``consumed_samples`` is samples ``consumed_samples + i``, each micro-batch put together by
    ``collate``."""
    from megatron.core import parallel_state

    per_rank = args.micro_batch_size * args.num_microbatches
    first = consumed_samples + parallel_state.get_data_parallel_rank() * per_rank
    for m in range(args.num_microbatches):
        batch = collate([dataset[first + m * args.micro_batch_size + i] for i in range(args.micro_batch_size)])
        _check_vocabulary(args, batch, first + m * args.micro_batch_size)
        yield batch


def _check_vocabulary(args, batch: Dict[str, torch.Tensor], first: int) -> None:
    # An id past the vocabulary would index the embedding out of range, or (in its padding) give an
    # infinite loss that reads like a divergence.
    vocab = args.hf["vocab_size"]
    top = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
    if top >= vocab:
        raise ValueError(f"--data-path {' '.join(args.data_path)}: token id {top} (samples {first}.."
                         f"{first + args.micro_batch_size - 1}) is outside the model's vocabulary of {vocab}: the "
                         "data was tokenized with another tokenizer; preprocess it again with this model's")


def nth_global_batch(args, batches: Callable[[int], Batches], index: int) -> Batches:
    """Global batch ``index`` of a split read from its start (validation batches)."""
    return batches(index * args.global_batch_size)


def _documents_apart(args) -> bool:
    # MindSpeed-LLM's --reset-position-ids, like megatron's --reset-attention-mask, keeps the documents
    # of a sequence apart: each attends only to itself, its positions restarting at 0.
    return not args.mock_data and (args.reset_position_ids or args.reset_attention_mask)


def _collate_documents(samples) -> Dict[str, torch.Tensor]:
    """GPTDataset samples (positions restarting after each EOD) as one packed THD sequence whose
    ``cu_seqlens`` mark every document of every sample."""
    from npu_dsv3.data.dataset import collate_instruction

    tensors = []
    for sample in samples:
        sample = {k: torch.as_tensor(sample[k]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        starts = torch.nonzero(sample["position_ids"] == 0).flatten()
        sample["cu_seqlens"] = torch.cat([starts, torch.tensor([len(sample["tokens"])])]).int()
        tensors.append(sample)
    return collate_instruction(tensors, len(tensors[0]["tokens"]), pad_id=0, packed=True)


def pretrain_source(args, train_samples: Optional[int] = None) -> DataSource:
    """Mock tokens, or the train / valid splits of --data-path through GPTDataset (``train_samples``
    training samples; default --train-iters x --global-batch-size)."""
    if args.mock_data:
        valid = partial(mock_microbatches, args, validation=True) if args.eval_iters else None
        return DataSource(partial(_mock_train, args), valid, args.seq_length, args.micro_batch_size)
    train, valid = pretrain_datasets(args, train_samples)
    if _documents_apart(args):
        batches = partial(dataset_microbatches, args, collate=_collate_documents)
        shape = (args.micro_batch_size * args.seq_length, 1)
    else:
        batches, shape = partial(dataset_microbatches, args), (args.seq_length, args.micro_batch_size)
    return DataSource(partial(batches, train),
                      None if valid is None else partial(nth_global_batch, args, partial(batches, valid)), *shape)


def data_source(args, train_samples: Optional[int] = None) -> DataSource:
    """The data of the run ``args`` describes: instruction samples when fine-tuning with
    --is-instruction-dataset, otherwise ``pretrain_source``."""
    # Fine-tuning without --is-instruction-dataset continues on pretraining data, as in megatron.
    if args.mode == "finetune" and args.is_instruction_dataset:
        return instruction_source(args)  # its samples repeat in epochs: any count is there
    return pretrain_source(args, train_samples)


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
    collate = partial(_collate_instruction, args, tokenizer.pad)
    packed = args.reset_attention_mask
    # The shape megatron's schedule sizes fixed-length pipeline messages by.
    shape = (args.micro_batch_size * args.seq_length, 1) if packed else (args.seq_length, args.micro_batch_size)
    return DataSource(partial(dataset_microbatches, args, train, collate=collate),
                      None if valid is None else
                      partial(nth_global_batch, args, partial(dataset_microbatches, args, valid, collate=collate)),
                      *shape)


def _collate_instruction(args, pad_id: int, samples):
    from npu_dsv3.data.dataset import collate_instruction

    length = args.seq_length
    if args.variable_seq_lengths:
        multiple = args.tensor_model_parallel_size if args.sequence_parallel else 1
        longest = max(len(s["tokens"]) for s in samples)
        length = -(-longest // multiple) * multiple
    return collate_instruction(samples, length, pad_id, packed=args.reset_attention_mask)


def _validation_batch_count(args) -> int:
    """Validation batches a run reads: ``--eval-iters`` at each evaluation, every one different."""
    return -(-args.train_iters // args.eval_interval) * args.eval_iters


def pretrain_datasets(args, train_samples: Optional[int] = None):
    """(train, valid) GPTDatasets; valid is None without evaluation."""
    from npu_dsv3.data.dataset import build_pretrain_datasets
    from npu_dsv3.data.tokenizer import load_tokenizer

    train_samples = train_samples or args.train_iters * args.global_batch_size
    sizes = [train_samples, _validation_batch_count(args) * args.global_batch_size, 0]
    train, valid, _ = build_pretrain_datasets(
        args.data_path, seq_length=args.seq_length, sizes=sizes, seed=args.seed, split=args.split,
        tokenizer=load_tokenizer(args.tokenizer_type, args.tokenizer_name_or_path, vocab_size=args.hf["vocab_size"]),
        reset_position_ids=_documents_apart(args), reset_attention_mask=args.reset_attention_mask,
        create_attention_mask=False, path_to_cache=args.data_cache_path)
    return train, valid
