"""Scale-Out: dense -> MoE upcycling, one registered method `upcycle` (sparse, Drop-Upcycling, fine-grained).

Layers i with (i + 1) % moe_layer_step == 0 replace their dense SwiGLU FFN (w1, w3 [F, D]; w2 [D, F]) by a MoE; every
other tensor (embeddings, attention, norms, the remaining dense FFNs) is copied unchanged.

Sparse upcycling (Komatsuzaki et al. 2023; AquilaMoE; "Llama 3 Meets MoE"), granularity G = 1:
    expert e = the dense FFN (E copies);  router R ~ N(0, sigma^2) [E, D], sigma = growth.router_init_std (0.02, the
    Megatron/torchtitan init std; AquilaMoE's "variance of 0.02" would be sigma = sqrt(0.02) = 0.141);  expert_bias = 0.
    With router_order 'topk_softmax' (Mixtral) the weights of the k chosen copies sum to 1:  y = FFN(x) exactly.
    With 'softmax_topk' (Switch/Qwen2-MoE):  y = (sum_{i in TopK} p_i) * FFN(x), a factor in [k/E, 1).

Fine-grained upcycling (Megatron `upcycling_utils.py`, He et al. 2024 "virtual group"), G > 1, E = expansion * G:
    moe_ffn_dim Fe = F / G; shard s = units [s*Fe, (s+1)*Fe) of the dense FFN; expert e holds shard e mod G, so the
    experts {rG, ..., rG + G - 1} of virtual group r together are one whole dense FFN:  FFN(x) = sum_s shard_s(x).
    Router rows are tied within a group: R'[e] = R[e // G] with R ~ N(0, sigma^2) [E/G, D], so a group's G logits are
    bit-identical and top-k keeps whole groups when k = m*G. With 'topk_softmax' each chosen expert of group r weighs
    q_r / G (sum_r q_r = 1 over the m chosen groups), so route_scale = G gives  y = sum_r q_r * FFN(x) = FFN(x).
    The plan therefore sets route_scale = G and requires top_k to be a multiple of G (UserError otherwise: a partial
    group would compute part of the FFN, not a useful start). Megatron's alternative, scaling fc1 and fc2 by G^(1/3),
    is exact only for positively homogeneous activations (ReLU^2), not SwiGLU, so it is not offered.

Drop-Upcycling (growth.drop_ratio r > 0; see drop_upcycle.py): each expert's units are permuted and floor(r * Fe) of
    them re-drawn from the statistics of the dropped slice. r = 0 is sparse upcycling, bit for bit. It composes with
    G > 1 (applied to each expert's own shard).

Shared expert (n_shared_experts > 0, Qwen2-MoE style; Fs = n_shared_experts * Fe units): unit j is dense unit j mod F,
    so with Fs = F it is a copy of the dense FFN. It is added to the routed output, so the MoE is NOT the dense model
    at init: y = routed + FFN_shared(x) (= 2 FFN(x) when Fs = F), or routed + sigmoid(g . x) * FFN_shared(x) with the
    gate g ~ N(0, sigma^2) [1, D] when shared_expert_gate (a Qwen-style gated shared expert is not exact at init).

growth.noise_std > 0 adds N(0, noise_std^2) to every expert weight (symmetry breaking, like the RNU baseline;
not exact). Every random draw is seeded by (growth.seed, layer, expert, purpose), so a rank that builds experts
4..7 gets exactly the tensors a single process builds for them.

Expert weights are returned as `LazyExperts` (built per expert on demand); router, shared expert, gate and
expert_bias as plain tensors.
"""

from __future__ import annotations

import torch

from titan_aquila.errors import UserError, require
from titan_aquila.growth import GrowthMethod, GrowthOptions, LazyExperts, register
from titan_aquila.growth.drop_upcycle import (INDEX_SETS, MATRICES, UNIT_AXIS, drop_plan, drop_upcycle_matrix,
                                              generator)
from titan_aquila.models.args import ROUTER_ORDERS, ModelArgs

