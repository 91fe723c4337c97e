"""Symmetry breaking that keeps width growth exact: unequal outgoing shares and learnable zero padding.

Why (docs/growth.md): copies of a unit with equal incoming weights and equal 1/c outgoing shares receive equal
gradients at every step, so they stay equal forever (a 128 -> 256 FPI model keeps a rank-128 embedding), and the
zero padding of `exact` (zero producers, zero consumers, zero gamma) is a fixed point of gradient descent.

Unequal split (growth.split_spread = s, 0 <= s < 1; s = 0 is the equal 1/c split). A consumer matrix W [out, in]
reads a duplicated unit j through its copies i in g^-1(j). Instead of W'[o, i] = W[o, j] / c_j every element gets
its own share

    W'[o, i] = alpha[o, i] * W[o, j],   alpha[o, i] = u[o, i] / sum_{i' in g^-1(j)} u[o, i'],   u ~ U(1 - s, 1 + s)

so sum_{i in g^-1(j)} alpha[o, i] = 1 for every row o. The copies carry equal values (x'_i = x_j), hence
sum_i W'[o, i] x'_i = sum_j W[o, j] x_j: the output is unchanged (to float rounding). The shares differ per row,
so the gradient reaching copy i, dL/dx'_i = sum_o alpha[o, i] W[o, j] dL/dy_o, is a different vector (not a
rescaled one) for each copy: even Adam, which is blind to a per-parameter constant gradient scale, moves the copies
apart. (One scalar share per copy would not do: the copies' gradients would be proportional, Adam's updates equal.)
A unit with one copy gets alpha = u / u = 1 exactly. Tied embeddings: the embedding is a producer (copied
columns), so the output side of the split is carried by the final norm, gamma'_i = alpha_i * gamma_j with one
share per copy (a vector), which keeps logits = E' (x^' gamma') = E (x^ gamma) exact.

Learnable padding (`exact`, the r = D - k d padded residual dimensions): producers still write zeros there (the
stream stays x' = [x, ..., x, 0], so the model is exact), but every consumer column of a padded dimension is drawn
from N(0, std(W)^2) (std of the source matrix, so the new inputs are on the trained weights' scale) and the padded
gamma is the mean of the unit gammas. The padded inputs are 0, so these values change nothing at step 0, but
dL/dx'_pad = gamma_pad / rms * W'[:, pad]^T dL/dy is non-zero and the producer rows of the padding start to learn.

Every draw comes from a generator seeded by (growth.seed, purpose, tensor name), so a rerun is bit-identical.
"""

from __future__ import annotations

import zlib

import torch

from titan_aquila.growth.maps import UnitMap


def generator(seed: int, purpose: str, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{purpose}:{name}".encode()))


def draw_device(w: torch.Tensor) -> torch.device:
    """Where a random draw for w is made: meta for a meta w, else the CPU (the per-name CPU generators)."""
    return w.device if w.is_meta else torch.device("cpu")


def _along(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def split_(w: torch.Tensor, g: UnitMap, dim: int, spread: float, gen: torch.Generator | None) -> torch.Tensor:
    """In place: w (already gathered, w[..., i, ...] = W[..., g(i), ...] along `dim`) times the shares alpha of
    the module docstring (independent per element), or times 1/c when spread = 0; zero on padding."""
    if spread == 0 or gen is None:
        factor = g.inv_mult
        return w if bool((factor == 1).all()) else w.mul_(_along(factor.to(w.dtype), w.dim(), dim))
    if bool((g.mult[g.idx >= 0] <= 1).all()) and bool((g.idx >= 0).all()):
        return w  # no unit is duplicated: every share is exactly 1
    wt = w.movedim(dim, -1)  # a view: the in-place multiply below writes into w
    # A meta w (a shape-only pass of growth/stream.py, for a layer it is not computing) draws on meta: no values and
    # no time, where a real draw per layer per pass made streaming quadratic in depth. The per-name generator makes
    # the real draw the same whatever came before.
    u = torch.rand(wt.shape, generator=gen, dtype=torch.float32, device=draw_device(w))
    u.mul_(2 * spread).add_(1 - spread).mul_(g.live.to(u.dtype))
    n_src = int(g.src.max()) + 1
    sums = torch.zeros(*wt.shape[:-1], n_src, dtype=u.dtype, device=u.device).index_add_(-1, g.src, u)
    u.div_(sums.index_select(-1, g.src).clamp_(min=torch.finfo(u.dtype).tiny))
    wt.mul_(u.to(w.dtype))
    return w


def init_padding_columns_(w: torch.Tensor, source: torch.Tensor, g: UnitMap, gen: torch.Generator | None
                          ) -> torch.Tensor:
    """In place: the columns of w [out, D'] that read padded dimensions ~ N(0, std(source)^2) (no-op without
    padding or without a generator, i.e. split_spread = 0 keeps the old all-zero padding)."""
    pad = g.idx < 0
    if gen is None or not bool(pad.any()):
        return w
    # std as a 0-d tensor, not a Python float: streamed growth (growth/stream.py) first runs this on shapes only
    std = source.float().std()
    cols = torch.randn(w.shape[0], int(pad.sum()), generator=gen, dtype=torch.float32, device=draw_device(w)) * std
    w[:, pad] = cols.to(w.dtype)
    return w


def fill_padding_gamma_(gamma: torch.Tensor, g: UnitMap, on: bool) -> torch.Tensor:
    """In place: gamma on padded dimensions = the mean of the unit gammas (non-zero, so gradients reach them)."""
    pad = g.idx < 0
    if on and bool(pad.any()):
        gamma[pad] = gamma[~pad].mean()
    return gamma
