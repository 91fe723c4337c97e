"""Loss parallel: the fused chunked output projection + cross-entropy of titan_aquila/losses.py on a vocab-parallel
output layer. No rank ever holds logits over the whole vocabulary, and no rank gathers the output weight.

Under tensor parallelism of degree t, TP rank r holds the output weight's rows [s_r, s_r + V_r) (W_r, a Shard(0)
DTensor). The final hidden states h [N, D] are made whole on every TP rank first (with sequence parallelism they
arrive as Shard(1) and are all-gathered). For each chunk of tokens, with l^r_n = W_r h_n the rank's logit slice:

    m_n     = max_r max_{v in r} l^r_n,v                      all-reduce MAX of each rank's row max
    S_n     = sum_r sum_{v in r} exp(l^r_n,v - m_n)           all-reduce SUM
    l_n,y   = sum_r [y_n in r] l^r_n,y_n                      all-reduce SUM (only the label's owner adds a value)
    lse_n   = m_n + log S_n          CE = 1/N' sum_{n: y_n valid} (lse_n - l_n,y_n)          z = 1/N sum_n m_n^2

(the two sums travel in one all-reduce). The gradient of the logits splits by vocab slice like the logits:

    dCE/dl^r_n = (exp(l^r_n - m_n) / S_n - onehot_r(y_n)) / N'    (onehot_r: zero unless rank r owns y_n)
    dz/dl^r_n  = 2 m_n onehot_r(a_n) / N,   a_n = the smallest vocab index whose logit is m_n (all-reduce MIN of the
                 ranks' candidates), so exactly one rank owns each token's z gradient, even on a tie
    dW_r = sum_chunks (dL/dl^r)^T h      local rows only: no communication
    dh   = sum_r (dL/dl^r) W_r          each rank's term is partial; the sum over the TP group is done by DTensor
                                         in backward: an all-reduce, or a reduce-scatter back to Shard(1) under SP

These are the plain path's formulas with the vocabulary sums split across ranks, so loss and gradients equal the
single-process result to fp32 rounding. Each rank computes the chunk's CE gradient in forward right after its logits,
as losses.py does, and keeps its partial dh [N, D] and its dW_r in fp32. A replicated output weight (tied
embeddings stay replicated under TP, parallel/tensor_parallel.py) takes the ordinary fused path on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from titan_aquila.losses import IGNORE_INDEX, FusedOutputLoss, _matmul_dtype, _no_autocast


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """(h [N, D] whole, W_r [V_r, D] this rank's rows starting at `vocab_start`, labels [N]) -> (CE, z), identical on
    every rank of `group`; backward returns this rank's partial dh and its exact dW_r."""

    @staticmethod
    def forward(ctx, h_ND, w_local, labels_N, vocab_start: int, group, chunk_size: int, with_z: bool,
                dtype: torch.dtype, with_grad: bool):
        N, dev, V_r = h_ND.shape[0], h_ND.device, w_local.shape[0]
        w = w_local.to(dtype)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        target = torch.empty(N, dtype=torch.float32, device=dev)
        zmax = torch.empty(N if with_z else 0, dtype=torch.float32, device=dev)
        argmax = torch.empty(N if with_z else 0, dtype=torch.long, device=dev)  # global vocab index
        valid = labels_N != IGNORE_INDEX
        n_valid = valid.sum()
        scale = valid.float() / n_valid
        local_y = labels_N - vocab_start
        owns = valid & (local_y >= 0) & (local_y < V_r)  # this rank holds the label's row
        safe_y = torch.where(owns, local_y, 0)
        own_scale = torch.where(owns, scale, 0.0)  # the onehot part of the gradient, on the owner only
        dh = torch.empty(h_ND.shape, dtype=torch.float32, device=dev) if with_grad else None
        dw = torch.zeros(w_local.shape, dtype=torch.float32, device=dev) if with_grad else None
        no_label = torch.iinfo(torch.long).max
        with _no_autocast(dev):
            for s in range(0, N, chunk_size):
                sl = slice(s, s + chunk_size)
                h = h_ND[sl].to(dtype)
                logits = F.linear(h, w).float()
                m_local, a_local = logits.max(dim=-1)
                m = m_local.clone()
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                if with_z:  # the lowest global index holding the global max: one owner per token
                    a = torch.where(m_local == m, a_local + vocab_start, no_label)
                    dist.all_reduce(a, op=dist.ReduceOp.MIN, group=group)
                    zmax[sl], argmax[sl] = m, a
                tgt = torch.where(owns[sl], logits.gather(1, safe_y[sl, None]).squeeze(1), 0.0)
                e = logits.sub_(m[:, None]).exp_()  # in place: one C x V_r fp32 buffer per chunk
                sums = torch.stack([e.sum(dim=-1), tgt])
                dist.all_reduce(sums, group=group)
                total, target[sl] = sums[0], sums[1]
                lse[sl] = m + total.log()
                if with_grad:
                    g = e.mul_((scale[sl] / total)[:, None])
                    g[torch.arange(h.shape[0], device=dev), safe_y[sl]] -= own_scale[sl]  # - 0 elsewhere: exact
                    g = g.to(dtype)
                    dh[sl] = g @ w
                    if dtype == torch.float32:
                        dw.addmm_(g.t(), h)
                    else:  # no mixed-dtype addmm on CPU (as in losses.py)
                        dw += g.t() @ h
                    del g
                del logits, e
        ce = torch.where(valid, lse - target, 0.0).sum() / n_valid
        z = zmax.pow(2).mean() if with_z else lse.new_zeros(())
        ctx.save_for_backward(h_ND, w_local, dh, dw, zmax, argmax)
        ctx.with_z, ctx.vocab_start = with_z, vocab_start
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        h_ND, w_local, dh_ce, dw_ce, zmax, argmax = ctx.saved_tensors
        assert dh_ce is not None, "the vocab-parallel loss ran without gradients"
        dh, dw = dh_ce.mul_(grad_ce), dw_ce.mul_(grad_ce)  # in place, as in losses.py
        if ctx.with_z:
            local_a = argmax - ctx.vocab_start
            owns = (local_a >= 0) & (local_a < w_local.shape[0])
            c = torch.where(owns, (2.0 / h_ND.shape[0]) * grad_z * zmax, 0.0)  # 0 where another rank owns a_n
            local_a = torch.where(owns, local_a, 0)
            dh += c[:, None] * w_local[local_a].float()
            dw.index_add_(0, local_a, c[:, None] * h_ND.float())
        dh = dh.to(h_ND.dtype) if ctx.needs_input_grad[0] else None
        dw = dw.to(w_local.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None


def vocab_shard(w: DTensor) -> tuple[object, int]:
    """(the TP mesh, the first vocab row this rank holds) of an output weight split by rows (Shard(0), torch.chunk
    sizes: ceil(V/t) rows per rank, fewer on the last)."""
    mesh = w.device_mesh
    if mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
        raise ValueError(f"vocab-parallel loss expects the output weight as Shard(0) on a 1-D TP mesh, got "
                         f"{tuple(w.placements)} on a {mesh.ndim}-D mesh")
    V, t = w.shape[0], mesh.size()
    rows = -(-V // t)
    start = min(mesh.get_local_rank() * rows, V)
    assert w.to_local().shape[0] == min(rows, V - start), "unexpected Shard(0) row split"
    return mesh, start


def whole_on_every_rank(h: torch.Tensor, mesh) -> torch.Tensor:
    """h as a plain tensor holding every token on each TP rank, whose gradient is declared partial: autograd sums
    it over the TP group (an all-reduce for replicated h; a reduce-scatter for Shard(1) h under SP)."""
    if isinstance(h, DTensor):
        h = h.redistribute(h.device_mesh, [Replicate()])
    else:
        h = DTensor.from_local(h, mesh, [Replicate()], run_check=False)
    return h.to_local(grad_placements=[Partial()])


class VocabParallelOutputLoss(FusedOutputLoss):
    """The trainer's `head` under tensor parallelism: the vocab-parallel fused loss when the output weight is split
    over the TP ranks, the ordinary fused loss when it is replicated (tied embeddings)."""

    def __call__(self, h_BTD: torch.Tensor, w_VD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(w_VD, DTensor):
            return super().__call__(h_BTD, w_VD)
        mesh, start = vocab_shard(w_VD)
        h = whole_on_every_rank(h_BTD, mesh).flatten(0, 1)
        w = w_VD.to_local()  # its gradient becomes the Shard(0) gradient of the parameter
        with_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
        return VocabParallelLinearCrossEntropy.apply(h, w, self.labels_BT.flatten(), start, mesh.get_group(),
                                                     self.chunk_size, self.with_z, _matmul_dtype(h, w), with_grad)
