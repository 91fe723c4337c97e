"""Capacity-factor routing (models/capacity.py) against a naive per-token reference and a hand-built skewed router.

The reference is independent of the implementation: the keep rule is applied in plain Python (per expert, sort the
(weight, flat index) pairs, keep the first C), and the output is summed one token at a time from the kept slots.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.capacity import capacity_keep, expert_capacity, expert_counts
from titan_aquila.models.moe import MoE


def make_moe(E=4, k=2, D=16, Fe=24, order="topk_softmax", seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoE(ModelArgs(dim=D, n_heads=2, ffn_dim=Fe, n_experts=E, top_k=k, moe_ffn_dim=Fe, router_order=order,
                        **kw))
    moe.reset_parameters(0.3, 0.3)
    return moe


def with_capacity(moe: MoE, c, pad: bool = False, grouped: bool = True) -> MoE:
    """A copy of `moe` (same weights) with capacity factor c."""
    args = ModelArgs(dim=moe.router.weight.shape[1], n_heads=2, ffn_dim=moe.experts.w1.shape[1],
                     n_experts=moe.n_experts, top_k=moe.top_k, moe_ffn_dim=moe.experts.w1.shape[1],
                     router_order=moe.router.order, capacity_factor=c, pad_to_capacity=pad, use_grouped_mm=grouped)
    out = MoE(args)
    out.load_state_dict(moe.state_dict())
    return out


def route(moe: MoE, x_TD):
    """Per token: the top-k experts and their weights, from the router's own definition (no batching)."""
    idx, w = [], []
    for x in x_TD:
        z = moe.router.weight @ x
        if moe.router.order == "topk_softmax":
            i = torch.topk(z, moe.top_k).indices
            wi = z[i].softmax(-1)
        else:
            p = z.softmax(-1)
            i = torch.topk(p, moe.top_k).indices
            wi = p[i]
        idx.append(i.tolist())
        w.append(wi)
    return idx, w


def naive_keep(idx, w, E, C) -> set[tuple[int, int]]:
    """The rule in plain Python: per expert, highest weight first, ties by lower flat index t*k + i; first C kept."""
    k = len(idx[0])
    per_expert: dict[int, list] = {e: [] for e in range(E)}
    for t, (experts, weights) in enumerate(zip(idx, w)):
        for i, e in enumerate(experts):
            per_expert[e].append((-float(weights[i].detach()), t * k + i, (t, i)))
    return {a[2] for e in per_expert for a in sorted(per_expert[e])[:C]}


def naive_output(moe: MoE, x_TD, idx, w, kept):
    out = []
    for t, x in enumerate(x_TD):
        y = torch.zeros_like(x)
        for i, e in enumerate(idx[t]):
            if (t, i) in kept:
                ex = moe.experts
                y = y + w[t][i] * (ex.w2[e] @ (F.silu(ex.w1[e] @ x) * (ex.w3[e] @ x)))
        out.append(y)
    return torch.stack(out)


def grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


def params(moe):
    return [moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.router.weight]


def test_capacity_formula():
    assert expert_capacity(1.0, 2, 6, 4) == 3  # ceil(1 * 2 * 6 / 4)
    assert expert_capacity(1.25, 2, 64, 8) == 20
    assert expert_capacity(1.0, 2, 7, 4) == 4  # ceil(3.5)
    assert expert_capacity(1.1, 2, 40, 8) == 11  # 1.1 * 80 / 8 = 11.000000000000002 in binary: still 11
    assert expert_capacity(4.0, 2, 6, 4) == 6  # capped at T: no expert can get more than every token
    assert expert_capacity(0.01, 2, 6, 4) == 1


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_capacity_that_drops_nothing_equals_dropless_and_the_naive_loop(order, pad):
    """c = E/k gives C = T: nothing can drop. Unpadded, the kept rows take the dropless path's exact order, so the
    output and every gradient are bit-identical to dropless; padded (batched GEMMs over zero-padded groups) they
    agree to fp32 rounding. Both equal the per-token loop."""
    moe = make_moe(order=order)
    capped = with_capacity(moe, 2.0, pad=pad)
    x = torch.randn(2, 11, 16, requires_grad=True)
    y, aux = moe(x)
    yc, auxc = capped(x)
    g = torch.randn_like(y)
    ref_grads, cap_grads = grads(y, [x] + params(moe), g), grads(yc, [x] + params(capped), g)
    if pad:
        torch.testing.assert_close(yc, y, atol=1e-6, rtol=1e-6)
        for a, b in zip(cap_grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(yc, y)
        assert all(torch.equal(a, b) for a, b in zip(cap_grads, ref_grads))
    assert torch.equal(auxc, aux)
    assert capped.tokens_dropped.sum().item() == 0 and capped.tokens_per_expert.sum().item() == 2 * 11 * 2
    idx, w = route(moe, x.detach().view(-1, 16))
    kept = {(t, i) for t in range(22) for i in range(2)}
    torch.testing.assert_close(yc.detach().view(-1, 16), naive_output(moe, x.detach().view(-1, 16), idx, w, kept),
                               atol=1e-5, rtol=1e-5)


# Hand-built skew: E = 4, k = 2, T = 6, c = 1 -> C = ceil(1 * 2 * 6 / 4) = 3. The router weight is [I_4 | 0], so the
# router logits are the first 4 features of each token. Mixtral routing: the pair's weights are softmax of its
# two logits, w = sigmoid(logit difference).
LOGITS = [[3.0, 1.0, 0.0, -5.0],   # t0: e0 .881, e1 .119
          [2.0, 1.0, 0.0, -5.0],   # t1: e0 .731, e1 .269
          [4.0, 0.0, 1.0, -5.0],   # t2: e0 .953, e2 .047
          [2.0, 1.0, 0.0, -5.0],   # t3: same as t1, bit for bit (ties with t1 on e0 and on e1)
          [0.0, 3.0, 1.0, -5.0],   # t4: e1 .881, e2 .119
          [1.0, 1.0, -5.0, -5.0]]  # t5: e0 .5, e1 .5
# e0 is asked by t2 .953, t0 .881, t1 .731, t3 .731, t5 .5  -> keeps t2, t0, t1 (tie with t3: lower token first)
# e1 is asked by t4 .881, t5 .5, t1 .269, t3 .269, t0 .119  -> keeps t4, t5, t1 (tie with t3 again)
# e2 is asked by t4 .119, t2 .047 -> keeps both; e3 by nobody.
DROPPED = {(3, 0), (5, 0), (3, 1), (0, 1)}  # (token, expert): 4 of the 12 assignments; t3 loses both slots


def skewed_moe(pad: bool, grouped: bool):
    moe = make_moe(E=4, k=2, D=8, Fe=12, seed=3)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = torch.eye(4)
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(1))
    x[0, :, :4] = torch.tensor(LOGITS)
    return moe, with_capacity(moe, 1.0, pad=pad, grouped=grouped), x.requires_grad_()