FIELDS = ("n_experts", "top_k", "moe_layer_step", "moe_ffn_dim", "n_shared_experts", "shared_expert_gate",
          "router_order", "route_scale")


# ---- plan: validate before any tensor is touched ---------------------------------------------------------------
def plan_upcycle(before: ModelArgs, target: ModelArgs, opts: GrowthOptions) -> ModelArgs:
    """`before` is the dense model (after any Scale-Up step); `target` is it with the MoE fields at their target
    values. Returns the MoE args the trainer must build (route_scale = G for G > 1)."""
    need = require
    need(not before.is_moe, f"upcycling a checkpoint that is already MoE: the source has {before.n_experts} experts "
         f"in layers {before.moe_layer_ids}; 'upcycle' turns a dense model into a MoE (drop it from growth.methods)")
    E, k, G, r = target.n_experts, target.top_k, opts.granularity, opts.drop_ratio
    need(E >= 1, f"upcycle: model.n_experts must be >= 1 for the MoE target, got {E}")
    need(1 <= k <= E, f"upcycle: model.top_k ({k}) must be between 1 and n_experts ({E})")
    need(target.moe_layer_step >= 1, f"upcycle: model.moe_layer_step must be >= 1, got {target.moe_layer_step}")
    need(target.moe_layer_step <= target.n_layers,
         f"upcycle: moe_layer_step {target.moe_layer_step} > n_layers {target.n_layers}: no layer would become MoE")
    need(target.router_order in ROUTER_ORDERS,
         f"upcycle: model.router_order must be one of {ROUTER_ORDERS}, got {target.router_order!r}")
    need(0.0 <= r <= 1.0, f"upcycle: growth.drop_ratio must be in [0, 1], got {r}")
    need(opts.drop_index_sets in INDEX_SETS,
         f"upcycle: growth.drop_index_sets must be one of {INDEX_SETS}, got {opts.drop_index_sets!r}")
    need(opts.router_init_std >= 0, f"upcycle: growth.router_init_std must be >= 0, got {opts.router_init_std}")
    need(opts.noise_std >= 0, f"upcycle: growth.noise_std must be >= 0, got {opts.noise_std}")
    need(G >= 1, f"upcycle: growth.granularity must be >= 1, got {G}")
    F = before.ffn_dim
    need(F % G == 0, f"upcycle: growth.granularity {G} does not divide the dense ffn_dim {F}")
    need(E % G == 0, f"upcycle: growth.granularity {G} does not divide n_experts {E} (E = expansion * G)")
    need(target.moe_ffn_dim == F // G,
         f"upcycle: model.moe_ffn_dim is {target.moe_ffn_dim} but granularity {G} of the dense ffn_dim {F} makes "
         f"experts of {F // G} units; set moe_ffn_dim = {F // G}" + (" (or growth.granularity = "
         f"{F // target.moe_ffn_dim})" if target.moe_ffn_dim and F % target.moe_ffn_dim == 0 else ""))
    need(target.n_shared_experts >= 0, f"upcycle: model.n_shared_experts must be >= 0, got {target.n_shared_experts}")
    need(not target.shared_expert_gate or target.n_shared_experts > 0,
         "upcycle: model.shared_expert_gate is true but n_shared_experts is 0 (no shared expert to gate)")
    after = target
    if G > 1:
        need(k % G == 0, f"upcycle: fine-grained upcycling with granularity {G} needs top_k a multiple of {G} (got "
             f"{k}): each token must pick whole virtual groups (all {G} shards of an FFN copy) to start as the dense model")
        need(target.route_scale in (1.0, float(G)),
             f"upcycle: fine-grained upcycling with granularity {G} sets route_scale = {G} (each shard weighs 1/{G}); "
             f"got route_scale {target.route_scale}: leave it 1 or set {G}")
        after = target.replace(route_scale=float(G))
    return after.validate()


# ---- apply -----------------------------------------------------------------------------------------------------
def _shard(dense: torch.Tensor, name: str, shard: int, units: int) -> torch.Tensor:
    return dense.narrow(UNIT_AXIS[name], shard * units, units)


