"""The fused chunked linear + cross-entropy against the plain path (full logits, F.cross_entropy, max-z):
loss and gradients of h and W, chunk sizes that do and do not divide the tokens, ignored labels, z-loss, tied and
untied models, bf16 autocast, and the trainer's choice of path.

Tolerances: fp32 differs from the plain path only in summation order (chunked dW, logsumexp vs log_softmax):
rtol 1e-5 / atol 1e-6 on values of order 1e-1..10. bf16: both paths round the same bf16 GEMM operands, but the
chunked dW rounds each chunk's product to bf16 before the fp32 sum; tolerance 2 bf16 ulps relative (1.6e-2)."""

import types

import pytest
import torch
import torch.nn.functional as F

from titan_aquila.losses import FusedOutputLoss, fused_loss_plan, linear_cross_entropy
from titan_aquila.models.aquila import build_model
from titan_aquila.models.args import ModelArgs
from titan_aquila.train_utils import combine_loss, training_loss


def plain(h, w, labels, z_coef):
    logits = F.linear(h, w).float()
    ce = F.cross_entropy(logits, labels)
    z = logits.max(dim=-1).values.pow(2).mean()
    return ce, z, ce + z_coef * z


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("z_coef", [0.0, 0.3])
def test_fp32_loss_and_gradients_equal_the_plain_path(chunk, z_coef):
    torch.manual_seed(0)
    N, D, V = 37, 16, 53
    h = (torch.randn(N, D) * 2).requires_grad_()
    w = torch.randn(V, D).requires_grad_()
    labels = torch.randint(0, V, (N,))
    labels[[3, 20]] = -100  # ignored positions: out of the CE mean, still in the z mean (as F.cross_entropy)
    ce_ref, z_ref, loss_ref = plain(h, w, labels, z_coef)
    ce, z = linear_cross_entropy(h, w, labels, chunk_size=chunk, with_z=True)
    loss = ce + z_coef * z
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads(loss, h, w), grads(loss_ref, h, w)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_without_z_returns_zero_and_gradient_is_the_softmax_minus_onehot():
    torch.manual_seed(1)
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    labels = torch.tensor([0, 6, 2, 2, 5])
    ce, z = linear_cross_entropy(h, w, labels, chunk_size=2)
    assert z.item() == 0.0
    dh, dw = grads(ce, h, w)
    g = (F.linear(h, w).softmax(-1) - F.one_hot(labels, 7)) / 5  # d mean-CE / d logits, by hand
    torch.testing.assert_close(dh, g @ w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, g.T @ h, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    torch.manual_seed(2)
    N, D, V = 64, 32, 97
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_ref, z_ref, loss_ref = plain(h, w, labels, 0.1)
        ce, z = linear_cross_entropy(h, w, labels, chunk_size=16, with_z=True)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    got, ref = grads(ce + 0.1 * z, h, w), grads(loss_ref, h, w)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1.6e-2 * r.abs().max().item())


@pytest.mark.parametrize("tie", [False, True])
def test_model_head_equals_logits_then_training_loss(tie):
    """Whole model, every parameter's gradient: the fused head inside forward vs logits + training_loss."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=101, max_seq_len=16,
                     tie_embeddings=tie)
    model = build_model(args, seed=3)
    tokens, labels = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    logits, aux = model(tokens)
    loss_ref, parts_ref = training_loss(logits, labels, aux, 0.01, 1e-3, z_on_output=True)
    ref = grads(loss_ref, *model.parameters())
    (ce, z), aux = model(tokens, head=FusedOutputLoss(labels, chunk_size=5, with_z=True))
    loss, parts = combine_loss(ce, z, aux, 0.01, 1e-3)
    torch.testing.assert_close(parts, parts_ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), grads(loss, *model.parameters()), ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_choice_of_path():
    cfg = types.SimpleNamespace(training=types.SimpleNamespace(fused_linear_cross_entropy=True, loss_chunk_size=64),
                                parallelism=types.SimpleNamespace(tensor_parallel_degree=2, disable_loss_parallel=False))
    model = build_model(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32))
    assert fused_loss_plan(cfg, model, tp_enabled=False) == (
        True, "[loss] fused chunked linear + cross-entropy, 64 tokens per chunk")
    assert fused_loss_plan(cfg, model, tp_enabled=True) == (
        True, "[loss] loss parallel: vocab-parallel fused chunked linear + cross-entropy over 2 TP ranks, 64 tokens "
              "per chunk; no rank holds logits over the whole vocabulary")
    tied = build_model(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32,
                                 tie_embeddings=True))
    use, msg = fused_loss_plan(cfg, tied, tp_enabled=True)
    assert use and "on every TP rank (the tied embedding table is replicated" in msg
    cfg.parallelism.disable_loss_parallel = True
    assert fused_loss_plan(cfg, model, tp_enabled=True) == (False, "[loss] plain output layer + cross-entropy, the "
                                                            "logits gathered over 2 TP ranks "
                                                            "(parallelism.disable_loss_parallel = true)")
    assert fused_loss_plan(cfg, model, tp_enabled=False)[0]  # the option is about TP only
    cfg.training.fused_linear_cross_entropy = False
    assert not fused_loss_plan(cfg, model, tp_enabled=False)[0]
    assert not fused_loss_plan(cfg, model, tp_enabled=True)[0]


def test_no_grad_gives_the_loss_and_a_second_backward_is_refused():
    torch.manual_seed(4)
    h, w, labels = torch.randn(9, 8), torch.randn(11, 8), torch.randint(0, 11, (9,))
    with torch.no_grad():  # validation: loss only, no gradient buffers
        ce, _ = linear_cross_entropy(h.requires_grad_(), w, labels, chunk_size=4)
    torch.testing.assert_close(ce, F.cross_entropy(F.linear(h, w), labels), rtol=1e-5, atol=1e-6)
    ce, _ = linear_cross_entropy(h, w, labels, chunk_size=4)
    ce.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # kept gradients scaled in place
        ce.backward()


def test_validation_through_the_fused_head_equals_the_logits_path():
    """train.py's validation takes the fused head when training does: same token count, same loss (fp32 rounding),
    ignored labels left out of both the sum and the count."""
    from titan_aquila.evaluate import validation_loss

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=101, max_seq_len=16)
    model = build_model(args, seed=5)
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.randint(0, 101, (2, 16), generator=gen), torch.randint(0, 101, (2, 16), generator=gen))
               for _ in range(3)]
    batches[1][1][0, :5] = -100
    ref, n_ref = validation_loss(model, batches, torch.device("cpu"))
    fused, n = validation_loss(model, batches, torch.device("cpu"), head=lambda y: FusedOutputLoss(y, 7, False))
    assert n == n_ref == 96 - 5 and ref > 4.0  # ~ln 101 = 4.6 for a fresh model
    assert fused == pytest.approx(ref, rel=1e-6)
    assert validation_loss(model, batches, torch.device("cpu"), max_steps=1)[0] != pytest.approx(ref, rel=1e-4)
