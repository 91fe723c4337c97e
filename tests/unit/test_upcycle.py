"""Dense -> MoE upcycling (`upcycle`): exactness at init, Drop-Upcycling, fine-grained, HF export, errors, configs.

All fp32 on real titan_aquila Transformers (dim 32, 2-4 layers, GQA, vocab 128), tolerance 1e-5 on logits:
- sparse, topk_softmax: MoE logits = dense logits (every layer MoE, and every other layer); softmax_topk: one MoE
  layer's output = (sum of the top-k router probabilities) * dense FFN output, the factor varying per token;
- fine-grained G = 2, 4 (virtual-group router, route_scale G): exact; shared expert: y = dense + [gate] * shared;
- Drop-Upcycling: r = 0 bit-identical to sparse; a permutation alone keeps the function; exactly floor(r*Fe) units
  re-drawn per expert per matrix; re-draw statistics = those of the dropped slice; shared vs per-matrix index sets;
  experts differ; experts 4..7 built alone = the same slice of all 8, with 4 calls of `make`;
- the upcycled model exported to HF Mixtral gives transformers the same logits;
- each bad input is one UserError line, before any tensor is built; the shipped configs plan and shape-check.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from titan_aquila.errors import UserError
from titan_aquila.growth import (REGISTRY, GrowthOptions, GrowthPlan, LazyExperts, apply_growth, get_method,
                                 materialize, plan_growth)
from titan_aquila.growth.drop_upcycle import UNIT_AXIS, DropPlan, drop_plan, drop_upcycle_matrix, n_dropped
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

REPO = Path(__file__).resolve().parents[2]
BASE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=128, max_seq_len=64, init_std=0.1)
TOL = 1e-5
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def dense_model(**kw):
    args = ModelArgs(**{**BASE, **kw}).validate()
    return args, build_model(args, seed=1).eval()


def upcycle(src: ModelArgs, sd: dict, opts: GrowthOptions | None = None, methods=("upcycle",), **moe):
    opts = opts or GrowthOptions()
    plan = plan_growth(list(methods), src, src.replace(**moe), opts)
    return plan.dst_args, apply_growth(plan, sd, opts)


def load(args: ModelArgs, sd: dict):
    model = build_model(args, seed=0).eval()
    model.load_state_dict({k: materialize(v) for k, v in sd.items()})
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)[0]


# ---- sparse upcycling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("step,n_layers", [(1, 2), (2, 4)])
def test_sparse_upcycling_with_mixtral_routing_equals_dense(step, n_layers):
    src, dense = dense_model(n_layers=n_layers)
    dst, sd = upcycle(src, dense.state_dict(), n_experts=4, top_k=2, moe_layer_step=step)
    assert dst.moe_layer_ids == list(range(step - 1, n_layers, step))
    for i in range(n_layers):  # MoE layers hold E bit-identical copies; everything else is the source tensor
        if i in dst.moe_layer_ids:
            for w in ("w1", "w2", "w3"):
                dw = dense.state_dict()[f"layers.{i}.feed_forward.{w}.weight"]
                assert all(torch.equal(x, dw) for x in sd[f"layers.{i}.moe.experts.{w}"].build())
            assert torch.equal(sd[f"layers.{i}.moe.expert_bias"], torch.zeros(4))
    moe = load(dst, sd)
    ref, out = logits(dense), logits(moe)
    diff = (out - ref).abs().max().item()
    print(f"\nsparse upcycling E4T2 step {step}: max |logit diff| vs dense = {diff:.2e}")
    assert ref.abs().max() > 0.5 and diff <= TOL
    for i in dst.moe_layer_ids:  # the router really spread the tokens over the copies
        assert (moe.layers[str(i)].moe.tokens_per_expert > 0).sum() >= 3


@pytest.mark.parametrize("std", [0.02, 0.02 ** 0.5])
def test_router_init_is_normal_with_the_configured_std(std):
    src, dense = dense_model(dim=256, n_heads=8, ffn_dim=64)
    _, sd = upcycle(src, dense.state_dict(), GrowthOptions(router_init_std=std), n_experts=8, top_k=2)
    r = sd["layers.0.moe.router.weight"]  # 2048 samples
    assert r.shape == (8, 256) and abs(r.std().item() / std - 1) < 0.06 and abs(r.mean().item()) < 4 * std / 45
    assert not torch.equal(r, sd["layers.1.moe.router.weight"])  # one draw per layer


def test_softmax_topk_scales_the_dense_output_by_the_topk_mass():
    src, dense = dense_model()
    dst, sd = upcycle(src, dense.state_dict(), GrowthOptions(router_init_std=0.1), n_experts=8, top_k=2,
                      router_order="softmax_topk")
    moe = load(dst, sd).layers["0"].moe
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, _ = moe(x)
        mass = torch.softmax(x.reshape(-1, 32) @ moe.router.weight.T, -1).topk(2, -1).values.sum(-1)
        expected = mass[:, None] * dense.layers["0"].feed_forward(x).reshape(-1, 32)
    diff = (y.reshape(-1, 32) - expected).abs().max().item()
    print(f"\nsoftmax_topk: top-2 mass in [{mass.min():.3f}, {mass.max():.3f}], max |y - mass*dense| = {diff:.1e}")
    assert diff <= TOL and expected.abs().max() > 0.1
    assert mass.min() >= 2 / 8 - 1e-6 and mass.max() < 0.95 and mass.std() > 0.01


# ---- fine-grained -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,E,k", [(2, 4, 2), (4, 8, 4), (2, 8, 4)])
def test_fine_grained_virtual_group_upcycling_is_exact(G, E, k):
    src, dense = dense_model()
    dst, sd = upcycle(src, dense.state_dict(), GrowthOptions(granularity=G, router_init_std=0.3), n_experts=E,
                      top_k=k, moe_ffn_dim=48 // G)
    assert dst.route_scale == G and dst.moe_ffn_dim == 48 // G
    R = sd["layers.0.moe.router.weight"]
    assert all(torch.equal(R[e], R[e // G * G]) for e in range(E)) and not torch.equal(R[0], R[G])
    w1 = sd["layers.0.moe.experts.w1"].build()
    dense_w1 = dense.state_dict()["layers.0.feed_forward.w1.weight"]
    assert all(torch.equal(w1[e], dense_w1.chunk(G)[e % G]) for e in range(E))
    diff = (logits(load(dst, sd)) - logits(dense)).abs().max().item()
    print(f"\nfine-grained E{E // G}G{G}T{k}: max |logit diff| vs dense = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_is_a_dense_copy_added_to_the_routed_output(gate):
    src, dense = dense_model()
    dst, sd = upcycle(src, dense.state_dict(), GrowthOptions(granularity=2), n_experts=4, top_k=2, moe_ffn_dim=24,
                      n_shared_experts=2, shared_expert_gate=gate)
    moe, ffn = load(dst, sd).layers["0"].moe, dense.layers["0"].feed_forward
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, f = moe(x)[0], ffn(x)
        scale = torch.sigmoid(moe.shared_expert_gate(x)) if gate else 1.0
    assert (y - (f + scale * f)).abs().max() <= TOL and (y - f).abs().max() > 0.05  # not exact at init


# ---- Drop-Upcycling -----------------------------------------------------------------------------------------
def _experts(sd: dict, i: int = 0) -> dict[str, torch.Tensor]:
    return {w: sd[f"layers.{i}.moe.experts.{w}"].build() for w in ("w1", "w2", "w3")}


def test_drop_ratio_zero_is_sparse_upcycling_and_a_permutation_alone_keeps_the_function():
    src, dense = dense_model()
    moe = dict(n_experts=4, top_k=2)
    _, sparse = upcycle(src, dense.state_dict(), **moe)
    _, zero = upcycle(src, dense.state_dict(), GrowthOptions(drop_ratio=0.0, drop_index_sets="per_matrix"), **moe)
    assert all(torch.equal(materialize(sparse[k]), materialize(zero[k])) for k in sparse)
    dst, perm_only = upcycle(src, dense.state_dict(), GrowthOptions(drop_ratio=0.01), **moe)  # floor(0.01*48) = 0
    assert not torch.equal(_experts(perm_only)["w1"], _experts(sparse)["w1"])
    assert (logits(load(dst, perm_only)) - logits(dense)).abs().max() <= TOL  # one permutation for w1, w2, w3


@pytest.mark.parametrize("r", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("sets", ["shared", "per_matrix"])
def test_drop_upcycling_redraws_exactly_floor_r_F_units(r, sets):
    src, dense = dense_model()
    opts = GrowthOptions(drop_ratio=r, drop_index_sets=sets, seed=5)
    _, sd = upcycle(src, dense.state_dict(), opts, n_experts=4, top_k=2)
    F, n = 48, math.floor(r * 48)
    differs_between_matrices = False
    for i in (0, 1):
        ex = _experts(sd, i)
        for e in range(4):
            plan = drop_plan(5, i, e, F, r, sets)
            changed = {}
            for w, t in ex.items():
                ax, dw = UNIT_AXIS[w], dense.state_dict()[f"layers.{i}.feed_forward.{w}.weight"]
                unperm = t[e].index_select(ax, torch.argsort(plan.perm))  # back to the dense unit order
                diff_units = (unperm != dw).any(dim=1 - ax).nonzero().flatten()
                assert len(diff_units) == n, (w, e, len(diff_units), n)
                assert set(diff_units.tolist()) == set(plan.perm[plan.dropped[w]].tolist())
                changed[w] = set(diff_units.tolist())
            if sets == "shared":
                assert changed["w1"] == changed["w2"] == changed["w3"]
            differs_between_matrices |= not (changed["w1"] == changed["w2"] == changed["w3"])
    assert differs_between_matrices == (sets == "per_matrix" and r < 1)
    for w, t in _experts(sd).items():  # experts differ from each other
        assert all(not torch.equal(t[a], t[b]) for a in range(4) for b in range(a + 1, 4))
    assert n_dropped(0.29, 100) == 29 and n_dropped(0.5, 7) == 3


def test_redraw_uses_the_statistics_of_the_dropped_slice():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 64, generator=g)
    w[:100] = 3.0 + 0.5 * torch.randn(100, 64, generator=g)  # the slice to drop: mean 3, std 0.5
    plan = DropPlan(torch.arange(400), {"w1": torch.arange(100)})
    new = drop_upcycle_matrix(w, "w1", plan, seed=0, layer=0, expert=0)
    assert torch.equal(new[100:], w[100:])
    assert abs(new[:100].mean() - w[:100].mean()) < 0.02 and abs(new[:100].std() / w[:100].std() - 1) < 0.03
    assert not torch.equal(new[:100], w[:100])
    # Through the method, on a larger FFN with shifted weights (F = 512, D = 64, r = 0.5: 16,384 samples/slice).
    src = ModelArgs(**{**BASE, "n_layers": 1, "dim": 64, "ffn_dim": 512}).validate()
    dense = {"layers.0.feed_forward.w1.weight": 0.2 + 0.1 * torch.randn(512, 64, generator=g),
             "layers.0.feed_forward.w3.weight": -0.1 + 0.3 * torch.randn(512, 64, generator=g),
             "layers.0.feed_forward.w2.weight": 0.05 * torch.randn(64, 512, generator=g) + torch.linspace(0, 1, 512)}
    _, sd = upcycle(src, dense, GrowthOptions(drop_ratio=0.5, seed=1), n_experts=2, top_k=1, router_order="softmax_topk")
    for e in range(2):
        plan = drop_plan(1, 0, e, 512, 0.5, "shared")
        for w, t in _experts(sd).items():
            ax, idx = UNIT_AXIS[w], plan.dropped[w]
            old = dense[f"layers.0.feed_forward.{w}.weight"].index_select(ax, plan.perm).index_select(ax, idx)
            fresh = t[e].index_select(ax, idx)
            assert abs(fresh.mean() - old.mean()) < 5 * old.std() / 128 and abs(fresh.std() / old.std() - 1) < 0.05


def test_experts_are_built_independently_and_deterministically():
    src, dense = dense_model()
    opts = GrowthOptions(drop_ratio=0.5, seed=3)
    _, full = upcycle(src, dense.state_dict(), opts, n_experts=8, top_k=2)
    _, fresh = upcycle(src, dense.state_dict(), opts, n_experts=8, top_k=2)
    _, other = upcycle(src, dense.state_dict(), GrowthOptions(drop_ratio=0.5, seed=4), n_experts=8, top_k=2)
    for name in ("layers.1.moe.experts.w1", "layers.1.moe.experts.w2"):
        lazy: LazyExperts = fresh[name]
        calls, make = [], lazy.make
        lazy.make = lambda e, make=make: calls.append(e) or make(e)
        assert torch.equal(lazy.build(4, 8), full[name].build()[4:8]) and calls == [4, 5, 6, 7]
        assert not torch.equal(other[name].build(4, 8), full[name].build()[4:8])


# ---- HF export, errors, composition, configs -----------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("r", [0.0, 0.5])
def test_upcycled_model_exports_to_mixtral_with_the_same_logits(r, tmp_path):
    from transformers import AutoModelForCausalLM

    from titan_aquila.checkpoint.storage import write_model_checkpoint
    from titan_aquila.convert.hf import export_hf

    src, dense = dense_model()
    dst, sd = upcycle(src, dense.state_dict(), GrowthOptions(drop_ratio=r), n_experts=4, top_k=2)
    write_model_checkpoint(tmp_path / "ckpt", {k: materialize(v) for k, v in sd.items()}, dst, {})
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        ref = hf(TOKENS).logits
    ours = logits(load(dst, sd))
    print(f"\nupcycled r={r} -> HF Mixtral: max |logit diff| = {(ours - ref).abs().max():.2e}")
    assert (ours - ref).abs().max() <= TOL
    assert ((ref - logits(dense)).abs().max() <= TOL) == (r == 0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("arch,r", [("mixtral", 0.0), ("mixtral", 0.5), ("qwen2_moe", 0.5)])
def test_fine_grained_upcycling_exports_with_route_scale_folded_into_w_down(arch, r, tmp_path):
    """G = 2 (route_scale 2): HF has no route_scale, export multiplies every expert's W_down by it."""
    from transformers import AutoModelForCausalLM

    from titan_aquila.checkpoint.storage import write_model_checkpoint
    from titan_aquila.convert.hf import export_hf

    src, dense = dense_model()
    dst, sd = upcycle(src, dense.state_dict(), GrowthOptions(granularity=2, drop_ratio=r, router_init_std=0.3),
                      n_experts=4, top_k=2, moe_ffn_dim=24)
    assert dst.route_scale == 2.0
    write_model_checkpoint(tmp_path / "ckpt", {k: materialize(v) for k, v in sd.items()}, dst, {})
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", arch=arch, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(TOKENS).logits
    ours = logits(load(dst, sd))
    print(f"\nfine-grained G=2 r={r} -> HF {arch}: max |logit diff| = {(ours - ref).abs().max():.2e}")
    assert (ours - ref).abs().max() <= TOL
    assert ((ours - logits(dense)).abs().max() <= TOL) == (r == 0)  # r = 0: exactly the dense model


