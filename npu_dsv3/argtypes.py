"""argparse value types and error lines shared by every entry point (``npu-dsv3`` and its subcommands,
pretrain / finetune), so one bad value reads the same everywhere: ``argument --flag: must be >= 1, got 0``;
the writable-directory check the entry points and the library's writers share; and the start-up error
(``ArgsError``) and refused-flag row (``Unsupported``) that ``npu_dsv3.arguments`` and the feature modules
(``npu_dsv3.features``) share."""

import argparse
import os
from dataclasses import dataclass
from typing import Optional


class ArgsError(ValueError):
    """A flag or combination of flags that cannot run; the message names the flags."""


@dataclass(frozen=True)
class Unsupported:
    """A ``FLAG_TABLE`` row: the flag is refused, for this reason."""

    reason: str


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, intervals)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def os_error_line(e: OSError, output: Optional[str]) -> str:
    """An OSError (permissions, a file in the way, a full disk) as one line naming the path: its own, else
    ``output``, what the command writes."""
    if e.filename is not None:
        return f"{e.strerror or e}: {e.filename}"
    text = str(e)
    return text if output is None or output in text else f"{text} (writing {output})"


def output_dir_problem(directory: str) -> Optional[str]:
    """Why files cannot be written under ``directory`` (made if missing), or None when they can."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):  # the first existing ancestor is where it would be made
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None
