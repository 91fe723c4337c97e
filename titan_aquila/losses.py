"""Fused, chunked output projection + cross-entropy: the [tokens, vocab] logits never exist in full.

For final hidden states h_n (n < N), output weight W [V, D] and labels y_n (y_n = -100: ignored):

    l_n   = W h_n                       computed for C tokens at a time, in the matmul dtype, then upcast to fp32
    CE    = 1/N' sum_{n: y_n valid} (logsumexp_v l_n,v - l_n,y_n)          N' = number of valid labels
    z     = 1/N  sum_n (max_v l_n,v)^2                                     ('output_max' z-loss; optional)

with the gradients (the loss is a scalar, so they are known up to the scalar dL/dCE while a chunk's logits exist):

    dCE/dl_n = (softmax(l_n) - onehot(y_n)) / N'          dz/dl_n = 2 max(l_n) onehot(argmax l_n) / N
    dh_n = (dL/dl_n) W          dW = sum over chunks of (dL/dl_chunk)^T h_chunk   (accumulated in fp32)

When a gradient is wanted, forward computes each chunk's CE gradient right after its logits (the three output
GEMMs of the plain path: l, dh, dW, and no fourth to recompute l in backward) and keeps dh [N, D] and dW [V, D] in
fp32; backward scales them by dL/dCE and adds the z term, which needs no logits: a gather of W's argmax rows for
dh, a scatter-add of h into them for dW. The peak extra memory is one chunk's C x V logits (+ their gradient) and
the weight-sized dW, instead of several N x V fp32 tensors (the plain path keeps the logits, their log-softmax and,
in backward, a gradient of the same size). The arithmetic is that of the plain path (`F.linear` then
`F.cross_entropy` on `.float()` logits): the same matmul dtype (the autocast dtype when autocast is on, else the
operands') and fp32 softmax, so the results agree to rounding. Under tensor parallelism
titan_aquila/parallel/loss_parallel.py runs the same computation on each rank's vocab rows of W (loss parallel).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default


def _matmul_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, w) would multiply in here: autocast's when it is on for this device type."""
    if torch.amp.is_autocast_available(h.device.type) and torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


