"""MoE layer against a naive per-token loop; auxiliary losses against hand computation; exact upcycling identities."""

import math

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.models.aquila import FeedForward
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.moe import GroupedExperts, MoE, expert_swiglu, load_balance_loss, router_z_loss


def make_moe(order="topk_softmax", E=4, k=2, D=16, Fe=24, shared=0, seed=0, grouped=True):
    torch.manual_seed(seed)
    args = ModelArgs(dim=D, n_heads=2, ffn_dim=Fe, n_experts=E, top_k=k, moe_ffn_dim=Fe, router_order=order,
                     n_shared_experts=shared, use_grouped_mm=grouped)
    moe = MoE(args)
    moe.reset_parameters(0.3, 0.3)
    return moe


def naive_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """One token at a time: route, then sum the chosen experts' SwiGLU outputs."""
    out = []
    for x in x_TD:
        z = moe.router.weight @ x
        if moe.router.order == "topk_softmax":
            idx = torch.topk(z, moe.top_k).indices
            w = z[idx].softmax(-1)
        else:
            p = z.softmax(-1)
            idx = torch.topk(p, moe.top_k).indices
            w = p[idx]
        y = sum(wi * (moe.experts.w2[e] @ (F.silu(moe.experts.w1[e] @ x) * (moe.experts.w3[e] @ x)))
                for wi, e in zip(w, idx.tolist()))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_forward_and_backward_match_naive_loop(grouped, order):
    """torch._grouped_mm (grouped) and the per-expert loop both equal one-token-at-a-time routing, fp32:
    outputs to 1e-5 (abs and rel), gradients of x, w1, w2 and the router to 1e-5 abs / 1e-4 rel."""
    moe = make_moe(order=order, grouped=grouped)
    x = torch.randn(2, 11, 16, requires_grad=True)
    y, _ = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_moe(moe, x_ref.view(-1, 16)).view(2, 11, 16)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, moe.experts.w1, moe.experts.w2, moe.router.weight], g)
    ref_grads = torch.autograd.grad(ref, [x_ref, moe.experts.w1, moe.experts.w2, moe.router.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grouped_and_loop_paths_agree_exactly_enough():
    x = torch.randn(3, 8, 16)
    a, _ = make_moe(grouped=True, seed=3)(x)
    b, _ = make_moe(grouped=False, seed=3)(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_load_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 1], [1, 2]])
    # Switch/GShard: lb = E/(T k) * sum_i count_i * P_i, counts = [1, 2, 1], P = mean probs = [0.4, 0.4, 0.2]
    # -> 3/4 * (0.4 + 0.8 + 0.2) = 1.05
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.05, abs=1e-6)


def test_uniform_routing_gives_load_balance_one():
    E, k, T = 4, 2, 8
    probs = torch.full((T, E), 1 / E)
    idx = torch.tensor([[(t + j) % E for j in range(k)] for t in range(T)])  # every expert gets T*k/E slots
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-7)


def test_router_z_losses():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    lse = torch.log(torch.exp(z).sum(-1))
    torch.testing.assert_close(router_z_loss(z, "router_lse"), (lse ** 2).mean())
    torch.testing.assert_close(router_z_loss(z, "router_max"), torch.tensor((9.0 + 0.25) / 2))
    assert router_z_loss(z, "output_max").item() == 0.0


def test_aux_losses_returned_by_the_layer():
    moe = make_moe(E=4, k=2)
    x = torch.randn(1, 10, 16)
    _, aux = moe(x)
    logits = x.view(-1, 16) @ moe.router.weight.T
    idx = torch.topk(logits, 2).indices
    torch.testing.assert_close(aux[0], load_balance_loss(logits.softmax(-1), idx))
    torch.testing.assert_close(aux[1], (torch.logsumexp(logits, -1) ** 2).mean())


def _identical_experts(order):
    moe = make_moe(order=order, E=4, k=2, Fe=24)
    ffn = FeedForward(16, 24)
    with torch.no_grad():
        for e in range(4):
            moe.experts.w1[e].copy_(ffn.w1.weight)
            moe.experts.w2[e].copy_(ffn.w2.weight)
            moe.experts.w3[e].copy_(ffn.w3.weight)
    return moe, ffn


def test_topk_then_softmax_with_identical_experts_equals_dense():
    moe, ffn = _identical_experts("topk_softmax")
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(moe(x)[0], ffn(x), atol=1e-5, rtol=1e-5)


def test_softmax_then_topk_scales_dense_by_selected_mass():
    moe, ffn = _identical_experts("softmax_topk")
    x = torch.randn(2, 9, 16)
    p = (x @ moe.router.weight.T).softmax(-1)
    mass = torch.topk(p, 2).values.sum(-1, keepdim=True)
    torch.testing.assert_close(moe(x)[0], mass * ffn(x), atol=1e-5, rtol=1e-5)


def test_expert_bias_changes_selection_not_weights():
    moe, ffn = _identical_experts("topk_softmax")
    x = torch.randn(1, 20, 16)
    moe.tokens_per_expert.zero_()
    moe.expert_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))  # force experts 0 and 1
    y, _ = moe(x)
    assert moe.tokens_per_expert.tolist() == [20.0, 20.0, 0.0, 0.0]
    logits = x.view(-1, 16) @ moe.router.weight.T
    w = logits[:, :2].softmax(-1)  # weights from the unbiased logits of the chosen pair
    ref = sum(w[:, j:j + 1] * ffn(x.view(-1, 16)) for j in range(2))
    torch.testing.assert_close(y.view(-1, 16), ref, atol=1e-5, rtol=1e-5)


def test_tokens_per_expert_counts_every_slot():
    moe = make_moe(E=4, k=2)
    moe.tokens_per_expert.zero_()
    moe(torch.randn(3, 7, 16))
    assert moe.tokens_per_expert.sum().item() == 3 * 7 * 2


def test_shared_expert_is_added():
    moe = make_moe(E=4, k=2, shared=1)
    x = torch.randn(1, 5, 16)
    routed = naive_moe(moe, x.view(-1, 16)).view(1, 5, 16)
    torch.testing.assert_close(moe(x)[0], routed + moe.shared_expert(x), atol=1e-5, rtol=1e-5)
    assert math.isfinite(moe(x)[1].sum().item())


@pytest.mark.parametrize("grouped", [True, False])
def test_experts_under_bf16_autocast_multiply_in_bf16(grouped):
    """torch._grouped_mm is on no autocast list: the experts cast to the autocast dtype themselves, so under bf16
    autocast they give exactly the explicit bf16 computation (not the fp32 one), and fp32 weight gradients."""
    torch.manual_seed(0)
    experts = GroupedExperts(16, 32, 4, use_grouped_mm=grouped)
    experts.reset_parameters(0.3, 0.3)
    x, counts = torch.randn(10, 16), torch.tensor([3, 0, 5, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts)
    want = expert_swiglu(x.bfloat16(), experts.w1.bfloat16(), experts.w2.bfloat16(), experts.w3.bfloat16(), counts,
                         grouped)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert experts.w1.grad.dtype == torch.float32 and experts.w1.grad.abs().sum() > 0
