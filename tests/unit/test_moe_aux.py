"""MoE auxiliary losses over layers (Megatron convention: summed) and the top_k = 1 router guard."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.errors import UserError
from titan_aquila.models.aquila import build_model
from titan_aquila.models.args import ModelArgs
from titan_aquila.train_utils import aux_coefficients, training_loss


def _coeffs(args: ModelArgs, reduction: str, kind: str = "router_lse"):
    moe = types.SimpleNamespace(load_balance_coeff=1e-3, z_loss_coeff=1e-2, aux_loss_reduction=reduction)
    return aux_coefficients(moe, args.replace(z_loss_type=kind))


def _hand_aux(x_TD: torch.Tensor, w_ED: torch.Tensor, k: int) -> tuple[float, float]:
    """One layer by hand, token by token: lb = E/(kT) sum_i count_i P_i, z = mean_t logsumexp(z_t)^2."""
    T, E = x_TD.shape[0], w_ED.shape[0]
    counts, P, z = [0.0] * E, [0.0] * E, 0.0
    for t in range(T):
        logits = [float(sum(w_ED[e, d] * x_TD[t, d] for d in range(x_TD.shape[1]))) for e in range(E)]
        m = max(logits)
        s = sum(torch.tensor(v - m).exp().item() for v in logits)
        for e in range(E):
            P[e] += torch.tensor(logits[e] - m).exp().item() / s / T
        for e in sorted(range(E), key=lambda e: -logits[e])[:k]:
            counts[e] += 1
        z += (m + torch.tensor(s).log().item()) ** 2 / T
    return E / (k * T) * sum(c * p for c, p in zip(counts, P)), z


def test_multi_layer_aux_is_the_sum_of_hand_computed_layers():
    args = ModelArgs(dim=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=64, n_experts=4, top_k=2,
                     moe_ffn_dim=8, init_std=0.3, max_seq_len=16).validate()
    model = build_model(args, seed=0)
    inputs = {}
    for l, block in model.layers.items():  # the router's input of each MoE layer
        block.moe.register_forward_pre_hook(lambda mod, a, l=l: inputs.__setitem__(l, a[0].reshape(-1, 16).detach()))
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    logits, aux = model(tokens)
    hand = [_hand_aux(inputs[l].double(), model.layers[l].moe.router.weight.detach().double(), 2) for l in "012"]
    lb_sum, z_sum = sum(h[0] for h in hand), sum(h[1] for h in hand)
    assert min(h[0] for h in hand) > 1.0 and max(h[1] for h in hand) > 0.1  # non-trivial layers, all different
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    loss, parts = training_loss(logits, labels, aux, *_coeffs(args, "sum"))
    assert loss.item() == pytest.approx(ce + 1e-3 * lb_sum + 1e-2 * z_sum, rel=1e-6, abs=1e-6)
    assert parts[1].item() == pytest.approx(lb_sum / 3, rel=1e-5)  # logged: the per-layer mean (1 = uniform)
    assert parts[2].item() == pytest.approx(z_sum / 3, rel=1e-5)
    loss, _ = training_loss(logits, labels, aux, *_coeffs(args, "mean"))
    assert loss.item() == pytest.approx(ce + 1e-3 * lb_sum / 3 + 1e-2 * z_sum / 3, rel=1e-6, abs=1e-6)
    # Baichuan's output max-z is one LM-head term, not per layer; the load balance is still summed.
    loss, parts = training_loss(logits, labels, aux, *_coeffs(args, "sum", "output_max"))
    zmax = logits.float().max(-1).values.pow(2).mean().item()
    assert loss.item() == pytest.approx(ce + 1e-3 * lb_sum + 1e-2 * zmax, rel=1e-6)


def test_top1_with_topk_softmax_is_refused():
    with pytest.raises(UserError, match="use router_order = 'softmax_topk'") as e:
        ModelArgs(dim=16, n_layers=1, n_heads=2, ffn_dim=32, n_experts=4, top_k=1).validate()
    assert "\n" not in str(e.value)
    ModelArgs(dim=16, n_layers=1, n_heads=2, ffn_dim=32, n_experts=4, top_k=1, router_order="softmax_topk").validate()
