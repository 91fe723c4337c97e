"""The project's one logger: `from titan_aquila.logging import logger`, then `logger.info(...)` / `.warning(...)`.

Records go through the standard `logging` module under the name "titan_aquila", with two handlers installed on
first import (so library code, scripts and `train.py` print the same way without any set-up call):

    INFO            stdout, the message alone        `step 5  loss 9.1234 ...` (tools parse these lines)
    WARNING         stderr, "warning: <message>"
    ERROR and up    stderr, "error: <message>"       (`titan_aquila.errors` reports every UserError this way)

Under torchrun only global rank 0 prints (RANK from the environment, read at each record, so it also holds in
processes whose environment is set after import): every rank runs the same code and would repeat each line.
Set TITAN_AQUILA_LOG_LEVEL=DEBUG|INFO|WARNING|ERROR to change the level.
"""

from __future__ import annotations

import logging as _logging
import os
import sys

logger = _logging.getLogger("titan_aquila")

PREFIX = {_logging.WARNING: "warning: ", _logging.ERROR: "error: ", _logging.CRITICAL: "error: "}


class RankZeroFilter(_logging.Filter):
    """Let a record through on global rank 0 only."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


class _Formatter(_logging.Formatter):
    def format(self, record: _logging.LogRecord) -> str:
        return PREFIX.get(record.levelno, "") + record.getMessage()


class _Stream(_logging.StreamHandler):
    """A handler that looks its stream up at every record: pytest's capsys and `contextlib.redirect_stdout`
    replace sys.stdout after import, and output must follow them."""

    def __init__(self, name: str, levels: tuple[int, int]):
        super().__init__()
        self.name_, self.lo, self.hi = name, *levels

    @property
    def stream(self):
        return getattr(sys, self.name_)

    @stream.setter
    def stream(self, _value) -> None:
        """Ignored: StreamHandler.__init__ assigns a stream, but the live sys stream is always the one used."""

    def emit(self, record: _logging.LogRecord) -> None:
        if self.lo <= record.levelno < self.hi:
            super().emit(record)
            self.flush()


def init_logger() -> _logging.Logger:
    """Install the handlers once (idempotent); returns the logger."""
    if getattr(logger, "_titan_aquila_ready", False):
        return logger
    logger.setLevel(os.environ.get("TITAN_AQUILA_LOG_LEVEL", "INFO").upper())
    logger.propagate = False  # a root handler someone else installed must not print every line a second time
    for name, levels in (("stdout", (0, _logging.WARNING)), ("stderr", (_logging.WARNING, 100))):
        handler = _Stream(name, levels)
        handler.setFormatter(_Formatter())
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
    logger._titan_aquila_ready = True
    return logger


init_logger()
