"""Capacity-factor routing (token dropping): a fixed budget of (token, slot) assignments per expert.

A micro-batch of T tokens (this rank's tokens under expert parallelism, as Megatron counts them) routed top-k over
E experts makes T·k assignments (t, i) -> expert e(t, i) with router weight w(t, i) (the weight that multiplies the
expert's output). With capacity factor c > 0, expert e accepts at most

    C = min(ceil(c · k · T / E), T)

of the assignments routed to it (no expert can receive more than T: a token picks distinct experts, so c >= E/k
drops nothing). An over-full expert keeps the C assignments with the highest w; equal weights keep the lower
flat index t·k + i first (the earlier token). A dropped assignment contributes nothing, forward or backward:

    y(x_t) = sum over kept (t, i) of w(t, i) · Expert_{e(t, i)}(x_t)      (+ shared expert, added by the MoE)

so a token whose every slot is dropped leaves the routed experts with y = 0 and the block passes it on through the
residual stream only. The auxiliary losses and the per-expert load counters use the routing before dropping
(Switch Transformer / Megatron): they measure what the router asked for.

Padding (`pad_to_capacity`): each expert's group is filled up to exactly C rows with zero rows of weight 0, so the
experts see one [E, C, D] batch every step (batched GEMMs of a fixed shape, fixed all-to-all split sizes under
expert parallelism, no host synchronisation, a static graph for torch.compile). A zero row costs a GEMM row but
changes nothing: SwiGLU has no bias, so its output is 0, and its weight is 0 for the gradients too.

Without padding the kept rows are dispatched exactly as the dropless path does (grouped by expert, in token order
within an expert), so when nothing is dropped the result is bit-identical to dropless routing.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(capacity_factor: float, top_k: int, n_tokens: int, n_experts: int) -> int:
    """C = min(ceil(c·k·T/E), T), at least 1. The product is rounded to 9 decimals first, so a c such as 1.1 whose
    binary value lands a hair above an integer capacity does not add a slot."""
    raw = round(capacity_factor * top_k * n_tokens / n_experts, 9)
    return max(1, min(math.ceil(raw), n_tokens))


def expert_counts(expert_N: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E] (scatter_add rather than bincount: a static shape for torch.compile)."""
    return torch.zeros(n_experts, dtype=torch.long, device=expert_N.device).scatter_add_(
        0, expert_N, torch.ones_like(expert_N))


def capacity_keep(expert_N: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor, capacity: int
                  ) -> torch.Tensor:
    """Boolean [N] mask of the kept assignments (flat index n = t·k + i); counts_E = assignments per expert.

    Rank the assignments of each expert by weight, highest first, ties by lower n; keep rank < capacity. Two stable
    sorts give that order: by weight (descending; a stable sort leaves equal weights in index order), then by expert.
    Only indices are computed, so no gradient flows through the choice."""
    N = expert_N.numel()
    by_weight = torch.sort(weight_N.detach(), descending=True, stable=True).indices
    by_expert = by_weight[torch.sort(expert_N[by_weight], stable=True).indices]  # expert, -weight, index order
    starts = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(N, device=expert_N.device) - starts[expert_N[by_expert]]
    rank = torch.empty_like(rank_sorted).scatter_(0, by_expert, rank_sorted)
    return rank < capacity


def padded_expert_swiglu(x_ECD: torch.Tensor, w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """SwiGLU of E equal groups of rows, one batched GEMM per weight: [E, C, D] -> [E, C, D]."""
    h = torch.nn.functional.silu(torch.bmm(x_ECD, w1_EFD.transpose(1, 2))) * torch.bmm(x_ECD, w3_EFD.transpose(1, 2))
    return torch.bmm(h, w2_EDF.transpose(1, 2))


def capacity_dispatch(x_TD: torch.Tensor, idx_Tk: torch.Tensor, weights_Tk: torch.Tensor, counts_E: torch.Tensor,
                      experts, capacity: int, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Route x through `experts` keeping at most `capacity` assignments per expert (module docstring).

    `experts(rows, counts)` takes rows grouped by expert (counts[e] consecutive rows for expert e); with `pad`,
    `experts(rows, counts, capacity=C)` takes E groups of exactly C rows. counts_E: assignments routed to each
    expert (int64). Returns (y [T, D], dropped assignments per expert [E], int64)."""
    T, k = idx_Tk.shape
    E, N = counts_E.numel(), T * k
    expert_N, weight_N = idx_Tk.reshape(-1), weights_Tk.reshape(-1)
    keep = capacity_keep(expert_N, weight_N, counts_E, capacity)
    kept = torch.zeros_like(counts_E).scatter_add_(0, expert_N, keep.long())
    # Kept assignments grouped by expert in index order (the dropless order), dropped ones after them (key E).
    order = torch.argsort(torch.where(keep, expert_N, E), stable=True)
    if pad:
        slot = torch.arange(E * capacity, device=x_TD.device)
        e, p = slot // capacity, slot % capacity
        valid = p < kept[e]
        # Row p of expert e's group is the p-th kept assignment of e; padding rows point anywhere (masked to 0).
        src = order[((torch.cumsum(kept, 0) - kept)[e] + p).clamp(max=N - 1)]
        token = src // k
        rows = torch.where(valid.unsqueeze(-1), x_TD[token], 0)
        w = torch.where(valid, weight_N[src], 0)
        out = experts(rows, torch.full_like(kept, capacity), capacity=capacity)
    else:
        src = order[:int(kept.sum())]  # data-dependent length: the rows actually computed
        token = src // k
        w = weight_N[src]
        out = experts(x_TD[token], kept)
    out = out * w.unsqueeze(-1).to(out.dtype)
    y = torch.zeros_like(x_TD).index_add_(0, token, out.to(x_TD.dtype))
    return y, counts_E - kept
