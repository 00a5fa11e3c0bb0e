"""A small corpus written for this repository (generated sentences, no third-party text) and
a tokenizer trained on it that stands in for DeepSeek-V3's: byte-level BPE, the same special
tokens, bos added to plain text, pad = eos, and the system/user/assistant part of the
model's chat template. Tests, benchmarks and demos use it; nothing is downloaded.

Files: ``pretrain.jsonl`` (``text``), ``alpaca.jsonl`` (``instruction``/``input``/``output``,
some with ``system`` and ``history``), ``sharegpt.jsonl`` (``conversations``).
"""

from __future__ import annotations

import json
import os

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-V3's tokenizer_config.json chat_template, the system, user and assistant branches
# (tool calls left out): the oracle our segment rendering is tested against.
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}"
)


def path(name: str) -> str:
    """Absolute path of a bundled corpus file (``pretrain.jsonl``, ``alpaca.jsonl``, ``sharegpt.jsonl``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _texts():
    with open(path("pretrain.jsonl"), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
    for name in ("alpaca.jsonl", "sharegpt.jsonl"):
        with open(path(name), encoding="utf-8") as f:
            for line in f:
                yield line  # the raw JSON line: its words and punctuation are enough


def build_tokenizer(out_dir: str, vocab_size: int = 800) -> str:
    """Trains the stand-in tokenizer and saves it as an HF tokenizer directory; returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, USER, ASSISTANT]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                 additional_special_tokens=[USER, ASSISTANT])
    hf.chat_template = DEEPSEEK_V3_CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return out_dir
