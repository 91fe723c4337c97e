"""Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): diversity re-initialisation of upcycled experts.

For one expert holding a SwiGLU FFN with Fe intermediate units (our layout: gate w1 and up w3 are [Fe, D], a unit is
a row; down w2 is [D, Fe], a unit is a column; the paper's W_gate/W_up columns and W_down rows):

    1. perm ~ uniform permutation of [Fe], applied to w1 rows, w3 rows and w2 columns alike.
       One permutation for the three matrices relabels the units: the expert computes the same function.
    2. n = floor(r * Fe) units S ~ uniform subset of the permuted positions, |S| = n, and for each matrix W:
           mu, sigma = mean(W[S]), std(W[S])         scalars over the dropped slice only (not the whole matrix)
           W[S] <- N(mu, sigma^2)                    the rest of W is kept
       index_sets 'shared':     one S for w1, w2 and w3 (the paper: whole units are re-drawn)
       index_sets 'per_matrix': an independent S per matrix (the released code, conversions/drop_upcycling.py)

r = 0 is sparse upcycling (no permutation either, so the tensors are bit-identical copies); r = 1 re-draws the
whole FFN from its per-matrix statistics. Every random draw comes from a generator seeded by (seed, layer, expert,
purpose), so expert e's weights never depend on which other experts a process builds (a rank holding experts 4..7
gets exactly the tensors a single process gets for them).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

MATRICES = ("w1", "w2", "w3")
UNIT_AXIS = {"w1": 0, "w2": 1, "w3": 0}
"""Axis of the intermediate (unit) dimension of each expert matrix: w1/w3 [Fe, D] rows, w2 [D, Fe] columns."""
INDEX_SETS = ("shared", "per_matrix")


def generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, *keys), stable across processes and runs."""
    digest = hashlib.sha256("/".join(map(str, (seed, *keys))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def n_dropped(ratio: float, units: int) -> int:
    """floor(r * Fe), robust to r*Fe landing just below an integer in floating point (0.29 * 100 = 28.999...)."""
    return min(units, math.floor(ratio * units + 1e-9))


@dataclass
class DropPlan:
    """The random choices of one expert: its unit permutation and, per matrix, the dropped positions (after
    permutation, i.e. positions in the stored expert)."""

    perm: torch.Tensor
    dropped: dict[str, torch.Tensor]


def drop_plan(seed: int, layer: int, expert: int, units: int, ratio: float, index_sets: str) -> DropPlan:
    assert index_sets in INDEX_SETS, index_sets
    perm = torch.randperm(units, generator=generator(seed, "drop_perm", layer, expert))
    n = n_dropped(ratio, units)
    if index_sets == "shared":
        idx = torch.randperm(units, generator=generator(seed, "drop_idx", layer, expert))[:n]
        dropped = {w: idx for w in MATRICES}
    else:
        dropped = {w: torch.randperm(units, generator=generator(seed, "drop_idx", layer, expert, w))[:n]
                   for w in MATRICES}
    return DropPlan(perm, dropped)


def drop_upcycle_matrix(w: torch.Tensor, name: str, plan: DropPlan, seed: int, layer: int, expert: int) -> torch.Tensor:
    """One expert matrix (`name` in w1/w2/w3, a copy of its dense slice) -> permuted, partly re-initialised copy.
    Statistics and samples are computed in float32 and cast back to w's dtype."""
    axis = UNIT_AXIS[name]
    out = w.index_select(axis, plan.perm).float()
    idx = plan.dropped[name]
    if idx.numel():
        dropped = out.index_select(axis, idx)
        mu, sigma = dropped.mean(), (dropped.std() if dropped.numel() > 1 else dropped.new_zeros(()))
        fresh = torch.randn(dropped.shape, generator=generator(seed, "drop_init", layer, expert, name))
        out.index_copy_(axis, idx, fresh * sigma + mu)
    return out.to(w.dtype)