def _expert_maker(dense: dict[str, torch.Tensor], name: str, layer: int, args: ModelArgs, opts: GrowthOptions):
    """make(e) for LazyExperts: expert e's `name` matrix (shard e mod G, then Drop-Upcycling, then noise)."""
    G, Fe = opts.granularity, args.moe_ffn_dim

    def make(e: int) -> torch.Tensor:
        w = _shard(dense[name], name, e % G, Fe)
        if opts.drop_ratio > 0:
            plan = drop_plan(opts.seed, layer, e, Fe, opts.drop_ratio, opts.drop_index_sets)
            w = drop_upcycle_matrix(w, name, plan, opts.seed, layer, e)
        else:
            w = w.clone()
        if opts.noise_std > 0:
            noise = torch.randn(w.shape, generator=generator(opts.seed, "noise", layer, e, name))
            w = (w.float() + opts.noise_std * noise).to(w.dtype)
        return w

    return make


def _router(layer: int, args: ModelArgs, opts: GrowthOptions, dtype: torch.dtype) -> torch.Tensor:
    """[E, D]: N(0, sigma^2) rows, tied within each virtual group of G experts (R'[e] = R[e // G])."""
    G = opts.granularity
    r = torch.randn(args.n_experts // G, args.dim, generator=generator(opts.seed, "router", layer))
    return (r * opts.router_init_std).repeat_interleave(G, dim=0).to(dtype)


def _shared_expert(dense: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Shared expert of Fs = n_shared * Fe units, unit j = dense unit j mod F."""
    F = dense["w1"].shape[0]
    units = torch.arange(args.n_shared_experts * args.moe_ffn_dim) % F
    return {name: dense[name].index_select(UNIT_AXIS[name], units).contiguous() for name in MATRICES}


def upcycle_state_dict(before: ModelArgs, sd: dict, after: ModelArgs, opts: GrowthOptions) -> dict:
    """Dense state dict (names as in DEVELOPING.md) -> MoE state dict of `after` (from `plan_upcycle`)."""
    out = dict(sd)
    E, D = after.n_experts, after.dim
    for i in after.moe_layer_ids:
        ff, moe = f"layers.{i}.feed_forward.", f"layers.{i}.moe."
        missing = [ff + n + ".weight" for n in MATRICES if ff + n + ".weight" not in out]
        if missing:
            raise UserError(f"upcycle: the source state dict lacks {', '.join(missing)} (is layer {i} dense?)")
        dense = {n: out.pop(ff + n + ".weight") for n in MATRICES}
        assert dense["w1"].shape == (before.ffn_dim, D), (dense["w1"].shape, before.ffn_dim, D)
        for name in MATRICES:
            shape = (E, after.moe_ffn_dim, D) if name != "w2" else (E, D, after.moe_ffn_dim)
            out[moe + "experts." + name] = LazyExperts(shape, dense[name].dtype,
                                                       _expert_maker(dense, name, i, after, opts))
        out[moe + "router.weight"] = _router(i, after, opts, dense["w1"].dtype)
        out[moe + "expert_bias"] = torch.zeros(E, dtype=torch.float32)
        if after.n_shared_experts:
            for name, w in _shared_expert(dense, after).items():
                out[f"{moe}shared_expert.{name}.weight"] = w
            if after.shared_expert_gate:
                g = torch.randn(1, D, generator=generator(opts.seed, "shared_gate", i)) * opts.router_init_std
                out[moe + "shared_expert_gate.weight"] = g.to(dense["w1"].dtype)
    return out


UPCYCLE = register(GrowthMethod(
    name="upcycle", fields=FIELDS, plan=plan_upcycle, apply=upcycle_state_dict,
    doc="dense -> MoE: E copies of each (every moe_layer_step-th) FFN, new N(0, router_init_std^2) router; "
        "drop_ratio > 0 = Drop-Upcycling; granularity G > 1 = fine-grained (virtual-group router, route_scale G)"))