BAD = [  # (moe target fields, growth options, source overrides, expected message part)
    (dict(n_experts=4, top_k=5), {}, {}, "top_k (5) must be between 1 and n_experts (4)"),
    (dict(n_experts=0), {}, {}, "n_experts must be >= 1"),
    (dict(n_experts=4), dict(drop_ratio=1.5), {}, "drop_ratio must be in [0, 1]"),
    (dict(n_experts=4), dict(drop_ratio=-0.1), {}, "drop_ratio must be in [0, 1]"),
    (dict(n_experts=4), dict(drop_index_sets="both"), {}, "drop_index_sets must be one of"),
    (dict(n_experts=5, moe_ffn_dim=9), dict(granularity=5), {}, "granularity 5 does not divide the dense ffn_dim 48"),
    (dict(n_experts=4, moe_ffn_dim=16), dict(granularity=3), {}, "granularity 3 does not divide n_experts 4"),
    (dict(n_experts=4), dict(granularity=2), {}, "moe_ffn_dim is 48 but granularity 2"),
    (dict(n_experts=4, moe_ffn_dim=24), {}, {}, "set moe_ffn_dim = 48 (or growth.granularity = 2)"),
    (dict(n_experts=4, top_k=3, moe_ffn_dim=24), dict(granularity=2), {}, "needs top_k a multiple of 2"),
    (dict(n_experts=4, moe_ffn_dim=24, route_scale=3.0), dict(granularity=2), {}, "sets route_scale = 2"),
    (dict(n_experts=4), {}, dict(n_experts=4), "upcycling a checkpoint that is already MoE"),
    (dict(n_experts=4, moe_layer_step=3), {}, {}, "no layer would become MoE"),
    (dict(n_experts=4, shared_expert_gate=True), {}, {}, "no shared expert to gate"),
    (dict(n_experts=4), dict(router_init_std=-1.0), {}, "router_init_std must be >= 0"),
]


