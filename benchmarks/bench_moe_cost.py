"""Cost of our MoE: training step of an E8 top-2 MoE vs the dense model with the same active parameters, and the
share of the MoE layer's time spent on routing / dispatch rather than in the expert GEMMs.

    python benchmarks/bench_moe_cost.py                  # full run (a few minutes on the 2-core box)
    python benchmarks/bench_moe_cost.py --smoke          # seconds, tiny shapes
    python benchmarks/bench_moe_cost.py --modes eager,compiled --dtypes fp32,bf16

1. Step: MoE (every layer E experts of size Fe, top-k, aux losses x 0.001 in the loss as the trainer does) vs
   dense twin with ffn_dim = k * Fe and everything else equal, so the matmul FLOPs per token differ only by the
   router (E x D per layer). Both as full steps (with AdamW, which for the MoE updates E/k times more FFN weights)
   and forward + backward only. ratio = median over rounds of MoE time / dense time. Target: full step <= 1.3x.
2. Layer breakdown on one MoE layer (layer 0, its weights, input x ~ N(0, 1) of the step's shape), forward +
   backward with random output gradients, each piece timed as its own interleaved variant:
     layer     MoE.forward + backward (router, bincount, argsort, gather, experts, weighting, index_add, aux)
     experts   GroupedExperts alone on the exact rows and counts the layer gave it (captured by a forward
               pre-hook), i.e. the three torch._grouped_mm + SwiGLU and their backward
     router    TopKRouter alone (fp32 linear, softmax, top-k, gather, softmax) with gradients into all outputs
     dispatch  = layer - experts - router: permutation, un-permutation (index_add_), routing-weight scaling,
               counts and aux losses
   plus `experts_loop` (the same experts through the exact per-expert loop) for reference, the same pieces
   forward only, and a torch.profiler table of the layer's top ops (self CPU time) whose `gemm_share` is the
   same split measured on one set of calls (the subtraction above differences separately timed variants, so
   on a loaded box it is the noisier of the two).
"""

from __future__ import annotations

import sys

import torch

from common import (base_parser, build_ours, compile_blocks, default_dtypes, interleaved, llama_args, med,
                    ours_forward, profile_ops, random_batch, ratio, setup, train_step_fn, write_result)

TARGET = 1.3


