"""Ctrl-C and SIGTERM: stop cleanly, never in the middle of a checkpoint commit, and exit 128 + signal number.

`install()` makes SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt) in the main thread. A save that is
interrupted is abandoned (its temp folder removed, checkpoint/manager.py); the renames that commit a finished save
run under `deferred_interrupts()`, which holds a signal back until they are done, so a checkpoint folder is always
either the previous one or the new one. The entry point then prints one line naming the last complete checkpoint
(`interrupted_line`) and exits 130 (SIGINT) or 143 (SIGTERM), as shells report a process killed by that signal.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

_state = {"defer": 0, "pending": None}


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGINT / SIGTERM handler; `exit_code` = 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    if _state["defer"]:
        _state["pending"] = signum  # raised when the deferred section ends
        return
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to `Interrupted` (main thread only, as Python runs signal handlers there)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred_interrupts():
    """Run the body to its end even if SIGINT / SIGTERM arrive; raise `Interrupted` right after it."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    if not _state["defer"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)


def exit_code(e: KeyboardInterrupt) -> int:
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def interrupted_line(e: KeyboardInterrupt, checkpoint_folder: str | Path | None) -> str:
    """'interrupted (SIGTERM); last complete checkpoint: <path>' (or that there is none)."""
    name = signal.Signals(e.signum).name if isinstance(e, Interrupted) else "SIGINT"
    if checkpoint_folder is None:
        return f"interrupted ({name}); checkpointing is off, nothing was saved"
    from titan_aquila.checkpoint.storage import latest_checkpoint

    latest = latest_checkpoint(checkpoint_folder)
    where = f"last complete checkpoint: {latest}" if latest else f"no complete checkpoint in {checkpoint_folder}"
    return f"interrupted ({name}); {where}"