@pytest.mark.parametrize("pad,grouped", [(False, True), (False, False), (True, True)],
                         ids=["grouped_mm", "per_expert_loop", "padded"])
def test_skewed_router_drops_exactly_what_the_rule_names(pad, grouped):
    moe, capped, x = skewed_moe(pad, grouped)
    idx, w = route(moe, x.detach()[0])
    names = {(t, idx[t][i]) for t in range(6) for i in range(2)}
    kept = {(t, i) for t in range(6) for i in range(2) if (t, idx[t][i]) not in DROPPED}
    assert DROPPED <= names and len(kept) == 8
    assert kept == naive_keep(idx, w, 4, 3)  # the plain-Python rule names the same set as the hand derivation
    assert capped.tokens_per_expert.sum() == 0
    y, aux = capped(x)
    assert capped.tokens_per_expert.tolist() == [5.0, 5.0, 2.0, 0.0]  # the routing before dropping
    assert capped.tokens_dropped.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert torch.equal(aux, moe(x)[1])  # aux losses see the routing before dropping
    x_ref = x.detach().clone().requires_grad_()
    ref = naive_output(moe, x_ref[0], *route(moe, x_ref[0]), kept).unsqueeze(0)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(y[0, 3], torch.zeros(8))  # every slot of t3 dropped: only the residual carries it
    g = torch.randn_like(y)
    got, want = grads(y, [x] + params(capped), g), grads(ref, [x_ref] + params(moe), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[0][0, 3], torch.zeros(8))  # no gradient reaches t3 through the experts or the router
    gw1 = got[1]
    assert gw1[3].abs().max() == 0 and gw1[0].abs().max() > 0  # e3 got nothing; e0 learns from its kept rows
    # dropping t3 and t5 from e0 is what changes its gradient: the dropless gradient of e0 differs
    full = grads(moe(x)[0], [moe.experts.w1], g)[0]
    assert (full[0] - gw1[0]).abs().max() > 1e-4


def test_keep_mask_ties_and_ranks():
    # expert 0 asked by n = 0, 2, 3, 5 with weights .5 .9 .5 .5 and C = 2: keeps n = 2 (highest) and n = 0 (lowest
    # index among the ties); expert 1 asked by n = 1, 4 only: both kept.
    experts = torch.tensor([0, 1, 0, 0, 1, 0])
    weights = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.2, 0.5])
    keep = capacity_keep(experts, weights, expert_counts(experts, 2), 2)
    assert keep.tolist() == [True, True, True, False, True, False]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_random_router_c1_matches_naive_rule(order, pad):
    moe = make_moe(E=8, k=2, order=order, seed=5)
    capped = with_capacity(moe, 1.0, pad=pad)
    x = torch.randn(1, 40, 16, requires_grad=True)
    y, _ = capped(x)
    x_ref = x.detach().clone().requires_grad_()
    idx, w = route(moe, x_ref[0])
    kept = naive_keep(idx, [wi.detach() for wi in w], 8, expert_capacity(1.0, 2, 40, 8))
    assert 0 < 80 - len(kept) == capped.tokens_dropped.sum().item()
    ref = naive_output(moe, x_ref[0], idx, w, kept).unsqueeze(0)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(grads(y, [x] + params(capped), g), grads(ref, [x_ref] + params(moe), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padded_layer_compiles_as_one_graph_and_equals_eager():
    """Padding makes every shape static: the whole layer (routing, capacity, experts, combine) traces with
    fullgraph=True, no graph break, and computes the same numbers."""
    moe = make_moe(E=4, k=2, seed=2)
    eager, compiled = with_capacity(moe, 1.0, pad=True), with_capacity(moe, 1.0, pad=True)
    compiled = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(compiled(x)[0], eager(x)[0], atol=0, rtol=0)


def test_bad_capacity_settings():
    base = dict(dim=16, n_heads=2, ffn_dim=24, n_experts=4, top_k=2)
    with pytest.raises(UserError, match="moe.capacity_factor must be none or >= 0"):
        ModelArgs(**base, capacity_factor=-1.0).validate()
    with pytest.raises(UserError, match="moe.capacity_factor must be none or >= 0"):
        ModelArgs(**base, capacity_factor=math.inf).validate()
    with pytest.raises(UserError, match="pad_to_capacity needs moe.capacity_factor > 0"):
        ModelArgs(**base, capacity_factor=0.0, pad_to_capacity=True).validate()
    assert make_moe(capacity_factor=0.0).capacity_factor is None  # 0 = dropless
