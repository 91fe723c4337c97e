"""Width growth (fpi, aki, exact): function preservation in fp32 through plan_growth/apply_growth, and validation."""

from __future__ import annotations

import pytest
import torch

from titan_aquila.errors import UserError
from titan_aquila.growth import GrowthOptions, apply_growth, plan_growth
from titan_aquila.models.aquila import build_model
from titan_aquila.models.args import ModelArgs

SRC = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=128, max_seq_len=64)


def src_args(**kw) -> ModelArgs:
    return ModelArgs(**{**SRC, **kw}).validate()


def random_model(args: ModelArgs, seed: int = 0):
    """A source with non-trivial norms and biases (ones/zeros would hide mapping bugs)."""
    m = build_model(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(5)  # larger weights: attention patterns and norms are far from trivial
    return m


def grow(methods, a: ModelArgs, target: ModelArgs, seed: int = 0, opts: GrowthOptions | None = None):
    opts = opts or GrowthOptions()
    src = random_model(a, seed)
    plan = plan_growth(methods, a, target, opts)
    sd = apply_growth(plan, {k: v.detach().clone() for k, v in src.state_dict().items()}, opts)
    dst = build_model(plan.dst_args, seed=123)
    dst.load_state_dict(sd, strict=True)
    return src, dst, plan, sd


def logit_diff(src, dst, T: int = 24) -> float:
    tokens = torch.randint(0, src.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return (src(tokens)[0] - dst(tokens)[0]).abs().max().item()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_fpi_integer_ratio_is_exact(k, bias, tie):
    a = src_args(qkv_bias=bias, tie_embeddings=tie)
    t = a.replace(dim=32 * k, n_heads=4 * k, ffn_dim=48 * k, head_dim=None).validate()
    src, dst, plan, _ = grow(["fpi"], a, t)
    assert plan.dst_args.dim == 32 * k and plan.dst_args.n_kv_heads == 2 and plan.dst_args.head_dim == 8
    d = logit_diff(src, dst)
    print(f"fpi x{k} bias={bias} tie={tie}: max|dlogit| = {d:.2e}")
    assert d <= 1e-4


def test_fpi_mha_and_odd_head_ratio_exact():
    # MHA (G = H) and a head ratio that is not a multiple inside the group (r=2 -> r'=3): 1/m splits stay exact.
    a = src_args(n_kv_heads=4)
    src, dst, _, _ = grow(["fpi"], a, a.replace(dim=64, n_heads=8, ffn_dim=96, head_dim=None).validate())
    assert logit_diff(src, dst) <= 1e-4
    a = src_args()
    src, dst, _, _ = grow(["fpi"], a, a.replace(dim=48, n_heads=6, ffn_dim=48, head_dim=None).validate(), seed=1)
    assert logit_diff(src, dst) > 1e-3  # 32 -> 48 is a non-integer hidden ratio
    src, dst, _, _ = grow(["exact"], a, a.replace(dim=48, n_heads=6, ffn_dim=48, head_dim=None).validate(), seed=1)
    assert logit_diff(src, dst) <= 1e-4


def test_fpi_non_integer_ratio_drifts():
    """32 -> 48: units 0..15 are copied twice, 16..31 once. The drift is exactly the RMSNorm statistics: the first
    norm's output is the source's, replicated, times sqrt(mean(x^2) + eps) / sqrt(mean_c(x^2) + eps) per token, with
    mean_c(x^2) = (1/D) sum_j c_j x_j^2."""
    a = src_args()
    src, dst, _, _ = grow(["fpi"], a, a.replace(dim=48, n_heads=6, head_dim=None).validate())
    d = logit_diff(src, dst)
    print(f"fpi 32 -> 48: max|dlogit| = {d:.2e}")
    assert d > 1e-3
    tokens = torch.arange(20)[None]
    g = torch.arange(48) % 32
    c = torch.bincount(g, minlength=32).float()
    with torch.no_grad():
        x = src.tok_embeddings(tokens)
        assert torch.equal(dst.tok_embeddings(tokens), x[..., g])  # the stream is an exact replica
        eps = a.norm_eps
        factor = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() / ((x.pow(2) * c).sum(-1, keepdim=True) / 48 + eps).sqrt()
        want = src.layers["0"].attention_norm(x)[..., g] * factor
        got = dst.layers["0"].attention_norm(x[..., g])
    assert (got - want).abs().max() <= 1e-5 and (factor - 1).abs().max() > 1e-2


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_exact_non_integer_ratio(tie, bias):
    a = src_args(qkv_bias=bias, tie_embeddings=tie)
    t = a.replace(dim=56, n_heads=6, ffn_dim=80, head_dim=8).validate()  # 32 -> 56: k=1, r=24
    src, dst, plan, sd = grow(["exact"], a, t)
    c = 32 / 56
    assert plan.dst_args.norm_eps == pytest.approx(a.norm_eps * c)
    assert sd["tok_embeddings.weight"][:, 32:].abs().max() == 0  # producers write zeros into the padding
    assert sd["layers.0.attention.wo.weight"][32:].abs().max() == 0 == sd["layers.1.feed_forward.w2.weight"][32:].abs().max()
    # ... consumers read it through random columns on the source matrix's scale and a non-zero gamma (learnable)
    gamma = sd["layers.0.attention_norm.weight"]
    assert torch.equal(gamma[32:], gamma[:32].mean().expand(24))
    ratio = sd["layers.0.attention.wq.weight"][:, 32:].std() / src.layers["0"].attention.wq.weight.std()
    assert 0.8 < ratio < 1.2
    d = logit_diff(src, dst)
    print(f"exact 32 -> 56 bias={bias} tie={tie}: max|dlogit| = {d:.2e}")
    assert d <= 1e-4
    # 32 -> 80: k = 2 copies + 16 padded dims
    src, dst, plan, _ = grow(["exact"], a, a.replace(dim=80, n_heads=10, head_dim=None).validate(), seed=2)
    assert plan.dst_args.norm_eps == pytest.approx(a.norm_eps * 64 / 80)
    assert logit_diff(src, dst) <= 1e-4


@pytest.mark.parametrize("F2", [49, 60, 96, 100])
def test_ffn_only_growth_any_ratio_exact(F2):
    a = src_args(qkv_bias=True)
    src, dst, _, sd = grow(["fpi"], a, a.replace(ffn_dim=F2))
    assert sd["layers.0.feed_forward.w1.weight"].shape == (F2, 32)
    assert logit_diff(src, dst) <= 1e-4


def test_aki_equals_fpi_on_old_units_differs_on_new():
    a = src_args(n_layers=3, qkv_bias=True)
    t = a.replace(dim=64, n_heads=8, ffn_dim=96, head_dim=None).validate()
    equal = GrowthOptions(split_spread=0.0)  # equal shares: donated units are exactly layer l+1's FPI units
    _, _, _, fpi = grow(["fpi"], a, t, opts=equal)
    src, _, _, aki = grow(["aki"], a, t, opts=equal)
    r, r2, hd = 2, 4, 8
    new_q = (torch.arange(8) % r2 >= r).repeat_interleave(hd)
    for l in range(3):
        p = f"layers.{l}."
        for n in ("attention_norm.weight", "ffn_norm.weight", "attention.wk.weight", "attention.wv.weight"):
            assert torch.equal(aki[p + n], fpi[p + n])
        w1a, w1f = aki[p + "feed_forward.w1.weight"], fpi[p + "feed_forward.w1.weight"]
        w2a, w2f = aki[p + "feed_forward.w2.weight"], fpi[p + "feed_forward.w2.weight"]
        qa, qf = aki[p + "attention.wq.weight"], fpi[p + "attention.wq.weight"]
        oa, of = aki[p + "attention.wo.weight"], fpi[p + "attention.wo.weight"]
        ba, bf = aki[p + "attention.wq.bias"], fpi[p + "attention.wq.bias"]
        assert torch.equal(w1a[:48], w1f[:48]) and torch.equal(w2a[:, :48], w2f[:, :48])
        assert torch.equal(qa[~new_q], qf[~new_q]) and torch.equal(oa[:, ~new_q], of[:, ~new_q])
        assert torch.equal(ba[~new_q], bf[~new_q])
        if l < 2:  # new units come from layer l+1's FPI tensors
            q = f"layers.{l + 1}."
            assert not torch.allclose(w1a[48:], w1f[48:])
            assert torch.equal(w1a[48:], fpi[q + "feed_forward.w1.weight"][48:])
            assert torch.equal(w2a[:, 48:], fpi[q + "feed_forward.w2.weight"][:, 48:])
            assert torch.equal(qa[new_q], fpi[q + "attention.wq.weight"][new_q])
            assert torch.equal(oa[:, new_q], fpi[q + "attention.wo.weight"][:, new_q])
            assert not torch.allclose(ba[new_q], bf[new_q])
        else:  # top layer falls back to FPI
            for n in fpi:
                if n.startswith(p):
                    assert torch.equal(aki[n], fpi[n])


@pytest.mark.parametrize("tie", [False, True])
def test_aki_on_identical_layers_is_fpi_so_exact(tie):
    """An independent check of AKI's wiring with the default unequal shares: when layer l+1 equals layer l, the
    donated units are the units FPI would copy and the donor is grown with layer l's shares, so AKI must be exact.
    (Any wrong head/unit index, or shares that do not sum to 1 over own + donated copies, breaks this.)"""
    a = src_args(n_layers=3, qkv_bias=True, tie_embeddings=tie)
    src = random_model(a)
    with torch.no_grad():
        for l in ("1", "2"):
            src.layers[l].load_state_dict(src.layers["0"].state_dict())
    t = a.replace(dim=64, n_heads=8, ffn_dim=80, head_dim=None).validate()
    opts = GrowthOptions()
    plan = plan_growth(["aki"], a, t, opts)
    sd = apply_growth(plan, {k: v.detach().clone() for k, v in src.state_dict().items()}, opts)
    dst = build_model(plan.dst_args, seed=123)
    dst.load_state_dict(sd)
    assert logit_diff(src, dst) <= 1e-4
    w2 = sd["layers.0.feed_forward.w2.weight"]
    assert not torch.allclose(w2[:, :32], w2[:, 48:80])  # unequal shares, yet exact


def test_noise_seeded_and_off_by_default():
    a = src_args()
    t = a.replace(dim=64, n_heads=8, ffn_dim=96, head_dim=None).validate()
    _, _, _, clean = grow(["fpi"], a, t, opts=GrowthOptions(seed=3))  # the same split shares, no noise
    o = GrowthOptions(noise_std=1e-3, seed=3)
    _, _, _, n1 = grow(["fpi"], a, t, opts=o)
    _, _, _, n2 = grow(["fpi"], a, t, opts=o)
    _, _, _, n3 = grow(["fpi"], a, t, opts=GrowthOptions(noise_std=1e-3, seed=4))
    k = "layers.0.attention.wq.weight"
    assert torch.equal(n1[k], n2[k]) and not torch.equal(n1[k], n3[k])
    assert 5e-4 < (n1[k] - clean[k]).std().item() < 2e-3
    assert torch.equal(n1["layers.0.ffn_norm.weight"], clean["layers.0.ffn_norm.weight"])  # 1-D: no noise


BAD = [
    (dict(dim=16, n_heads=2, head_dim=None), "cannot shrink dim"),
    (dict(ffn_dim=32), "cannot shrink ffn_dim"),
    (dict(dim=64, n_heads=8, n_kv_heads=4, head_dim=None), "n_kv_heads must stay"),
    (dict(dim=64, n_heads=4, head_dim=None), "head_dim must stay"),
    (dict(dim=60, n_heads=8, head_dim=8), "not a multiple of head_dim"),
    (dict(dim=64, n_heads=7, head_dim=8), "not a multiple of n_kv_heads"),
]


@pytest.mark.parametrize("change,msg", BAD)
def test_bad_width_targets(change, msg):
    a = src_args()
    with pytest.raises(UserError, match=msg):
        plan_growth(["fpi"], a, a.replace(**change), GrowthOptions())


def test_bad_width_tied_non_integer_moe_and_eps():
    a = src_args(tie_embeddings=True)
    with pytest.raises(UserError, match="use methods \\['exact'\\]"):
        plan_growth(["fpi"], a, a.replace(dim=48, n_heads=6, head_dim=None), GrowthOptions())
    moe = src_args(n_experts=4, top_k=2)
    with pytest.raises(UserError, match="grow the dense model first, then upcycle"):
        plan_growth(["fpi"], moe, moe.replace(dim=64, n_heads=8, head_dim=None), GrowthOptions())
    with pytest.raises(UserError, match="norm_eps"):
        plan_growth(["exact"], a, a.replace(dim=48, n_heads=6, head_dim=None, norm_eps=1e-3), GrowthOptions())
    with pytest.raises(UserError, match="unknown growth method 'fip'"):
        plan_growth(["fip"], a, a, GrowthOptions())
    with pytest.raises(UserError, match="no growth method"):  # dim changes but only depth is named
        plan_growth(["stack"], a, a.replace(dim=64, n_heads=8, head_dim=None), GrowthOptions())
