"""Depth growth (stack, interpolate, zero) and aki_pro: closed-form maps, LLaMA-Pro exactness, validation."""

from __future__ import annotations

import pytest
import torch

from titan_aquila.errors import UserError
from titan_aquila.growth import GrowthOptions, plan_growth
from titan_aquila.growth.maps import interpolate_map, stack_map, zero_map
from test_growth_width import grow, logit_diff, src_args


def test_closed_form_maps():
    assert interpolate_map(3, 6) == [0, 0, 1, 1, 2, 2]
    assert interpolate_map(24, 32)[:14] == [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9]
    assert interpolate_map(32, 40)[:8] == [0, 0, 1, 2, 3, 4, 4, 5]
    for L1, L2 in ((3, 6), (24, 32), (32, 40), (30, 36), (5, 7)):
        assert interpolate_map(L1, L2) == [(l * L1) // L2 for l in range(L2)]
        assert stack_map(L1, L2) == [l % L1 for l in range(L2)]
    assert stack_map(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    # LLaMA-Pro 32 -> 40: an identity copy after every 4th block
    z = zero_map(32, 40)
    assert [i for i, (_, ins) in enumerate(z) if ins] == [4 + 5 * j for j in range(8)]
    assert [s for s, ins in z if ins] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert [s for s, ins in zero_map(30, 36) if ins] == [4, 9, 14, 19, 24, 29]
    assert [s for s, ins in zero_map(2, 5) if ins] == [0, 1, 1] and len(zero_map(2, 5)) == 5


@pytest.mark.parametrize("method,expected", [("stack", [0, 1, 0, 1, 0]), ("interpolate", [0, 0, 0, 1, 1])])
def test_stack_interpolate_copy_layers(method, expected):
    a = src_args()
    src, dst, plan, sd = grow([method], a, a.replace(n_layers=5))
    ssd = src.state_dict()
    assert plan.dst_args.n_layers == 5
    for l, s in enumerate(expected):
        for n in ("attention.wq.weight", "feed_forward.w2.weight", "ffn_norm.weight"):
            assert torch.equal(sd[f"layers.{l}.{n}"], ssd[f"layers.{s}.{n}"])
    assert sd["layers.2.attention.wq.weight"].data_ptr() != sd["layers.0.attention.wq.weight"].data_ptr()
    assert logit_diff(src, dst) > 1e-3  # duplicated blocks are not function-preserving ...
    tokens = torch.randint(0, a.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # ... they are the source's own blocks run in the order of the map
        h, cos, sin = src.tok_embeddings(tokens), src.rope_cos[:24], src.rope_sin[:24]
        for s in expected:
            h, _ = src.layers[str(s)](h, cos, sin)
        want = src.output(src.norm(h))
        assert (dst(tokens)[0] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_llama_pro_zero_is_exact(tie):
    a = src_args(n_layers=3, qkv_bias=True, tie_embeddings=tie)
    src, dst, plan, sd = grow(["zero"], a, a.replace(n_layers=5))
    # 3 -> 5: inserted after source layers ceil(3/2)-1 = 1 and 2
    assert plan.dst_args.n_layers == 5
    for l in (2, 4):
        assert sd[f"layers.{l}.attention.wo.weight"].abs().max() == 0
        assert sd[f"layers.{l}.feed_forward.w2.weight"].abs().max() == 0
        assert torch.equal(sd[f"layers.{l}.attention.wq.weight"], sd[f"layers.{l - 1}.attention.wq.weight"])
    d = logit_diff(src, dst)
    print(f"zero 3 -> 5: max|dlogit| = {d:.2e}")
    assert d <= 1e-5


def test_fpi_then_zero_exact_and_aki_pro_runs():
    a = src_args(n_layers=2, qkv_bias=True)
    t = a.replace(dim=64, n_heads=8, ffn_dim=96, head_dim=None, n_layers=3).validate()
    src, dst, plan, _ = grow(["fpi", "zero"], a, t)
    assert plan.describe() == "fpi -> zero"
    assert logit_diff(src, dst) <= 1e-4
    src, dst, plan, sd = grow(["aki_pro"], a, t.replace(n_layers=4))
    assert plan.dst_args.n_layers == 4 and plan.dst_args.dim == 64
    _, _, _, aki = grow(["aki"], a, t.replace(n_layers=2))
    for l, s in enumerate([0, 0, 1, 1]):  # interpolation of the AKI-widened layers
        assert torch.equal(sd[f"layers.{l}.attention.wq.weight"], aki[f"layers.{s}.attention.wq.weight"])
    d = logit_diff(src, dst)
    print(f"aki_pro 2x32 -> 4x64: max|dlogit| = {d:.2e}")
    assert d > 1e-3


@pytest.mark.parametrize("methods", [["exact", "zero"], ["zero", "exact"]])
def test_exact_non_integer_width_and_zero_depth_compose_in_either_order(methods):
    a = src_args(n_layers=2)
    t = a.replace(dim=48, n_heads=6, ffn_dim=72, head_dim=None, n_layers=4).validate()  # width x1.5, depth x2
    src, dst, plan, _ = grow(methods, a, t)
    assert plan.dst_args.norm_eps == pytest.approx(a.norm_eps * 32 / 48)  # exact's eps' = c * eps, c = kd/D
    assert plan.dst_args.n_layers == 4 and plan.dst_args.dim == 48
    assert logit_diff(src, dst) <= 1e-4


def test_depth_noise_only_on_duplicates():
    a = src_args()
    _, _, _, sd = grow(["zero"], a, a.replace(n_layers=4), opts=GrowthOptions(noise_std=1e-2, seed=1))
    src, _, _, clean = grow(["zero"], a, a.replace(n_layers=4))
    assert torch.equal(sd["layers.0.attention.wq.weight"], clean["layers.0.attention.wq.weight"])
    assert not torch.equal(sd["layers.1.attention.wq.weight"], clean["layers.1.attention.wq.weight"])
    assert sd["layers.1.attention.wo.weight"].abs().max() == 0  # identity block stays identity


def test_bad_depth_inputs():
    a = src_args(n_layers=3)
    with pytest.raises(UserError, match="cannot shrink n_layers"):
        plan_growth(["stack"], a, a.replace(n_layers=2), GrowthOptions())
    moe = src_args(n_experts=4, top_k=2)
    with pytest.raises(UserError, match="grow the dense model first, then upcycle"):
        plan_growth(["interpolate"], moe, moe.replace(n_layers=4), GrowthOptions())
    with pytest.raises(UserError, match="n_kv_heads must stay"):
        plan_growth(["aki_pro"], a, a.replace(dim=64, n_heads=8, n_kv_heads=4, head_dim=None, n_layers=6),
                    GrowthOptions())
    with pytest.raises(UserError, match="noise_std"):
        plan_growth(["zero"], a, a.replace(n_layers=4), GrowthOptions(noise_std=-1))
