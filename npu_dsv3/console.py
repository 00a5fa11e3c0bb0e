"""Where the library's messages go when a command runs: the entry points call ``to_console()``.

Library code never prints. Notes (what a run adjusted or skipped) go to ``logging.getLogger(<module>)``
at WARNING, so a Python caller sees them on stderr through logging's last-resort handler or routes them
as it likes; the training loop's per-iteration lines go to the ``PROGRESS`` logger at INFO. On a command
line ``to_console()`` writes each message as its bare text plus a newline, flushed: notes to stderr,
progress lines to stdout, so the lines are byte for byte what a ``print`` gave.
"""

import logging
import sys

PROGRESS = "npu_dsv3.progress"


class _Stream(logging.Handler):
    """Writes to ``sys.<name>`` as it is at emit time (so a redirected or captured stream is honoured)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.stream_name = name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(record.getMessage() + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def to_console() -> None:
    """Notes of every npu_dsv3 logger to stderr, progress lines to stdout. Idempotent."""
    for name, stream, level in (("npu_dsv3", "stderr", logging.WARNING), (PROGRESS, "stdout", logging.INFO)):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Stream) for h in logger.handlers):
            logger.addHandler(_Stream(stream))
        logger.setLevel(level)
        logger.propagate = False  # a root handler megatron or a caller configured must not print them again
