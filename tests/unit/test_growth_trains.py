"""Growth that trains: grown models stay exact at step 0 and then use their new width.

The source is a tiny byte-level model (vocab 256: the UTF-8 bytes of the shipped Austen fixture) trained a few
AdamW steps; it is grown, then trained N more AdamW steps on the same fixture. A bug that lets the copies of a unit
(or `exact`'s padding) receive identical (or zero) gradients keeps them identical: these tests then fail, as the
`split_spread = 0` cases show (they reproduce the old behaviour and assert that it is stuck)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.growth import GrowthOptions, apply_growth, plan_growth
from titan_aquila.models.aquila import build_model
from titan_aquila.models.args import ModelArgs

ROOT = Path(__file__).resolve().parents[2]
SRC = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=256, max_seq_len=32)
B, T = 8, 32


def fixture_bytes(split: str) -> torch.Tensor:
    return torch.tensor(list((ROOT / f"assets/text/{split}/austen_pp_ch{'01-06' if split == 'train' else '07-08'}"
                                     f".txt").read_bytes()), dtype=torch.long)


TRAIN, VAL = fixture_bytes("train"), fixture_bytes("val")


def batch(step: int, data: torch.Tensor = TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step`: B windows of T+1 bytes at fixed pseudo-random offsets (the same batches for every model)."""
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
    w = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
    return w[:, :-1], w[:, 1:]


def train(model, steps: int, first: int = 0, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    for s in range(first, first + steps):
        x, y = batch(s)
        loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def val_loss(model) -> float:
    with torch.no_grad():
        n = (VAL.numel() - 1) // T
        x, y = VAL[:n * T].view(n, T), VAL[1:n * T + 1].view(n, T)
        return F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()


_SOURCE: dict = {}


def source(tie: bool):
    """The pretrained source (30 AdamW steps from a seeded init), built once per tie setting."""
    if tie not in _SOURCE:
        torch.manual_seed(0)
        m = build_model(ModelArgs(**SRC, tie_embeddings=tie).validate(), seed=0)
        train(m, 30)
        _SOURCE[tie] = m
    return _SOURCE[tie]


def grow(method: str, target: dict, tie: bool = False, **opts):
    src = source(tie)
    o = GrowthOptions(**opts)
    plan = plan_growth([method], src.args, src.args.replace(**target, head_dim=None).validate(), o)
    sd = apply_growth(plan, {k: v.detach().clone() for k, v in src.state_dict().items()}, o)
    dst = build_model(plan.dst_args, seed=1)
    dst.load_state_dict(sd)
    return src, dst


def max_logit_diff(a, b) -> float:
    x, _ = batch(999, VAL)
    with torch.no_grad():
        return (a(x)[0] - b(x)[0]).abs().max().item()


def rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.detach().double(), rtol=1e-6))


def min_copy_gap(w: torch.Tensor, n_src: int, dim: int) -> float:
    """min over source units j of ||w_j - w_{j + n_src}|| / ||w_j|| along `dim` (0 = rows, 1 = columns)."""
    w = w.detach().double() if dim == 0 else w.detach().double().T
    a, b = w[:n_src], w[n_src:2 * n_src]
    return ((a - b).norm(dim=1) / a.norm(dim=1)).min().item()


WIDE = dict(dim=64, n_heads=8, ffn_dim=96)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method,target", [("fpi", WIDE), ("exact", WIDE), ("aki", WIDE), ("exact", dict(
    dim=80, n_heads=10, ffn_dim=96)), ("aki_pro", dict(WIDE, n_layers=3))])
