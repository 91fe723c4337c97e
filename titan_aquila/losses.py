"""Fused, chunked output projection + cross-entropy: the [tokens, vocab] logits never exist in full.

For final hidden states h_n (n < N), output weight W [V, D] and labels y_n (y_n = -100: ignored):

    l_n   = W h_n                       computed for C tokens at a time, in the matmul dtype, then upcast to fp32
    lse_n = logsumexp_v l_n,v           kept: N floats
    CE    = 1/N' sum_{n: y_n valid} (lse_n - l_n,y_n)                      N' = number of valid labels
    z     = 1/N  sum_n (max_v l_n,v)^2                                     ('output_max' z-loss; optional)

Backward recomputes l per chunk (one extra output GEMM) and uses

    dCE/dl_n = (softmax(l_n) - onehot(y_n)) / N'          dz/dl_n = 2 max(l_n) onehot(argmax l_n) / N
    dh_n = (dL/dl_n) W          dW = sum over chunks of (dL/dl_chunk)^T h_chunk   (accumulated in fp32)

so the peak extra memory is one chunk's C x V logits (+ its gradient) instead of several N x V tensors: the plain
path keeps the fp32 logits, their log-softmax and, in backward, a gradient of the same size. The arithmetic is
that of the plain path (`F.linear` then `F.cross_entropy` on `.float()` logits): the same matmul dtype (the
autocast dtype when autocast is on, else the operands' dtype) and fp32 softmax, so the results agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default


def _matmul_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, w) would multiply in here: autocast's when it is on for this device type."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """(h [N, D], W [V, D], labels [N]) -> (CE mean over valid labels, output max-z mean over tokens)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_size: int, with_z: bool, dtype: torch.dtype):
        N = h_ND.shape[0]
        w = w_VD.to(dtype)
        lse = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        target = torch.zeros(N, dtype=torch.float32, device=h_ND.device)
        zmax = torch.zeros(N if with_z else 0, dtype=torch.float32, device=h_ND.device)
        argmax = torch.zeros(N if with_z else 0, dtype=torch.long, device=h_ND.device)
        valid = labels_N != IGNORE_INDEX
        safe_labels = torch.where(valid, labels_N, 0)
        with torch.autocast(h_ND.device.type, enabled=False):  # the dtype is chosen above, explicitly
            for s in range(0, N, chunk_size):
                logits = F.linear(h_ND[s:s + chunk_size].to(dtype), w).float()
                lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
                target[s:s + chunk_size] = logits.gather(1, safe_labels[s:s + chunk_size, None]).squeeze(1)
                if with_z:
                    zmax[s:s + chunk_size], argmax[s:s + chunk_size] = logits.max(dim=-1)
        n_valid = valid.sum()
        ce = torch.where(valid, lse - target, 0.0).sum() / n_valid
        z = zmax.pow(2).mean() if with_z else lse.new_zeros(())
        ctx.save_for_backward(h_ND, w_VD, safe_labels, valid, lse, zmax, argmax, n_valid)
        ctx.chunk_size, ctx.with_z, ctx.dtype = chunk_size, with_z, dtype
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        h_ND, w_VD, labels, valid, lse, zmax, argmax, n_valid = ctx.saved_tensors
        C, dtype, N = ctx.chunk_size, ctx.dtype, h_ND.shape[0]
        w = w_VD.to(dtype)
        dh = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if ctx.needs_input_grad[1] else None
        ce_scale = valid.float() * (grad_ce / n_valid)  # per-token factor: 0 for ignored labels
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, N, C):
                h = h_ND[s:s + C].to(dtype)
                rows = torch.arange(h.shape[0], device=h.device)
                g = F.linear(h, w).float()
                g.sub_(lse[s:s + C, None]).exp_().mul_(ce_scale[s:s + C, None])  # softmax, scaled
                g[rows, labels[s:s + C]] -= ce_scale[s:s + C]
                if ctx.with_z:
                    g[rows, argmax[s:s + C]] += (2.0 / N) * grad_z * zmax[s:s + C]
                g = g.to(dtype)
                if dh is not None:
                    dh[s:s + C] = g @ w
                if dw is not None:
                    dw += (g.t() @ h).float()
        return dh, (dw.to(w_VD.dtype) if dw is not None else None), None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_size: int = 1024,
                         with_z: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, output max-z) of logits h W^T without materialising them; see the module docstring."""
    return LinearCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_size, with_z, _matmul_dtype(h_ND, w_VD))


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
    """(use the fused path?, the start-up line saying which path and why). Tensor parallelism falls back to the
    plain path: its output layer is vocab-parallel (a DTensor weight and hooks on `output`), which the fused head
    would bypass. A float8 output layer (removed from float8.filter_fqns) does too: the fused head multiplies by the
    weight itself, so it would silently skip the float8 rounding the user asked for."""
    t = cfg.training
    if not t.fused_linear_cross_entropy:
        return False, "[loss] plain output layer + cross-entropy (training.fused_linear_cross_entropy = false)"
    reason = None
    if tp_enabled:
        reason = "tensor parallelism (vocab-parallel output layer)"
    elif hasattr(model, "output") and type(model.output) is not torch.nn.Linear:
        reason = f"the output layer is a {type(model.output).__name__}"
    if reason:
        return False, f"[loss] fused linear + cross-entropy is off under {reason}: plain output layer + cross-entropy"
    return True, f"[loss] fused chunked linear + cross-entropy, {t.loss_chunk_size} tokens per chunk"