@pytest.mark.parametrize("moe,opts,src_kw,needle", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_inputs_raise_one_line_user_errors(moe, opts, src_kw, needle):
    src = ModelArgs(**{**BASE, **src_kw}).validate()
    with pytest.raises(UserError) as e:
        plan_growth(["upcycle"], src, ModelArgs(**{**BASE, **moe}), GrowthOptions(**opts))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_missing_dense_ffn_is_a_user_error():
    src, dense = dense_model()
    sd = {k: v for k, v in dense.state_dict().items() if "layers.1.feed_forward.w2" not in k}
    with pytest.raises(UserError, match="lacks layers.1.feed_forward.w2.weight"):
        upcycle(src, sd, n_experts=4, top_k=2)


SCALE_UP = {("fpi",): dict(dim=64, n_heads=8, ffn_dim=96), ("aki_pro",): dict(dim=64, n_heads=8, ffn_dim=96, n_layers=4),
            ("fpi", "stack"): dict(dim=64, n_heads=8, ffn_dim=96, n_layers=4)}


@pytest.mark.parametrize("grow", list(SCALE_UP), ids="+".join)
def test_composes_with_scale_up(grow):
    get_method("upcycle")
    if any(m not in REGISTRY for m in grow):
        pytest.skip(f"growth methods {grow} are not registered yet (growth/width.py, depth.py)")
    src, dense = dense_model()
    opts, big = GrowthOptions(seed=2), SCALE_UP[grow]
    both = plan_growth([*grow, "upcycle"], src, ModelArgs(**{**BASE, **big, "n_experts": 4, "top_k": 2}), opts)
    dense_big = both.steps[-1][1]  # the args the Scale-Up steps produce, before upcycling
    assert dense_big.dim == 64 and not dense_big.is_moe and both.dst_args.n_experts == 4
    grown_plan = GrowthPlan(src, dense_big, both.steps[:-1])
    grown = load(grown_plan.dst_args, apply_growth(grown_plan, dense.state_dict(), opts))
    moe = load(both.dst_args, apply_growth(both, dense.state_dict(), opts))
    diff, vs_src = (logits(moe) - logits(grown)).abs().max().item(), (logits(moe) - logits(dense)).abs().max().item()
    print(f"\n{'+'.join(grow)}+upcycle: max |logit diff| vs {'+'.join(grow)} alone {diff:.2e}, vs the source {vs_src:.2e}")
    assert diff <= TOL  # upcycling keeps the scaled-up function
    if grow == ("fpi",):  # integer-ratio FPI is exact too: the whole chain starts as the source model
        assert vs_src <= 1e-4


CONFIGS = {  # config -> source model (what growth.source_path holds)
    "tiny_stage2_moe": None, "smollm2_8x_top2": "smollm2_135m", "smollm2_8x_top2_drop": "smollm2_135m",
    "aquila3_16b_to_8x16b": "aquila3_16b", "llama3_8b_to_e8t2": "llama3_8b"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_configs_plan_and_match_the_target_shapes(name):
    from titan_aquila.growth.loader import growth_options
    from titan_aquila.config import load_job_config
    from titan_aquila.models.args import build_model_args

    cfg = load_job_config(["--job.config_file", str(REPO / "train_configs" / f"{name}.toml")])
    target = build_model_args(cfg.model.flavor, cfg.model.overrides)
    src = build_model_args(CONFIGS[name]) if CONFIGS[name] else target.replace(n_experts=0)
    opts = growth_options(cfg)
    plan = plan_growth(list(cfg.growth.methods), src, target, opts)
    assert cfg.growth.enable and "upcycle" in cfg.growth.methods and plan.dst_args.is_moe
    sd = apply_growth(plan, build_model(src, "meta").state_dict(), opts)
    want = build_model(plan.dst_args, "meta").state_dict()
    assert set(sd) == set(want)
    assert all(tuple(sd[k].shape) == tuple(v.shape) for k, v in want.items())
    print(f"\n{name}: {src.num_params() / 1e9:.2f}B -> {plan.dst_args.num_params() / 1e9:.2f}B "
          f"({plan.dst_args.num_params(active=True) / 1e9:.2f}B active)")
