"""Streaming growth (growth/stream.py) against `apply_growth` on the whole source: bit-identical for every method
family and their compositions (noise, Drop-Upcycling, granularity, shared experts included), while each group
reads only the source tensors of the layers it is made from."""

import pytest
import torch

from titan_aquila.checkpoint.storage import read_model_state_dict, write_model_checkpoint
from titan_aquila.growth import GrowthOptions, apply_growth, materialize, plan_growth
from titan_aquila.growth import stream as stream_mod
from titan_aquila.growth.stream import GrowthStream
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

SRC = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, qkv_bias=True)
WIDE = dict(dim=64, n_heads=8, ffn_dim=96)
CASES = {
    "exact": (["exact"], dict(dim=48, n_heads=6, ffn_dim=64), {}),  # padding init from the source's std
    "exact+upcycle": (["exact", "upcycle"], dict(dim=80, n_heads=10, ffn_dim=72, n_experts=4, top_k=2,
                                                 moe_ffn_dim=72), {}),
    "aki+noise": (["aki"], WIDE, {"noise_std": 0.01}),
    "stack+noise": (["stack"], dict(n_layers=6), {"noise_std": 0.01}),
    "zero": (["zero"], dict(n_layers=5), {}),
    "fpi+drop_upcycle": (["fpi", "upcycle"], {**WIDE, "n_experts": 4, "top_k": 2, "moe_ffn_dim": 96},
                         {"drop_ratio": 0.5}),
    "aki_pro+fine_grained": (["aki_pro", "upcycle"],
                             {**WIDE, "n_layers": 4, "n_experts": 4, "top_k": 2, "moe_ffn_dim": 48,
                              "n_shared_experts": 1, "shared_expert_gate": True},
                             {"granularity": 2, "noise_std": 0.01}),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_model_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", build_model(SRC, seed=1).state_dict(),
                                  SRC, {})


@pytest.mark.parametrize("case", list(CASES))
def test_stream_equals_whole_model_growth(source, monkeypatch, case):
    methods, target, options = CASES[case]
    opts = GrowthOptions(seed=3, **options)
    plan = plan_growth(methods, SRC, SRC.replace(**target), opts)
    want = apply_growth(plan, read_model_state_dict(source), opts)
    reads: list[list[str]] = []

    def counting_read(path, keys=None, **kw):
        reads.append(list(keys))
        return read_model_state_dict(path, keys=keys, **kw)

    monkeypatch.setattr(stream_mod, "read_model_state_dict", counting_read)
    got = {}
    for group in GrowthStream(plan, source, opts).groups():
        assert len({k.split(".")[1] if k.startswith("layers.") else "" for k in group}) == 1  # one layer a group
        got.update(group)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        a, b = materialize(v), materialize(got[k])
        assert a.dtype == b.dtype and torch.equal(a, b), k
    per_layer = len(read_model_state_dict(source, keys=None)) // SRC.n_layers
    for keys in reads:  # a destination layer is made from at most two source layers (AKI: l and l+1)
        layers = {k.split(".")[1] for k in keys if k.startswith("layers.")}
        assert len(layers) <= 2 and (not layers or len(keys) <= 2 * per_layer), keys
    n_read = sum(len(k) for k in reads)
    assert n_read <= 2 * len(read_model_state_dict(source)), n_read  # each source tensor read at most twice


def test_dependencies_are_the_tensors_each_destination_is_made_from(source):
    opts = GrowthOptions(seed=3)
    plan = plan_growth(["aki_pro", "upcycle"], SRC,
                       SRC.replace(**WIDE, n_layers=5, n_experts=4, top_k=2, moe_ffn_dim=96), opts)
    needs = GrowthStream(plan, source, opts).needs
    # interpolate 3 -> 5: target layer 1 copies source layer (1*3)//5 = 0, whose AKI new heads come from layer 1
    assert needs["layers.1.attention.wq.weight"] == {"layers.0.attention.wq.weight", "layers.1.attention.wq.weight"}
    assert needs["layers.4.attention.wk.weight"] == {"layers.2.attention.wk.weight"}  # FPI only: one tensor
    assert needs["tok_embeddings.weight"] == {"tok_embeddings.weight"}
    assert needs["layers.1.moe.router.weight"] == set()  # freshly drawn
    assert needs["layers.4.moe.experts.w2"] == {f"layers.2.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}


def test_deferred_write_computes_each_group_once_and_writes_the_grown_tensors(source, tmp_path, monkeypatch):
    methods, target, options = CASES["aki_pro+fine_grained"]
    opts = GrowthOptions(seed=3, **options)
    plan = plan_growth(methods, SRC, SRC.replace(**target), opts)
    stream = GrowthStream(plan, source, opts)
    computed = []
    compute = stream.compute
    monkeypatch.setattr(stream, "compute", lambda g, cache=None: computed.append(g) or compute(g, cache))
    path = write_model_checkpoint(tmp_path / "grown", stream.deferred_state_dict(), plan.dst_args, {})
    assert computed == sorted(set(computed))  # DCP asked group by group: no group computed twice
    got = read_model_state_dict(path)
    want = apply_growth(plan, read_model_state_dict(source), opts)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], materialize(v)) for k, v in want.items())


def test_a_transform_that_needs_values_falls_back_to_whole_model_growth(source, monkeypatch):
    """A transform that reads a tensor's value as a Python number (`.item()`) cannot run on shapes only: the loader
    then grows the whole model instead (correct, not streamed), with a warning."""
    from titan_aquila.growth import width
    from titan_aquila.growth.loader import growth_stream

    def item_std_init(w, source, g, gen):
        return w.mul_(source.float().std().item())  # a value the shape-only pass does not have

    monkeypatch.setattr(width, "init_padding_columns_", item_std_init)
    opts = GrowthOptions(seed=3)
    plan = plan_growth(["exact"], SRC, SRC.replace(dim=48, n_heads=6, ffn_dim=64), opts)
    with pytest.raises(RuntimeError, match="meta"):
        GrowthStream(plan, source, opts)
    assert growth_stream(plan, source, opts) is None


def test_a_group_draws_real_random_shares_only_for_its_own_layer(source, monkeypatch):
    """FPI's random split shares (and the noise) of layers outside the group are drawn on meta: a real draw per layer
    per pass would make streaming quadratic in depth (54 layers: ~5x slower, measured)."""
    opts = GrowthOptions(seed=3, noise_std=0.01)
    plan = plan_growth(["fpi"], SRC, SRC.replace(**WIDE), opts)
    stream = GrowthStream(plan, source, opts)
    real: list[tuple[int, ...]] = []
    for fn in ("rand", "randn"):
        orig = getattr(torch, fn)

        def counted(*a, _orig=orig, **kw):
            out = _orig(*a, **kw)
            if not out.is_meta and out.numel() > 1:
                real.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, fn, counted)
    one_layer = stream.compute(1)
    split = sum(k.startswith("layers.1.") and v.dim() == 2 for k, v in one_layer.items())
    # each 2-D tensor of the layer: its share draw(s) + its noise; never more than 3 per tensor, and none of another
    # layer (3 layers here: a leak would at least triple the count)
    assert 0 < len(real) <= 3 * split, real
