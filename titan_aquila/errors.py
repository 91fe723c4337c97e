"""One exception type for user mistakes, and the one place that turns it into `error: ...` + exit code 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(ValueError):
    """A mistake in the user's input (config, paths, shapes). Printed as one line, never as a traceback."""


@contextmanager
def exit_on_user_error():
    """Wrap an entry point: a `UserError` prints `error: <message>` on stderr and exits with status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
