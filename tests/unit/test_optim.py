"""LR schedule values at chosen steps, and which parameters get weight decay."""

import math

import pytest

from titan_aquila.models.aquila import build_model
from titan_aquila.models.args import ModelArgs
from titan_aquila.optim import lr_multiplier, param_groups


def test_warmup_is_linear_and_never_zero():
    assert [lr_multiplier(s, 4, 20, None, "linear", 0.0) for s in (1, 2, 4)] == [0.2, 0.4, 0.8]


@pytest.mark.parametrize("kind,mid", [("linear", 0.5), ("sqrt", 1 - math.sqrt(0.5)), ("cosine", 0.5)])
def test_decay_shapes_reach_the_floor(kind, mid):
    # warmup 0, 10 steps: decay starts at step 0; step 5 is halfway, step 10 the end.
    assert lr_multiplier(5, 0, 10, None, kind, 0.0) == pytest.approx(mid)
    assert lr_multiplier(10, 0, 10, None, kind, 0.1) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    vals = [lr_multiplier(s, 2, 20, 0.25, "linear", 0.0) for s in range(1, 21)]
    assert vals[2:15] == [1.0] * 13  # steps 3..15 stable
    assert vals[15] == pytest.approx(0.8) and vals[19] == pytest.approx(0.0)  # 5 decay steps: 16..20


def test_weight_decay_only_on_matrices():
    model = build_model(ModelArgs(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=32, qkv_bias=True,
                                  n_experts=2, top_k=1, router_order="softmax_topk"))
    decay, no_decay = param_groups(model, 0.1)  # plain tensors: one group each
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3 + 3  # 3 norms + q/k/v biases
