"""What a long run tells the person watching it, as log records on the `segsearch` logger.

Progress lines (a trial started, an epoch's score, tracking notes) are INFO records and warnings
WARNING records, never bare prints, so one setting chooses what shows: the CLI's `-q` (warnings
only) and `-v` (segsearch's DEBUG records, and Ray's and MLflow's own warnings and worker logs),
or a notebook's `quiet=`. `console()` shows them for one call, on a handler of the `segsearch`
logger alone: the root logger and its handlers stay as the user set them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LOGGER = "segsearch"
#: Line prefixes that make an echoed line a WARNING record (shown under -q, sent to stderr).
WARNING_PREFIXES = ("warning:", "error:")

logger = logging.getLogger(LOGGER)


def echo(line: str) -> None:
    """Log one progress line: a WARNING when it says so, else INFO.

    A module function, so the Tune callback that holds it pickles by reference.
    """
    level = logging.WARNING if line.startswith(WARNING_PREFIXES) else logging.INFO
    logger.log(level, line)


def level_for(verbosity: int) -> int:
    """-q (below 0): warnings only; 0: progress too; -v (above 0): segsearch's DEBUG records."""
    if verbosity < 0:
        return logging.WARNING
    return logging.INFO if verbosity == 0 else logging.DEBUG


def is_verbose() -> bool:
    """Whether -v is on: Ray's and MLflow's own warnings and the workers' logs are shown then."""
    return logger.isEnabledFor(logging.DEBUG)


class _ConsoleHandler(logging.Handler):
    """Records below WARNING to `info_stream` (stdout: progress is what the user watches; stderr
    when stdout carries JSON), WARNING and above to stderr. The streams are looked up on each
    record, so click's test runner and notebooks that swap sys.stdout see the lines."""

    def __init__(self, info_stream: str) -> None:
        super().__init__()
        self.info_stream = info_stream

    def emit(self, record: logging.LogRecord) -> None:
        name = "stderr" if record.levelno >= logging.WARNING else self.info_stream
        stream: TextIO = getattr(sys, name)
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def console(verbosity: int = 0, *, info_stream: str = "stdout") -> Iterator[None]:
    """Show segsearch's records of `verbosity` for the block; the logger is restored after.

    Inside another console() (the CLI calling the Python API) the outer one stands.
    """
    if any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        yield
        return
    handler = _ConsoleHandler(info_stream)
    saved = (logger.level, logger.propagate)
    logger.setLevel(level_for(verbosity))
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
