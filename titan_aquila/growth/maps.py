"""Index maps of Scale-Up growth: which source unit/layer each target one copies (formulas below).

Width (all "left to right", AquilaMoE §2.2.1; deterministic, so an integer ratio copies every unit exactly k times):
    hidden   g(i) = i mod d                 i < D           multiplicity c_j = |g^-1(j)|
             exact (zero-pad) variant:  g(i) = i mod d for i < k*d (k = D // d), padding (-1) for the r = D - k*d rest
    FFN      h(f) = f mod F                 f < F'          multiplicity e_j
    q heads  pi(t) = (t // r')*r + (t mod r') mod r          r = H/G, r' = H'/G (stays inside KV group t // r')
Depth:
    stack        src(l) = l mod L1
    interpolate  src(l) = (l * L1) // L2        (AquilaMoE Eq. 3, corrected; integer arithmetic)
    zero         LLaMA-Pro: n = L2 - L1 inserted blocks; block j (j < n) is a copy of source layer
                 e_j = ceil((j+1) * L1 / n) - 1 inserted right after it, with wo and w2 zeroed (identity block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UnitMap:
    """A map target unit -> source unit (-1 = padding, a new unit that must stay zero on the residual stream)."""

    idx: torch.Tensor
    """[N'] int64 source index per target unit (-1 = padding)."""
    mult: torch.Tensor
    """[N'] float64: multiplicity c_{g(i)} of the unit's source (0 for padding)."""

    @property
    def src(self) -> torch.Tensor:
        return self.idx.clamp(min=0)

    @property
    def live(self) -> torch.Tensor:
        return (self.idx >= 0).to(torch.float64)

    @property
    def inv_mult(self) -> torch.Tensor:
        """1 / multiplicity (0 for padding): what consumers multiply their columns by."""
        return torch.where(self.idx >= 0, 1.0 / self.mult.clamp(min=1), torch.zeros_like(self.mult))

    def expand(self, block: int) -> "UnitMap":
        """The same map on blocks of `block` consecutive rows (a head of head_dim rows per head)."""
        a = torch.arange(block)
        idx = torch.where(self.idx[:, None] >= 0, self.idx[:, None] * block + a, -1).reshape(-1)
        return UnitMap(idx, self.mult.repeat_interleave(block))


def _with_mult(idx: torch.Tensor, n_src: int) -> UnitMap:
    counts = torch.bincount(idx[idx >= 0], minlength=n_src).to(torch.float64)
    mult = torch.where(idx >= 0, counts[idx.clamp(min=0)], torch.zeros(idx.shape, dtype=torch.float64))
    return UnitMap(idx, mult)


def cyclic_map(n_src: int, n_dst: int) -> UnitMap:
    """g(i) = i mod n_src for i < n_dst."""
    return _with_mult(torch.arange(n_dst) % n_src, n_src)


def padded_map(n_src: int, n_dst: int) -> UnitMap:
    """Exact variant: k = n_dst // n_src whole copies, then n_dst - k*n_src padding units (-1)."""
    k = n_dst // n_src
    idx = torch.cat([torch.arange(k * n_src) % n_src, torch.full((n_dst - k * n_src,), -1, dtype=torch.long)])
    return _with_mult(idx, n_src)


def head_map(n_heads: int, n_heads_dst: int, n_kv_heads: int) -> UnitMap:
    """pi(t) = (t // r')*r + (t mod r') mod r: query heads grow inside their KV group (group-major order)."""
    r, r2 = n_heads // n_kv_heads, n_heads_dst // n_kv_heads
    t = torch.arange(n_heads_dst)
    return _with_mult((t // r2) * r + (t % r2) % r, n_heads)


def new_heads(n_heads: int, n_heads_dst: int, n_kv_heads: int) -> torch.Tensor:
    """[H'] bool: query heads that are not the first copy of a source head (t mod r' >= r)."""
    r, r2 = n_heads // n_kv_heads, n_heads_dst // n_kv_heads
    return torch.arange(n_heads_dst) % r2 >= r


# ---- depth ----------------------------------------------------------------------------------------------------
def stack_map(L1: int, L2: int) -> list[int]:
    return [l % L1 for l in range(L2)]


def interpolate_map(L1: int, L2: int) -> list[int]:
    return [(l * L1) // L2 for l in range(L2)]


def zero_map(L1: int, L2: int) -> list[tuple[int, bool]]:
    """[(source layer, is_inserted_identity)] for LLaMA-Pro block expansion (L1 = 32, L2 = 40: one identity copy
    after every 4th layer; 30 -> 36: after layers 4, 9, ..., 29)."""
    n = L2 - L1
    after: dict[int, int] = {}
    for j in range(n):
        e = -(-(j + 1) * L1 // n) - 1
        after[e] = after.get(e, 0) + 1
    out: list[tuple[int, bool]] = []
    for l in range(L1):
        out.append((l, False))
        out += [(l, True)] * after.get(l, 0)
    return out
