"""Initial weights that depend only on (seed, parameter name, shape), never on who builds them or how much of them.

Every parameter is cut along dim 0 into blocks of R rows, R = max(1, 2^20 // prod(shape[1:])) (about 4 MiB of
float32 per block; R depends only on the shape). Block b is drawn from its own generator:

    W[b*R : (b+1)*R] ~ N(0, std^2)    with generator seed = sha256("seed/name/b")[:8]

so a process that needs rows [a, z) of W (an FSDP shard, an expert range) draws only the blocks that overlap them,
and gets bit for bit the values a single process that builds the whole model gets. Column shards (TP Shard(1))
draw their rows in full and keep their columns. Peak extra memory: the local rows plus one block.

The std of each tensor (GPT-2 style, as `Transformer.init_weights` documents):
    residual writers (attention.wo, feed_forward.w2, shared_expert.w2, experts.w2)   N(0, (init_std / sqrt(2L))^2)
    norms ones; biases and expert_bias zeros; every other weight                     N(0, init_std^2)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from titan_aquila.models.args import ModelArgs

BLOCK_ELEMENTS = 1 << 20
RESIDUAL_WRITERS = ("attention.wo.weight", "feed_forward.w2.weight", "shared_expert.w2.weight", "experts.w2")


def init_rule(name: str, args: ModelArgs) -> tuple[str, float]:
    """('normal', std) | ('ones', 0) | ('zeros', 0) for the state-dict tensor `name` (names as in DEVELOPING.md)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(".bias") or name.endswith("expert_bias"):
        return "zeros", 0.0
    if name.endswith(RESIDUAL_WRITERS):
        return "normal", args.init_std / math.sqrt(2 * args.n_layers)
    return "normal", args.init_std


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class LazyInit:
    """The initial value of one tensor, built a range of dim-0 rows at a time (the `LazyExperts` protocol:
    `shape`, `dtype`, `build(start, stop)`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    kind: str
    std: float

    @property
    def rows_per_block(self) -> int:
        return max(1, BLOCK_ELEMENTS // math.prod(self.shape[1:]))

    def build(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        n = self.shape[0] if self.shape else 1
        stop = n if stop is None else stop
        rows = (max(stop - start, 0), *self.shape[1:])
        if self.kind != "normal" or not self.shape:
            fill = 1.0 if self.kind == "ones" else 0.0
            return torch.full(rows if self.shape else (), fill, dtype=self.dtype)
        if stop <= start:
            return torch.empty(rows, dtype=self.dtype)
        R = self.rows_per_block
        parts = []
        for b in range(start // R, -(-stop // R)):
            lo, hi = b * R, min((b + 1) * R, n)
            gen = torch.Generator().manual_seed(block_seed(self.seed, self.name, b))
            block = torch.empty((hi - lo, *self.shape[1:]), dtype=torch.float32).normal_(0.0, self.std, generator=gen)
            parts.append(block[max(start - lo, 0):min(stop, hi) - lo].to(self.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def initial_value(name: str, like: torch.Tensor, args: ModelArgs, seed: int) -> LazyInit:
    kind, std = init_rule(name, args)
    return LazyInit(name, tuple(like.shape), like.dtype, seed, kind, std)
