"""Mixture of Experts feed-forward: linear router, top-k routing, grouped experts (dropless, or capacity-factor
token dropping), auxiliary losses.

For a token x with router logits z = W_r x (no bias) and p = softmax(z):

    'topk_softmax' (Mixtral):  T = TopK(z + b), w_i = softmax(z_T)_i          sum_i w_i = 1
    'softmax_topk' (Switch):   T = TopK(p + b), w_i = p_i                     sum_i w_i <= 1
    y = route_scale * sum_{i in T} w_i * Expert_i(x)   (+ shared expert(x), optionally sigmoid-gated)

b is the aux-loss-free balancing bias (DeepSeek-V3): it changes which experts are selected, never the weights.
With E identical experts and 'topk_softmax', y = FFN(x): an upcycled MoE starts as the dense model.

Dropless by default: every expert computes every (token, slot) assignment routed to it. With a capacity factor c
(`capacity_factor`, models/capacity.py), each expert takes at most C = min(ceil(c k T / E), T) of the T k assignments
of the micro-batch (T = this rank's tokens), keeping the highest router weights w_i (ties: the lower token index);
a dropped assignment's term leaves the sum above, so a token with every slot dropped gets y = shared expert only
(the residual passes it on). `pad_to_capacity` fills every expert's group to exactly C rows (static shapes).
The aux losses below and `tokens_per_expert` use the routing before dropping; `tokens_dropped` counts the drops.

Auxiliary losses, returned raw (the trainer applies the coefficients), over the T tokens of the batch:
    load_balance = N / (k T) * sum_i count_i * P_i,   P_i = mean_x p_i(x)      (Megatron form; 1 when uniform)
    router_z     = mean_x logsumexp(z(x))^2  ('router_lse')   or   mean_x max(z(x))^2  ('router_max')
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_aquila.models.args import ModelArgs
from titan_aquila.models.capacity import capacity_dispatch, expert_capacity, expert_counts, padded_expert_swiglu
from titan_aquila.models.feed_forward import FeedForward


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU (fp32/bf16) and on CUDA from SM90 (Hopper) in bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.dtype == torch.bfloat16
    return False


def expert_swiglu(x_ND: torch.Tensor, w1_EFD, w2_EDF, w3_EFD, counts_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows of x are sorted by expert; counts_E[e] consecutive rows go to expert e. Returns [N, D].

    Grouped path: one torch._grouped_mm per weight with offs = cumsum(counts) (int32, as the kernel requires).
    Fallback: a loop over experts with the same per-expert math, exact to rounding.
    """
    if grouped:
        offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        # Empty groups are allowed; the kernel needs contiguous inputs.
        x = x_ND.contiguous()
        h = F.silu(torch._grouped_mm(x, w1_EFD.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(x, w3_EFD.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, w2_EDF.transpose(-2, -1), offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        xe = x_ND[start:start + n]
        outs.append((F.silu(xe @ w1_EFD[e].T) * (xe @ w3_EFD[e].T)) @ w2_EDF[e].T)
        start += n
    return torch.cat(outs, dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors: w1, w3 [E, Fe, D] (gate, up), w2 [E, D, Fe] (down)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, use_grouped_mm: bool = True):
        super().__init__()
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """Rows grouped by expert, counts_E[e] for expert e; `capacity` C: exactly C rows per expert (padded)."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        if torch.is_autocast_enabled(x_ND.device.type):
            # torch._grouped_mm is on no autocast cast list: without this it multiplies in fp32 under bf16 autocast.
            dtype = torch.get_autocast_dtype(x_ND.device.type)
            x_ND, w1, w2, w3 = (t.to(dtype) for t in (x_ND, w1, w2, w3))
        if capacity is not None:  # fixed [E, C, D] groups: batched GEMMs, static shapes (also compiled in fp32)
            E = w1.shape[0]
            return padded_expert_swiglu(x_ND.view(E, capacity, -1), w1, w2, w3).reshape(E * capacity, -1)
        # torch.compile lowers _grouped_mm only for bf16 inputs (fp32 raises "Expected inputs of BF16 type").
        grouped = self.use_grouped_mm and grouped_mm_supported(x_ND) and \
            not (torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16)
        return expert_swiglu(x_ND, w1, w2, w3, counts_E, grouped)

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)


class TopKRouter(nn.Module):
    """Linear router without bias; returns selected experts [T, k], their weights [T, k] and the raw logits [T, E]."""

    def __init__(self, dim: int, n_experts: int, top_k: int, order: str, route_scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.top_k, self.order, self.route_scale = top_k, order, route_scale

    def forward(self, x_TD: torch.Tensor, expert_bias_E: torch.Tensor):
        logits = F.linear(x_TD.float(), self.weight.float())  # routing decisions in fp32
        probs = logits.softmax(dim=-1)
        if self.order == "topk_softmax":
            _, idx = torch.topk(logits + expert_bias_E, self.top_k, dim=-1)
            weights = logits.gather(-1, idx).softmax(dim=-1)
        else:
            _, idx = torch.topk(probs + expert_bias_E, self.top_k, dim=-1)
            weights = probs.gather(-1, idx)
        return idx, weights * self.route_scale, logits, probs


def load_balance_loss(probs_TE: torch.Tensor, idx_Tk: torch.Tensor) -> torch.Tensor:
    """N / (k T) * sum_i count_i * P_i with P_i the mean router probability; equals 1 under uniform routing."""
    T, E = probs_TE.shape
    k = idx_Tk.shape[1]
    counts = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype).scatter_add_(
        0, idx_Tk.reshape(-1), torch.ones(idx_Tk.numel(), device=probs_TE.device, dtype=probs_TE.dtype))
    return E / (k * T) * (counts * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor, kind: str) -> torch.Tensor:
    """mean(logsumexp(z)^2) for 'router_lse', mean(max(z)^2) for 'router_max', 0 for 'output_max' (LM logits)."""
    if kind == "router_lse":
        return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
    if kind == "router_max":
        return logits_TE.max(dim=-1).values.pow(2).mean()
    return logits_TE.new_zeros(())


class MoE(nn.Module):
    """Router + grouped experts, dropless or with a capacity factor (+ optional shared expert).
    forward returns (y, [load_balance, z])."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.top_k, self.z_loss_type = args.n_experts, args.top_k, args.z_loss_type
        self.capacity_factor = args.capacity_factor or None  # None (or 0) = dropless
        self.pad_to_capacity = args.pad_to_capacity
        self.router = TopKRouter(args.dim, args.n_experts, args.top_k, args.router_order, args.route_scale)
        self.experts = GroupedExperts(args.dim, args.moe_ffn_dim, args.n_experts, args.use_grouped_mm)
        self.shared_expert = (FeedForward(args.dim, args.n_shared_experts * args.moe_ffn_dim)
                              if args.n_shared_experts > 0 else None)
        self.shared_expert_gate = (nn.Linear(args.dim, 1, bias=False)
                                   if args.n_shared_experts > 0 and args.shared_expert_gate else None)
        # Aux-loss-free balancing bias (persistent: it is training state) and this step's token counts per expert
        # (not persistent: the trainer reads and resets them for logging and for the bias update).
        self.register_buffer("expert_bias", torch.zeros(args.n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)
        # Assignments each expert dropped at capacity (same lifetime as tokens_per_expert; 0 when dropless).
        self.register_buffer("tokens_dropped", torch.zeros(args.n_experts), persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        idx, weights, logits, probs = self.router(x, self.expert_bias)
        counts = expert_counts(idx.reshape(-1), self.n_experts)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))

        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, self.top_k, x.shape[0], self.n_experts)
            y, dropped = capacity_dispatch(x, idx, weights, counts, self.experts, capacity, self.pad_to_capacity)
            with torch.no_grad():
                self.tokens_dropped.add_(dropped.to(self.tokens_dropped.dtype))
        else:
            # Dispatch: sort the T*k (token, slot) pairs by expert so each expert's tokens are contiguous.
            order = torch.argsort(idx.reshape(-1), stable=True)
            token_of = order // self.top_k
            out = self.experts(x[token_of], counts)
            out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
            y = torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))

        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        aux = torch.stack([load_balance_loss(probs, idx), router_z_loss(logits, self.z_loss_type)])
        return y.view(B, T, D), aux

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=init_std)
        self.experts.reset_parameters(init_std, out_std)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters(init_std, out_std)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=init_std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
        self.tokens_dropped.zero_()
