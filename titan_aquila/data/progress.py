"""The progress line of `prepare`: input MB done / total, MB/s overall and per worker process, tokens, ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """One line every `every` seconds: input MB done / total, MB/s overall and per worker process, tokens, ETA.
    On a terminal the line is rewritten in place; in a pipe or a log each update is its own line."""

    def __init__(self, total_bytes: int, workers: int, every: float, stream=None):
        self.total, self.workers, self.every = max(total_bytes, 1), workers, every
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.perf_counter()
        self.open_line = False  # a terminal line waiting for its newline

    def update(self, done: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = done / 1e6 / elapsed
        eta = (self.total - done) / 1e6 / rate if rate > 0 else float("inf")
        line = (f"prepare: {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({100 * done / self.total:.0f}%)  "
                f"{rate:.2f} MB/s ({rate / self.workers:.2f} per process)  {tokens / 1e6:,.2f}M tokens  "
                f"eta {f'{eta:.0f}s' if eta != float('inf') else '-'}")
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()
        self.open_line = self.tty

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
