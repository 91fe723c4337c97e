"""Initial weights from (seed, name, row block) generators: any row range equals the same rows of the full tensor,
so a rank that draws only its shard gets what one process gets (tests/integration/test_sharded_init.py runs the
sharded side)."""

import math

import pytest
import torch

from titan_aquila.models import init as init_mod
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model
from titan_aquila.models.init import LazyInit, init_rule

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, qkv_bias=True,
                 n_experts=4, top_k=2, moe_ffn_dim=24, n_shared_experts=1, shared_expert_gate=True, init_std=0.05)


@pytest.mark.parametrize("shape", [(10, 7), (6, 3, 5), (13,)])
def test_any_row_range_is_the_same_rows_of_the_full_tensor(monkeypatch, shape):
    monkeypatch.setattr(init_mod, "BLOCK_ELEMENTS", 12)  # blocks of 1..4 rows: ranges cross block boundaries
    value = LazyInit("w", shape, torch.float32, seed=5, kind="normal", std=1.0)
    full = value.build()
    assert full.shape == shape and value.rows_per_block == max(1, 12 // math.prod(shape[1:]))
    for start in range(shape[0] + 1):
        for stop in range(start, shape[0] + 1):
            assert torch.equal(value.build(start, stop), full[start:stop])
    other = LazyInit("v", shape, torch.float32, seed=5, kind="normal", std=1.0).build()
    assert not torch.equal(other, full)  # another name, another stream


def test_rules_and_statistics():
    model = build_model(ARGS, seed=3)
    sd = model.state_dict()
    out_std = ARGS.init_std / math.sqrt(2 * ARGS.n_layers)
    assert init_rule("layers.0.attention.wo.weight", ARGS) == ("normal", out_std)
    assert init_rule("layers.1.moe.experts.w2", ARGS) == ("normal", out_std)
    assert init_rule("layers.1.moe.shared_expert.w2.weight", ARGS) == ("normal", out_std)
    assert init_rule("layers.0.moe.router.weight", ARGS) == ("normal", ARGS.init_std)
    for name, t in sd.items():
        kind, std = init_rule(name, ARGS)
        if kind == "ones":
            assert torch.equal(t, torch.ones_like(t)), name
        elif kind == "zeros":
            assert torch.equal(t, torch.zeros_like(t)), name
        elif t.numel() >= 2000:  # std of >= 2000 normal draws is within 6% of the target
            assert abs(t.std().item() / std - 1) < 0.06 and abs(t.mean().item()) < 4 * std / math.sqrt(t.numel())
    assert sd["layers.0.attention.wq.bias"].abs().sum() == 0 and sd["layers.0.moe.expert_bias"].abs().sum() == 0


def test_same_seed_same_model_and_meta_to_empty_init_equals_build():
    a, b = build_model(ARGS, seed=3).state_dict(), build_model(ARGS, seed=3).state_dict()
    c = build_model(ARGS, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_embeddings.weight"], c["tok_embeddings.weight"])
    m = build_model(ARGS, "meta")
    m.to_empty(device="cpu")
    m.init_weights(3)
    assert all(torch.equal(a[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m.rope_cos, build_model(ARGS, seed=3).rope_cos) and m.rope_cos.abs().sum() > 0
