"""Chat templates as (text, trainable) segments, so the prompt can be masked out of the loss.

``deepseek3`` is the chat template of DeepSeek-V3's ``tokenizer_config.json`` for system, user
and assistant turns::

    {bos}{system}<｜User｜>{q1}<｜Assistant｜>{a1}<｜end▁of▁sentence｜><｜User｜>{q2}<｜Assistant｜>...

Every segment boundary sits next to a special token, and an HF tokenizer splits special
tokens out before its model runs, so tokenizing the segments one by one gives exactly the
ids of tokenizing the rendered conversation (tests check this against the Jinja template).
The trainable segments are the assistant replies with their closing eos: the model learns to
answer and to stop, never to predict the prompt.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
Message = Tuple[str, str]  # (role, content)
Segment = Tuple[str, bool]  # (text, trainable)

PROMPT_TYPES = ("deepseek3",)


def check_conversation(messages: Sequence[Message]) -> str:
    """Why these messages are not a conversation to train on, or "" if they are.

    Optional system messages first, then user / assistant turns alternating, ending with
    an assistant reply (the loss needs something to learn), no empty turn.
    """
    n_system = next((i for i, (role, _) in enumerate(messages) if role != SYSTEM), len(messages))
    turns = messages[n_system:]
    if any(role == SYSTEM for role, _ in turns):
        return "system message after the first turn"
    if not turns:
        return "no user/assistant turns"
    for i, (role, content) in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            return f"turn {i} is {role!r}, expected {expected!r}"
        if not content:
            return f"turn {i} ({role}) is empty"
    if turns[-1][0] != ASSISTANT:
        return "last turn is not an assistant reply"
    return ""


def deepseek3_segments(messages: Sequence[Message], bos: str, eos: str) -> List[Segment]:
    """The DeepSeek-V3 rendering of a checked conversation."""
    # The official template keeps the last system message, placed right after bos.
    system = [content for role, content in messages if role == SYSTEM]
    segments: List[Segment] = [(bos + (system[-1] if system else ""), False)]
    for role, content in messages:
        if role == USER:
            segments.append((f"<｜User｜>{content}<｜Assistant｜>", False))
        elif role == ASSISTANT:
            segments.append((content + eos, True))
    return segments


def render(prompt_type: str, messages: Sequence[Message], bos: str, eos: str) -> List[Segment]:
    if prompt_type != "deepseek3":
        raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {prompt_type!r}")
    return deepseek3_segments(messages, bos, eos)
