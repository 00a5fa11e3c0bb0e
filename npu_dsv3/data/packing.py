"""Packing instruction samples into sequences of exactly ``--seq-length`` tokens.

Best-fit decreasing: samples longest first, each into the open sequence with the least room
that still fits it; a sequence's samples keep their dataset order. It depends only on the
lengths, so the packs are the same for any ``--workers``. In a packed sequence the
attention_mask row numbers the samples (1, 2, ...; 0 = padding): training restarts
positions and attention where the number changes (``--reset-attention-mask``).
"""

from __future__ import annotations

import bisect
from typing import List, Sequence

import numpy


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Sample indices per pack; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: List[List[int]] = []
    room: List[tuple] = []  # sorted (free tokens, pack index)
    for i in order:
        slot = bisect.bisect_left(room, (lengths[i], -1))
        if slot == len(room):
            packs.append([i])
            free, p = capacity - lengths[i], len(packs) - 1
        else:
            free, p = room.pop(slot)
            packs[p].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, p))
    return [sorted(p) for p in packs]


def pack_sequence(samples: Sequence[dict], seq_length: int, pad_id: int, ignore_index: int) -> dict:
    """One pack: the samples' input_ids and labels end to end, padded to ``seq_length``
    (pad id, label ignored, attention_mask 0), attention_mask = sample number from 1."""
    pad = seq_length - sum(len(s["input_ids"]) for s in samples)
    doc = numpy.concatenate([numpy.full(len(s["input_ids"]), n + 1) for n, s in enumerate(samples)]
                            + [numpy.zeros(pad, dtype=numpy.int64)])
    return {
        "input_ids": numpy.concatenate([s["input_ids"] for s in samples] + [numpy.full(pad, pad_id)]),
        "labels": numpy.concatenate([s["labels"] for s in samples] + [numpy.full(pad, ignore_index)]),
        "attention_mask": doc,
    }