def _no_autocast(device: torch.device):
    """Autocast off (on the meta device, where memory is counted, there is none to turn off)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LinearCrossEntropy(torch.autograd.Function):
    """(h [N, D], W [V, D], labels [N]) -> (CE mean over valid labels, output max-z mean over tokens)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_size: int, with_z: bool, dtype: torch.dtype, with_grad: bool):
        N, dev = h_ND.shape[0], h_ND.device
        w = w_VD.to(dtype)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        target = torch.zeros(N, dtype=torch.float32, device=dev)
        zmax = torch.zeros(N if with_z else 0, dtype=torch.float32, device=dev)
        argmax = torch.zeros(N if with_z else 0, dtype=torch.long, device=dev)
        valid = labels_N != IGNORE_INDEX
        n_valid = valid.sum()
        scale = valid.float() / n_valid  # dCE/dl factor per token: 0 for ignored labels
        safe_labels = torch.where(valid, labels_N, 0)
        dh = torch.empty(h_ND.shape, dtype=torch.float32, device=dev) if with_grad else None
        dw = torch.zeros(w_VD.shape, dtype=torch.float32, device=dev) if with_grad else None
        with _no_autocast(dev):  # the dtype is chosen above, explicitly
            for s in range(0, N, chunk_size):
                h = h_ND[s:s + chunk_size].to(dtype)
                y = safe_labels[s:s + chunk_size]
                logits = F.linear(h, w).float()
                target[s:s + chunk_size] = logits.gather(1, y[:, None]).squeeze(1)
                m, a = logits.max(dim=-1)
                if with_z:
                    zmax[s:s + chunk_size], argmax[s:s + chunk_size] = m, a
                # logsumexp as m + log sum exp(l - m), with exp(l - m) written over the logits: the chunk's only
                # C x V fp32 buffer (torch.logsumexp would allocate two more), and softmax = exp(l - m) / sum.
                e = logits.sub_(m[:, None]).exp_()
                total = e.sum(dim=-1)
                lse[s:s + chunk_size] = m + total.log()
                if with_grad:
                    g = e.mul_((scale[s:s + chunk_size] / total)[:, None])
                    g[torch.arange(h.shape[0], device=dev), y] -= scale[s:s + chunk_size]
                    g = g.to(dtype)
                    dh[s:s + chunk_size] = g @ w
                    if dtype == torch.float32:
                        dw.addmm_(g.t(), h)
                    else:  # no mixed-dtype addmm on CPU: the chunk's product is rounded to dtype, summed in fp32
                        dw += g.t() @ h
                    del g
                del logits, e  # before the next chunk's logits exist: one C x V buffer at a time, not two
        ce = torch.where(valid, lse - target, 0.0).sum() / n_valid
        z = zmax.pow(2).mean() if with_z else lse.new_zeros(())
        ctx.save_for_backward(h_ND, w_VD, dh, dw, zmax, argmax)
        ctx.with_z = with_z
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        h_ND, w_VD, dh_ce, dw_ce, zmax, argmax = ctx.saved_tensors
        assert dh_ce is not None, "linear_cross_entropy ran without gradients (no_grad or no input requiring grad)"
        # In place: no second weight-sized fp32 buffer. A second backward (retain_graph) is then refused by autograd's
        # version check on the saved tensors ("modified by an inplace operation").
        dh, dw = dh_ce.mul_(grad_ce), dw_ce.mul_(grad_ce)
        if ctx.with_z:
            # z's gradient touches one logit per token, the argmax: dl = c_n onehot(a_n), c_n = 2 max_n / N.
            c = (2.0 / h_ND.shape[0]) * grad_z * zmax
            dh += c[:, None] * w_VD[argmax].float()
            dw.index_add_(0, argmax, c[:, None] * h_ND.float())
        dh = dh.to(h_ND.dtype) if ctx.needs_input_grad[0] else None
        dw = dw.to(w_VD.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_size: int = 1024,
                         with_z: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, output max-z) of logits h W^T without materialising them; see the module docstring."""
    with_grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    return LinearCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_size, with_z, _matmul_dtype(h_ND, w_VD), with_grad)


class FusedOutputLoss:
    """The `head` the trainer hands to `Transformer.forward` for one micro-batch: called inside the model's forward
    with the final normed hidden states [B, T, D] and the output weight (so FSDP2 has it gathered, as for the
    plain output layer), it returns (CE, z) instead of logits."""

    def __init__(self, labels_BT: torch.Tensor, chunk_size: int, with_z: bool):
        self.labels_BT, self.chunk_size, self.with_z = labels_BT, chunk_size, with_z

    def __call__(self, h_BTD: torch.Tensor, w_VD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(h_BTD.flatten(0, 1), w_VD, self.labels_BT.flatten(), self.chunk_size,
                                    self.with_z)


def fused_loss_plan(cfg, model, tp_enabled: bool) -> tuple[bool, str]:
    """(use the fused path?, the start-up line saying which path and why). Under tensor parallelism the fused head
    is titan_aquila/parallel/loss_parallel.py's (vocab-parallel: each rank its slice of the vocabulary) unless
    parallelism.disable_loss_parallel asks for the output layer's gathered logits. A float8 output layer (removed
    from float8.filter_fqns) takes the plain path: the fused head multiplies by the weight itself, so it would
    silently skip the float8 rounding the user asked for."""
    t, plain = cfg.training, "plain output layer + cross-entropy"
    if not t.fused_linear_cross_entropy:
        return False, f"[loss] {plain} (training.fused_linear_cross_entropy = false)"
    if hasattr(model, "output") and type(model.output) is not torch.nn.Linear:
        return False, (f"[loss] fused linear + cross-entropy is off under the output layer's "
                       f"{type(model.output).__name__}: {plain}")
    chunks = f"{t.loss_chunk_size} tokens per chunk"
    if not tp_enabled:
        return True, f"[loss] fused chunked linear + cross-entropy, {chunks}"
    tp = cfg.parallelism.tensor_parallel_degree
    if cfg.parallelism.disable_loss_parallel:
        return False, (f"[loss] {plain}, the logits gathered over {tp} TP ranks "
                       f"(parallelism.disable_loss_parallel = true)")
    if model.args.tie_embeddings:
        return True, (f"[loss] fused chunked linear + cross-entropy, {chunks}, on every TP rank (the tied "
                      f"embedding table is replicated under tensor parallelism)")
    return True, (f"[loss] loss parallel: vocab-parallel fused chunked linear + cross-entropy over {tp} TP ranks, "
                  f"{chunks}; no rank holds logits over the whole vocabulary")