def step_rows(a, dtype: str, mode: str) -> tuple[dict, torch.nn.Module]:
    common = dict(head_dim=a.dim // a.heads, ffn_dim=a.top_k * a.expert_ffn_dim)
    moe_args = llama_args(a.dim, a.layers, a.vocab, a.seq, n_experts=a.experts, top_k=a.top_k,
                          moe_ffn_dim=a.expert_ffn_dim, **common)
    dense_args = llama_args(a.dim, a.layers, a.vocab, a.seq, **common)
    assert moe_args.num_params(active=True) - dense_args.num_params() == a.layers * a.experts * a.dim  # router only
    tokens, labels = random_batch(a.vocab, a.batch, a.seq, a.seed)
    moe, dense = build_ours(moe_args, a.seed), build_ours(dense_args, a.seed)
    if mode == "compiled":
        compile_blocks(moe, hf=False, moe=True)
        compile_blocks(dense, hf=False, moe=False)
    bf16 = dtype == "bf16"
    steps = {}
    for name, m, coeff in (("moe", moe, 0.001), ("dense", dense, 0.0)):
        steps[name] = train_step_fn(ours_forward(m), m.parameters(), tokens, labels, bf16, aux_coeff=coeff)
        steps[name + "_fwd_bwd"] = train_step_fn(ours_forward(m), m.parameters(), tokens, labels, bf16,
                                                 aux_coeff=coeff, optimizer=False)
    print(f"{dtype} {mode}: MoE {moe_args.num_params() / 1e6:.1f}M params "
          f"({moe_args.num_params(active=True) / 1e6:.1f}M active) vs dense {dense_args.num_params() / 1e6:.1f}M, "
          f"batch {a.batch} x {a.seq}", flush=True)
    pr = interleaved(steps, a.rounds, reps=a.reps, warmup=2 if mode == "compiled" else 1)
    row = {"dtype": dtype, "mode": mode, "moe_params": moe_args.num_params(),
           "moe_active_params": moe_args.num_params(active=True), "dense_params": dense_args.num_params(),
           "moe_flops_per_token": moe_args.flops_per_token(a.seq),
           "dense_flops_per_token": dense_args.flops_per_token(a.seq),
           **{f"{k}_ms": med(v) * 1e3 for k, v in pr.items()},
           "step_ratio": ratio(pr, "moe", "dense"), "fwd_bwd_ratio": ratio(pr, "moe_fwd_bwd", "dense_fwd_bwd"),
           "target_ratio": TARGET, "per_round_ms": {k: [t * 1e3 for t in v] for k, v in pr.items()}}
    row["target_met"] = row["step_ratio"] <= TARGET
    row["profile"] = {n: profile_ops(steps[n], top=10) for n in ("moe", "dense")}
    print("  GEMM share of step time: " + ", ".join(f"{n} {100 * row['profile'][n]['gemm_share']:.0f}%"
                                                  for n in row["profile"]), flush=True)
    print(f"  -> MoE / dense step {row['step_ratio']:.2f}x (target <= {TARGET}x), forward+backward only "
          f"{row['fwd_bwd_ratio']:.2f}x", flush=True)
    return row, moe


def layer_pieces(moe_layer, a, bf16: bool) -> dict:
    """Interleaved timing of the MoE layer and its pieces (see the module docstring)."""
    D = a.dim
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(a.batch, a.seq, D, generator=g).requires_grad_()
    seen = {}
    hook = moe_layer.experts.register_forward_pre_hook(lambda m, args: seen.update(xs=args[0].detach(), counts=args[1]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y, _ = moe_layer(x)
    hook.remove()
    xs, counts = seen["xs"].clone().requires_grad_(), seen["counts"]
    assert xs.shape[0] == a.batch * a.seq * a.top_k and int(counts.sum()) == xs.shape[0]
    gy, gxs = torch.randn(y.shape, generator=g).to(y.dtype), torch.randn(xs.shape, generator=g).to(xs.dtype)
    T, E, k = a.batch * a.seq, a.experts, a.top_k
    g_router = [torch.randn(T, k, generator=g), torch.randn(T, E, generator=g), torch.randn(T, E, generator=g)]
    experts, router = moe_layer.experts, moe_layer.router

    def ac():
        # Gradients are dropped first so every backward writes fresh .grad tensors, as a training step does.
        moe_layer.zero_grad(set_to_none=True)
        x.grad = xs.grad = None
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def run_layer(bwd=True):
        with ac():
            y, aux = moe_layer(x)
        if bwd:
            torch.autograd.backward([y, aux], [gy, torch.ones(2)])

    def run_experts(bwd=True, grouped=True):
        experts.use_grouped_mm = grouped
        try:
            with ac():
                out = experts(xs, counts)
            if bwd:
                out.backward(gxs.to(out.dtype))
        finally:
            experts.use_grouped_mm = True

    def run_router(bwd=True):
        with ac():
            _, w, logits, probs = router(x.reshape(-1, D), moe_layer.expert_bias)
        if bwd:
            torch.autograd.backward([w, logits, probs], g_router)

    def fwd(f):
        def run():
            with torch.no_grad():
                f(bwd=False)
        return run

    variants = {"layer": run_layer, "experts": run_experts, "router": run_router,
                "experts_loop": lambda: run_experts(grouped=False),
                "layer_fwd": fwd(run_layer), "experts_fwd": fwd(run_experts), "router_fwd": fwd(run_router)}
    print(f"MoE layer 0 pieces ({T} tokens x top-{k}, E={E}, Fe={a.expert_ffn_dim}, D={D}):", flush=True)
    pr = interleaved(variants, a.rounds, reps=a.layer_reps, warmup=1, log=False)
    ms = {n: med(v) * 1e3 for n, v in pr.items()}
    out = {"tokens": T, "counts": counts.tolist(), "expert_input_dtype": str(xs.dtype),
           **{f"{n}_ms": v for n, v in ms.items()}}
    for sfx in ("", "_fwd"):
        lay, exp, rou = ms["layer" + sfx], ms["experts" + sfx], ms["router" + sfx]
        out[f"dispatch{sfx}_ms"] = lay - exp - rou
        out[f"share{sfx}"] = {"experts": exp / lay, "router": rou / lay, "dispatch": (lay - exp - rou) / lay}
    out["experts_loop_over_grouped"] = ratio(pr, "experts_loop", "experts")
    s = out["share"]
    print(f"  fwd+bwd: layer {ms['layer']:.1f} ms = experts {100 * s['experts']:.0f}% + router "
          f"{100 * s['router']:.0f}% + dispatch/unpermute/aux {100 * s['dispatch']:.0f}%; per-expert loop / grouped_mm "
          f"{out['experts_loop_over_grouped']:.2f}x", flush=True)
    s = out["share_fwd"]
    print(f"  forward: layer {ms['layer_fwd']:.1f} ms = experts {100 * s['experts']:.0f}% + router "
          f"{100 * s['router']:.0f}% + dispatch/unpermute/aux {100 * s['dispatch']:.0f}%", flush=True)
    prof = profile_ops(run_layer, a.top_ops, iters=3)
    print("  top ops (self CPU): " + ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in prof["top_ops"][:8]),
          flush=True)
    # The same split from the profiler's per-op self times of the very same calls (immune to load changes between
    # variants): GEMMs are the experts' (CPU _grouped_mm runs one mm per group) plus the tiny router linear.
    print(f"  profiler: GEMMs {100 * prof['gemm_share']:.0f}% of the layer's fwd+bwd self time, everything else "
          f"(routing, dispatch, SwiGLU elementwise, aux) {100 * (1 - prof['gemm_share']):.0f}%", flush=True)
    out["profile"] = prof
    return out


def main(argv=None) -> int:
    p = base_parser("bench_moe_cost", __doc__)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn-dim", type=int, default=352, help="Fe; the dense twin gets ffn_dim = top_k * Fe")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--layer-reps", type=int, default=10, help="timed calls per layer piece per round")
    p.add_argument("--top-ops", type=int, default=12)
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16; default fp32 (+ bf16 if native)")
    p.add_argument("--modes", default="eager", help="comma list of eager, compiled")
    a = p.parse_args(argv)
    if a.smoke:
        a.dim, a.layers, a.heads, a.expert_ffn_dim, a.vocab, a.batch, a.seq, a.layer_reps = 64, 2, 4, 32, 256, 2, 32, 2
        a.dtypes = a.dtypes or "fp32"
    setup(a)
    dtypes, probe = default_dtypes(a.dtypes)
    rows, layers = [], []
    for mode in a.modes.split(","):
        for dtype in dtypes:
            row, moe = step_rows(a, dtype, mode)
            rows.append(row)
            if mode == "eager":  # the pieces are timed eagerly (compile fuses them across the boundaries)
                layers.append({"dtype": dtype, **layer_pieces(moe.layers["0"].moe, a, dtype == "bf16")})
            torch._dynamo.reset()
    print("\ndtype  mode      MoE ms   dense ms   ratio  fwd+bwd ratio  target")
    for r in rows:
        print(f"{r['dtype']:6} {r['mode']:8} {r['moe_ms']:8.1f} {r['dense_ms']:9.1f} {r['step_ratio']:6.2f}x "
              f"{r['fwd_bwd_ratio']:8.2f}x     <= {TARGET}x {'met' if r['target_met'] else 'MISSED'}")
    write_result("bench_moe_cost", a, {"shapes": {k: getattr(a, k) for k in (
        "dim", "layers", "heads", "experts", "top_k", "expert_ffn_dim", "vocab", "batch", "seq")},
        "bf16_probe": probe, "results": rows, "layer_breakdown": layers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
