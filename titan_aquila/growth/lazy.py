"""`LazyExperts`: a stacked expert weight [E, ...] that builds expert e only when asked.

Upcycling makes E experts from one dense FFN. Materialising all of them on every rank would cost E times the
dense memory; with FSDP or expert parallelism a rank holds only a contiguous range of experts (dim 0), so the
checkpoint loader asks for exactly that range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LazyExperts:
    shape: tuple[int, ...]
    """Full shape [E, ...] of the stacked weight."""
    dtype: torch.dtype
    make: Callable[[int], torch.Tensor]
    """Expert index e -> its weight of shape shape[1:]."""

    def build(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.shape[0] if stop is None else stop
        return torch.stack([self.make(e) for e in range(start, stop)]) if stop > start else \
            torch.empty((0, *self.shape[1:]), dtype=self.dtype)


def materialize(value) -> torch.Tensor:
    """A plain tensor from a Tensor or a LazyExperts (all experts)."""
    return value.build() if isinstance(value, LazyExperts) else value