def test_width_growth_is_exact_then_uses_its_width(method, target, tie):
    src, dst = grow(method, target, tie)
    d0 = max_logit_diff(src, dst)
    if method in ("fpi", "exact"):
        assert d0 <= 1e-4, d0  # the symmetry breaking keeps the growth exact
    train(dst, 20, first=30)
    E = dst.tok_embeddings.weight
    r = rank(E)
    print(f"{method} {target} tie={tie}: step-0 max|dlogit| {d0:.1e}, embedding rank after 20 steps {r} "
          f"(source width 32, target {E.shape[1]})")
    assert r >= E.shape[1] - 2 > 1.5 * 32  # essentially full rank: every new column learned something of its own
    L = dst.layers["0"]
    hd = 8
    assert min_copy_gap(L.feed_forward.w1.weight, 48, 0) > 1e-3  # FFN unit copies separated
    q = L.attention.wq.weight.view(2, -1, hd, E.shape[1])  # [group, head in group, hd, D]; copies: head 0<->2, 1<->3
    gap = min(((q[g, h] - q[g, h + 2]).norm() / q[g, h].norm()).item() for g in range(2) for h in range(2))
    assert gap > 1e-3  # query-head copies separated
    if target["dim"] % 32:  # `exact` padding: producer rows start at zero, then learn
        assert L.attention.wo.weight[64:].abs().min() >= 0 and L.attention.wo.weight[64:].abs().max() > 1e-4


@pytest.mark.parametrize("method,target", [("fpi", WIDE), ("exact", dict(dim=80, n_heads=10, ffn_dim=96))])
def test_equal_split_is_stuck(method, target):
    """split_spread = 0 (the old rule): the copies stay identical under AdamW and the padding stays zero, so the
    rank checks above are not trivially true."""
    _, dst = grow(method, target, split_spread=0.0)
    train(dst, 20, first=30)
    E = dst.tok_embeddings.weight
    assert rank(E) == 32
    assert min_copy_gap(dst.layers["0"].feed_forward.w1.weight, 48, 0) < 1e-6
    if target["dim"] == 80:
        assert E[:, 64:].abs().max() == 0 and dst.layers["0"].attention.wo.weight[64:].abs().max() == 0


def test_split_shares_sum_to_the_source_and_differ():
    src, dst = grow("fpi", WIDE)
    w, w2 = src.layers["0"].feed_forward.w2.weight, dst.layers["0"].feed_forward.w2.weight  # [D, F] -> [D', F']
    shares = w2[:32, :48] / w  # copy 1 of unit f is f + 48; rows 0..31 are the first hidden copy
    assert torch.allclose(w2[:32, :48] + w2[:32, 48:], w, atol=1e-6)
    assert 0.25 <= shares.min().item() < 0.3 and 0.7 < shares.max().item() <= 0.75  # u ~ U(0.5, 1.5): [1/4, 3/4]
    assert shares.std().item() > 0.08
    _, again = grow("fpi", WIDE)
    assert torch.equal(again.layers["0"].feed_forward.w2.weight, w2)  # seeded: bit-identical rerun
    _, other = grow("fpi", WIDE, seed=1)
    assert not torch.equal(other.layers["0"].feed_forward.w2.weight, w2)


def test_grown_model_beats_source_on_the_same_batches():
    """K = 40 more steps on the same batches (AdamW, LR 3e-3): the grown model (2x width, fpi) ends below the source
    on held-out text. The source trained alone is the baseline a growth method must beat to be worth its compute.
    The margin is small at this toy size and depends on the LR (at 5e-3 the two tie within 0.01), so this pins one
    measured configuration; that the split is what lets the new width train is shown by the rank tests above."""
    src, dst = grow("fpi", WIDE)
    base = build_model(src.args, seed=0)
    base.load_state_dict(src.state_dict())
    start = val_loss(base)
    for m in (base, dst):
        train(m, 40, first=30, lr=3e-3)
    vb, vg = val_loss(base), val_loss(dst)
    print(f"validation: start {start:.4f}, source +40 steps {vb:.4f}, fpi x2 +40 steps {vg:.4f} "
          f"(ln 256 = {math.log(256):.3f})")
    assert vg < vb - 0.01  # measured 2.6281 vs 2.6465
