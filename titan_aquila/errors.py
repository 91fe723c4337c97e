"""One exception type for user mistakes, the helpers that phrase them, and the one place that turns them into
`error: ...` + exit code 2."""

from __future__ import annotations

import difflib
from contextlib import contextmanager


class UserError(ValueError):
    """A mistake in the user's input (config, paths, shapes). Printed as one line, never as a traceback."""


def require(ok: bool, message: str) -> None:
    """Raise `UserError(message)` unless `ok`."""
    if not ok:
        raise UserError(message)


def closest(name: str, candidates) -> str | None:
    """The candidate closest to `name` (difflib ratio >= 0.6, case-insensitive), or None if nothing is close."""
    lowered = {str(c).lower(): c for c in candidates}
    match = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def did_you_mean(name: str, candidates, otherwise: str = "") -> str:
    """`"; did you mean 'x'?"` for the closest candidate, else `otherwise` (e.g. "; known flavors: a, b")."""
    close = closest(name, candidates)
    return f"; did you mean '{close}'?" if close is not None else otherwise


@contextmanager
def exit_on_user_error():
    """Wrap an entry point: a `UserError` prints `error: <message>` on stderr and exits with status 2."""
    from titan_aquila.logging import logger

    try:
        yield
    except UserError as e:
        logger.error(str(e))
        raise SystemExit(2) from None
