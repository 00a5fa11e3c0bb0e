"""The tokenizers preprocessing and training share: an HF tokenizer from a local directory,
or megatron's NullTokenizer convention (text is space-separated token ids).

Both are wrapped in :class:`Tokenizer`.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence

TOKENIZER_TYPES = ("PretrainedFromHF", "NullTokenizer")


class Tokenizer:
    """``encode(texts, add_special_tokens)`` -> ids per text, plus the special ids."""

    def __init__(self, kind: str, name_or_path: Optional[str], vocab_size: Optional[int]):
        self.kind = kind
        self.name_or_path = name_or_path
        if kind == "PretrainedFromHF":
            self.hf = _load_hf(name_or_path)
            self.vocab_size = len(self.hf)
            self.eod = self.hf.eos_token_id
            if self.eod is None:
                raise ValueError(f"the tokenizer in {name_or_path} has no eos_token: it is needed to end documents")
            # DeepSeek-V3 pads with its eos token; megatron masks the loss on pad labels.
            self.pad = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eod
            self.bos_token = self.hf.bos_token or ""
            self.eos_token = self.hf.eos_token
        elif kind == "NullTokenizer":
            if not vocab_size or vocab_size < 1:
                raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (a positive number)")
            self.hf = None
            # Megatron's NullTokenizer: ids 0..vocab_size-1 are text, vocab_size is eod.
            self.vocab_size = vocab_size + 1
            self.eod = vocab_size
            self.pad = vocab_size
            self.bos_token = self.eos_token = None
        else:
            raise ValueError(f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {kind!r}")

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> List[Optional[List[int]]]:
        """Ids per text; None for a text this tokenizer cannot read (NullTokenizer: not ids)."""
        if self.hf is not None:
            return self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [_null_ids(text, self.eod) for text in texts]


def _null_ids(text: str, eod: int) -> Optional[List[int]]:
    try:
        ids = [int(token) for token in text.split()]
    except ValueError:
        return None
    return ids if all(0 <= i < eod for i in ids) else None


# The files an HF tokenizer's vocabulary is read from: a fast tokenizer's, sentencepiece's, BPE's, WordPiece's.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_hf(path: Optional[str]):
    if not path:
        raise ValueError("--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path (a local HF tokenizer "
                         "directory)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any(os.path.isfile(os.path.join(path, name)) for name in VOCABULARY_FILES):
        # transformers would fall back to a slow tokenizer and ask for sentencepiece instead
        raise FileNotFoundError(f"tokenizer directory {path} has none of {', '.join(VOCABULARY_FILES)}: give the "
                                "directory of the HF model's tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load an HF tokenizer from {path}: {e}") from e


@functools.lru_cache(maxsize=4)
def load_tokenizer(kind: str, name_or_path: Optional[str] = None, vocab_size: Optional[int] = None) -> Tokenizer:
    """Cached per process: each worker loads the tokenizer once, not once per chunk."""
    return Tokenizer(kind, name_or_path, vocab_size)
