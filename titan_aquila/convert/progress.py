"""Progress lines for conversions: `what: i/n tensors (file k/m), elapsed` at most every `every` seconds (and at
the end), so an import of a 300-tensor model prints a handful of lines, not 300."""

from __future__ import annotations

import time

from titan_aquila.logging import logger


class Progress:
    def __init__(self, what: str, total: int, unit: str = "tensors", every: float = 10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            logger.info(f"{self.what}: {self.done}/{self.total} {self.unit}{', ' + note if note else ''}, "
                     f"{now - self.t0:.1f}s")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0
