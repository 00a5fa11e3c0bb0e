"""Record handlers, by their MindSpeed-LLM names: a raw record -> token ids per output key.

``parse`` checks one record and raises :class:`Malformed` with a short reason (counted per
reason by the caller, never silently dropped); ``encode`` tokenizes a batch of parsed
records in one tokenizer call, which is where the time goes.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

from npu_dsv3.data.chat_template import ASSISTANT, SYSTEM, USER, Message, check_conversation, render
from npu_dsv3.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of a token the loss skips (prompt, padding): torch's cross-entropy default
INSTRUCTION_KEYS = ("input_ids", "labels", "attention_mask")


class Malformed(Exception):
    """A record that cannot become a sample; ``str(e)`` is the reason it is counted under."""


def _text(record: dict, key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise Malformed(f"missing key {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise Malformed(f"{key!r} is {type(value).__name__}, not a string")
    return value


class GeneralPretrainHandler:
    """Plain text: one document per record and ``--json-keys`` entry, ``{prefix}_{key}_document``."""

    instruction = False

    def __init__(self, json_keys: Sequence[str], append_eod: bool, map_keys: Optional[dict] = None):
        if map_keys:
            raise ValueError("--map-keys is for the instruction handlers; name the text fields with --json-keys")
        self.keys = tuple(json_keys)
        self.append_eod = append_eod

    def output_name(self, key: str) -> str:
        return f"{key}_document"

    def parse(self, record: dict) -> Dict[str, str]:
        texts = {key: _text(record, key) for key in self.keys}
        for key, text in texts.items():
            if not text.strip():
                raise Malformed(f"{key!r} is empty")
        return texts

    def encode(self, parsed: List[Dict[str, str]], tokenizer: Tokenizer) -> List[object]:
        # The model's tokenizer adds its own specials (DeepSeek-V3: bos), as at inference.
        ids = {key: tokenizer.encode([p[key] for p in parsed], add_special_tokens=True) for key in self.keys}
        eod = [tokenizer.eod] if self.append_eod else []
        out: List[object] = []
        for i in range(len(parsed)):
            bad = [key for key in self.keys if ids[key][i] is None]
            out.append(Malformed(f"{bad[0]!r} is not token ids") if bad
                       else {key: ids[key][i] + eod for key in self.keys})
        return out


class _InstructionHandler:
    """A conversation -> input_ids, labels (prompt tokens = -100) and attention_mask (ones;
    packing rewrites it with document numbers), ``{prefix}_packed_{key}_document``."""

    instruction = True
    keys = INSTRUCTION_KEYS
    default_map: dict = {}

    def __init__(self, prompt_type: str, map_keys: Optional[dict] = None):
        self.prompt_type = prompt_type
        self.map = {**self.default_map, **(map_keys or {})}

    def output_name(self, key: str) -> str:
        return f"packed_{key}_document"

    def messages(self, record: dict) -> List[Message]:
        raise NotImplementedError

    def parse(self, record: dict) -> List[Message]:
        messages = self.messages(record)
        reason = check_conversation(messages)
        if reason:
            raise Malformed(f"bad conversation: {reason}")
        return messages

    def encode(self, parsed: List[List[Message]], tokenizer: Tokenizer) -> List[object]:
        if tokenizer.hf is None:
            raise ValueError("instruction handlers need an HF tokenizer (--tokenizer-type PretrainedFromHF)")
        rendered = [render(self.prompt_type, m, tokenizer.bos_token, tokenizer.eos_token) for m in parsed]
        flat = [text for segments in rendered for text, _ in segments]
        ids = iter(tokenizer.encode(flat, add_special_tokens=False))
        out: List[object] = []
        for segments in rendered:
            input_ids: List[int] = []
            labels: List[int] = []
            for _text, trainable in segments:
                piece = next(ids)
                input_ids += piece
                labels += piece if trainable else [IGNORE_INDEX] * len(piece)
            out.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
        return out


class AlpacaStyleInstructionHandler(_InstructionHandler):
    """``instruction`` (+ ``input`` on the next line) -> ``output``; optional ``system`` and
    ``history`` ([[question, answer], ...]). ``--map-keys`` renames: prompt, query, response,
    system, history."""

    default_map = {"prompt": "instruction", "query": "input", "response": "output",
                   "system": "system", "history": "history"}

    def messages(self, record: dict) -> List[Message]:
        m = self.map
        prompt = _text(record, m["prompt"])
        query = _text(record, m["query"], required=False)
        user = f"{prompt}\n{query}" if query else prompt
        messages: List[Message] = []
        system = _text(record, m["system"], required=False)
        if system:
            messages.append((SYSTEM, system))
        history = record.get(m["history"]) or []
        if not isinstance(history, list) or not all(
                isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
                for turn in history):
            raise Malformed(f"{m['history']!r} is not a list of [question, answer] pairs")
        for question, answer in history:
            messages += [(USER, question), (ASSISTANT, answer)]
        return messages + [(USER, user), (ASSISTANT, _text(record, m["response"]))]


class SharegptStyleInstructionHandler(_InstructionHandler):
    """``conversations``: [{"from": "human"|"gpt"|"system", "value": ...}, ...], optional
    ``system``. ``--map-keys`` renames ``messages``, ``system`` and, under ``tags``,
    role_tag, content_tag, user_tag, assistant_tag, system_tag (OpenAI-style data:
    ``{"messages": "messages", "tags": {"role_tag": "role", "content_tag": "content",
    "user_tag": "user", "assistant_tag": "assistant"}}``)."""

    default_map = {"messages": "conversations", "system": "system"}
    default_tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                    "assistant_tag": "gpt", "system_tag": "system"}

    def __init__(self, prompt_type: str, map_keys: Optional[dict] = None):
        super().__init__(prompt_type, map_keys)
        self.tags = {**self.default_tags, **self.map.get("tags", {})}
        self.roles = {self.tags["user_tag"]: USER, self.tags["assistant_tag"]: ASSISTANT,
                      self.tags["system_tag"]: SYSTEM}

    def messages(self, record: dict) -> List[Message]:
        key = self.map["messages"]
        turns = record.get(key)
        if turns is None:
            raise Malformed(f"missing key {key!r}")
        if not isinstance(turns, list):
            raise Malformed(f"{key!r} is {type(turns).__name__}, not a list")
        system = _text(record, self.map["system"], required=False)
        messages: List[Message] = [(SYSTEM, system)] if system else []
        for turn in turns:
            if not isinstance(turn, dict):
                raise Malformed(f"{key!r} holds a {type(turn).__name__}, not an object")
            role = turn.get(self.tags["role_tag"])
            if role not in self.roles:
                raise Malformed(f"unknown role {role!r}")
            messages.append((self.roles[role], _text(turn, self.tags["content_tag"])))
        return messages


HANDLERS = {cls.__name__: cls for cls in (GeneralPretrainHandler, AlpacaStyleInstructionHandler,
                                          SharegptStyleInstructionHandler)}


def parse_map_keys(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--map-keys is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--map-keys must be a JSON object, e.g. '{\"prompt\": \"question\"}'")
    return value


def make_handler(name: str, *, json_keys: Sequence[str], append_eod: bool, prompt_type: str,
                 map_keys: Optional[dict]):
    if name not in HANDLERS:
        raise ValueError(f"--handler-name must be one of {', '.join(HANDLERS)}, got {name!r}")
    if name == "GeneralPretrainHandler":
        return GeneralPretrainHandler(json_keys, append_eod, map_keys)
    if append_eod:
        raise ValueError("--append-eod is for pretraining: instruction samples already end with the "
                         "template's eos after each reply")
    return HANDLERS[name](prompt_type, map_keys)
