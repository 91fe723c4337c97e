"""Streaming growth: the registered transforms, evaluated one destination layer at a time from the source tensors
that layer needs, read from the DCP checkpoint by key. No process holds the whole source or the whole result.

The transforms (width.py, depth.py, upcycle.py) take and return whole state dicts; this module runs them unchanged
on state dicts whose tensors are mostly on the `meta` device (shapes only: no memory, no arithmetic):

1. Dependencies, once: the chain runs on an all-meta source under a dispatch mode that records, for every tensor
   it makes, the set of source names it was computed from (the union over each op's inputs; an in-place op adds
   to its target). A destination's set is its tensor's; a `LazyExperts` value's is that of the tensors its expert
   maker captured (no expert is built to find it).
2. Values, a group at a time: a group is one destination layer `layers.{l}.*` (or the non-layer tensors). The
   chain runs again with the group's source tensors real and every other one meta, under a mode in which any op
   with a meta input computes on meta. Every destination of the group depends only on real tensors, so its value
   is exactly what `apply_growth` on the full source gives; the rest of the chain costs shape arithmetic only.

Random draws made by a transform (router init, noise) use per-name generators, so they are the same in every
pass. Peak memory: the source tensors of about one layer, the chain's intermediates for that layer, and one
destination layer (expert stacks stay lazy: the loader builds only a rank's experts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from titan_aquila.checkpoint.deferred import Deferred
from titan_aquila.checkpoint.storage import model_tensor_specs, read_model_state_dict
from titan_aquila.growth import GrowthOptions, GrowthPlan, LazyExperts, apply_growth, materialize

_SOURCES = "_growth_sources"
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
              torch.ops.aten._index_put_impl_.default}
_LAYER = re.compile(r"^layers\.(\d+)\.")


class _MetaWins(TorchDispatchMode):
    """Any op with a meta input runs on meta (real inputs are moved to meta first); with `track`, every output
    (and an in-place op's target) records the union of its inputs' source-name sets."""

    def __init__(self, track: bool = False):
        super().__init__()
        self.track = track

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in inputs) and not all(t.is_meta for t in inputs):
            if func in _INDEX_OPS and isinstance(args[1], (list, tuple)):
                # A real boolean mask indexing a meta tensor: its positions (as aten expands masks), so that the
                # meta kernel needs no nonzero() of a value it does not have.
                idx = [p for i in args[1] for p in (i.nonzero(as_tuple=True) if isinstance(i, torch.Tensor)
                                                     and i.dtype == torch.bool and not i.is_meta else (i,))]
                args = (args[0], idx, *args[2:])
            to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) and not x.is_meta else x  # noqa: E731
            args, kwargs = tree_map(to_meta, args), tree_map(to_meta, kwargs)
        out = func(*args, **kwargs)
        if self.track:
            sources = frozenset().union(*(getattr(t, _SOURCES, frozenset()) for t in inputs))
            if sources:
                for t in [*tree_leaves(out), *(inputs[:1] if func._schema.name.endswith("_") else [])]:
                    if isinstance(t, torch.Tensor):
                        setattr(t, _SOURCES, getattr(t, _SOURCES, frozenset()) | sources)
        return out


def _captured_sources(make) -> frozenset[str]:
    """The source names of the tensors an expert maker captured (closure cells, default arguments; through dicts,
    lists and tuples): every expert is built from these, so no expert has to be built to find them."""
    seen: set[str] = set()

    def visit(x, depth: int) -> None:
        if isinstance(x, torch.Tensor):
            seen.update(getattr(x, _SOURCES, ()))
        elif depth < 4 and isinstance(x, dict):
            for v in x.values():
                visit(v, depth + 1)
        elif depth < 4 and isinstance(x, (list, tuple)):
            for v in x:
                visit(v, depth + 1)
        elif depth < 4 and callable(x) and hasattr(x, "__code__"):
            visit_function(x, depth + 1)

    def visit_function(fn, depth: int) -> None:
        for cell in fn.__closure__ or ():
            visit(cell.cell_contents, depth)
        visit(fn.__defaults__ or (), depth)
        visit(list((fn.__kwdefaults__ or {}).values()), depth)

    visit_function(make, 0)
    return frozenset(seen)


def _group(name: str) -> int:
    """Destination layer index of a state-dict name; -1 for embeddings, final norm and output."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


class GrowthStream:
    """`apply_growth(plan, read(src_dir), opts)`, produced one destination layer at a time."""

    def __init__(self, plan: GrowthPlan, src_dir: Path, opts: GrowthOptions):
        self.plan, self.src_dir, self.opts = plan, Path(src_dir), opts
        self.specs = model_tensor_specs(self.src_dir)
        self.needs = self._dependencies()
        self.names = sorted(self.needs, key=lambda k: (_group(k), k))

    def _dependencies(self) -> dict[str, frozenset[str]]:
        src = {}
        for k, spec in self.specs.items():
            src[k] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            setattr(src[k], _SOURCES, frozenset([k]))
        with _MetaWins(track=True):
            out = apply_growth(self.plan, src, self.opts)
        self.specs_out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in out.items()}
        """destination name -> a meta tensor of its shape and dtype"""
        return {k: (_captured_sources(v.make) if isinstance(v, LazyExperts) else getattr(v, _SOURCES, frozenset()))
                for k, v in out.items()}

    def compute(self, g: int, cache: dict | None = None) -> dict:
        """{destination name: Tensor or LazyExperts} of group g (a destination layer, or -1: embeddings, final
        norm, output), computed from real source tensors only. `cache` (name -> source tensor) is reused and
        left holding exactly this group's source tensors."""
        cache = {} if cache is None else cache
        keys = [k for k in self.names if _group(k) == g]
        need = set().union(*(self.needs[k] for k in keys))
        for k in [k for k in cache if k not in need]:  # keep what the previous group already read
            del cache[k]
        missing = sorted(need - set(cache))
        cache.update(read_model_state_dict(self.src_dir, keys=missing, check=False) if missing else {})
        src = {k: cache.get(k, torch.empty(s.shape, dtype=s.dtype, device="meta")) for k, s in self.specs.items()}
        with _MetaWins():
            out = apply_growth(self.plan, src, self.opts)
        values = {k: out[k] for k in keys}
        for k, v in values.items():
            assert isinstance(v, LazyExperts) or not v.is_meta, f"growth stream: {k} depends on unread tensors"
        return values

    def groups(self) -> Iterator[dict]:
        """`compute(g)` for each destination layer in turn (non-layer tensors first)."""
        cache: dict[str, torch.Tensor] = {}
        for g in sorted({_group(k) for k in self.names}):
            yield self.compute(g, cache)

    def deferred_state_dict(self) -> dict[str, Deferred]:
        """The grown state dict as `Deferred` values for a checkpoint write: a value computes its group when DCP
        first asks for it (DCP's serial writer asks in this dict's order, group by group, so each group is
        computed once; another order would only recompute) and materialises all its experts."""
        last: dict = {"group": None, "values": {}}
        cache: dict[str, torch.Tensor] = {}

        def make(name: str) -> torch.Tensor:
            if last["group"] != _group(name):
                last["values"] = {}  # drop the previous group before computing the next
                last["group"], last["values"] = _group(name), self.compute(_group(name), cache)
            return materialize(last["values"].pop(name)).contiguous()

        return {k: Deferred(self.specs_out[k], lambda k=k: make(k)) for k in self.names}
