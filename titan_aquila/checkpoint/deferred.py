"""Checkpoint writes that read each tensor only when DCP writes it, so the peak is one tensor, not the model.

A `Deferred` value stands for a tensor by its shape and dtype (a meta tensor) and a function that makes it.
DCP plans a save from shapes alone; `DeferredSavePlanner.resolve_data` calls the function when the file writer
asks for that tensor's bytes (DCP's serial writer asks one tensor at a time and drops it once written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.checkpoint import DefaultSavePlanner


@dataclass
class Deferred:
    meta: torch.Tensor
    """A meta tensor of the value's shape and dtype."""
    make: Callable[[], torch.Tensor]

    @property
    def shape(self):
        return self.meta.shape

    @property
    def dtype(self):
        return self.meta.dtype


class DeferredSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner over a state dict whose deferred entries are meta tensors; `makers[fqn]()` gives the
    real tensor when the writer needs it (checked against the planned shape and dtype)."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self.makers = makers

    def resolve_data(self, write_item):
        make = self.makers.get(write_item.index.fqn)
        if make is None:
            return super().resolve_data(write_item)
        t = make()
        want = write_item.tensor_data
        assert tuple(t.shape) == tuple(want.size) and t.dtype == want.properties.dtype, (write_item.index.fqn, t.shape)
        return t.detach().contiguous()


def split_deferred(sd: dict, prefix: str = "") -> tuple[dict, dict]:
    """(state dict with meta tensors in place of Deferred values, {prefix + name: make})."""
    plain, makers = {}, {}
    for k, v in sd.items():
        if isinstance(v, Deferred):
            plain[k], makers[prefix + k] = v.meta, v.make
        else:
            plain[k] = v
    return plain, makers
