"""Training-step throughput of titan_aquila vs HF transformers on the same shapes, weights, batch, dtype and threads.

    python benchmarks/bench_throughput.py                # full run (minutes on the 2-core box)
    python benchmarks/bench_throughput.py --smoke        # seconds, tiny shapes, eager only
    python benchmarks/bench_throughput.py --dtypes fp32,bf16   # force bf16 (default: only where bf16 GEMMs are native)

One step = zero_grad, forward, cross-entropy on fp32 logits (+ aux losses x 0.001 for our MoE; HF Mixtral is run with
output_router_logits=False, so ours does strictly more work), backward, torch.optim.AdamW(foreach) step.
  dense: ours vs HF LlamaForCausalLM (attn_implementation="sdpa")
  moe:   ours E8 top-2 vs HF MixtralForCausalLM (sdpa; transformers' default experts implementation, which is
         "grouped_mm" in transformers 5), and vs the same with the per-expert loop ("eager" experts) for reference.
Both models hold identical weights (copied through titan_aquila.convert.hf_map), so max_logit_diff checks they compute the same
function. "compiled" = torch.compile of every decoder block, for both models (the trainer's per-block strategy).
speedup = median over rounds of HF step time / our step time, variants interleaved in one process.
Targets: dense >= 1.5x, MoE >= 2x. After the timing, one step of each model runs under torch.profiler
(common.profile_ops): `profile.<model>.gemm_share` is the share of its step spent in GEMM kernels, which both
implementations call with the same shapes, so even with zero non-GEMM work ours is at most 1 / gemm_share(HF)
times faster than HF.
"""

from __future__ import annotations

import argparse
import sys

from common import (base_parser, build_hf_twin, build_ours, compile_blocks, default_dtypes, hf_forward, interleaved,
                    max_logit_diff, med, ours_forward, profile_ops, random_batch, ratio, setup, train_step_fn,
                    write_result)

TARGET = {"dense": 1.5, "moe": 2.0}


def model_args(kind: str, a):
    from titan_aquila.models.args import ModelArgs

    kw = dict(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn_dim,
              vocab_size=a.vocab, max_seq_len=max(a.seq, 64))
    if kind == "moe":
        kw.update(n_experts=8, top_k=2, moe_ffn_dim=a.ffn_dim)
    return ModelArgs(**kw).validate()


def run_config(kind: str, dtype: str, mode: str, a) -> dict:
    import torch

    margs = model_args(kind, a)
    bf16 = dtype == "bf16"
    tokens, labels = random_batch(margs.vocab_size, a.batch, a.seq, a.seed)
    ours = build_ours(margs, seed=a.seed)
    hf = build_hf_twin(ours, margs)
    diff = max_logit_diff(ours_forward(ours), hf_forward(hf), tokens)
    models = {"ours": (ours, False), "hf": (hf, True)}
    if kind == "moe" and a.hf_loop:
        hf_loop = build_hf_twin(ours, margs)
        hf_loop.set_experts_implementation("eager")
        models["hf_loop"] = (hf_loop, True)
    if mode == "compiled":
        for m, is_hf in models.values():
            compile_blocks(m, hf=is_hf, moe=kind == "moe")
    steps = {}
    for name, (m, is_hf) in models.items():
        fwd = hf_forward(m) if is_hf else ours_forward(m)
        steps[name] = train_step_fn(fwd, list(m.parameters()), tokens, labels, bf16,
                                    aux_coeff=0.001 if (kind == "moe" and not is_hf) else 0.0)
    print(f"{kind} {dtype} {mode}: {margs.num_params() / 1e6:.1f}M params, batch {a.batch} x {a.seq}, "
          f"max|logit diff| {diff:.2e}", flush=True)
    per_round = interleaved(steps, a.rounds, reps=a.reps, warmup=2 if mode == "compiled" else 1)
    ntok = a.batch * a.seq
    row = {"model": kind, "dtype": dtype, "mode": mode, "params": margs.num_params(),
           "active_params": margs.num_params(active=True), "tokens_per_step": ntok, "max_logit_diff": diff,
           "target_speedup": TARGET[kind]}
    for name in models:
        row[f"{name}_step_ms"] = med(per_round[name]) * 1e3
        row[f"{name}_tokens_per_s"] = ntok / med(per_round[name])
    row["speedup_vs_hf"] = ratio(per_round, "hf", "ours")
    if "hf_loop" in models:
        row["speedup_vs_hf_loop"] = ratio(per_round, "hf_loop", "ours")
    row["target_met"] = row["speedup_vs_hf"] >= TARGET[kind]
    row["per_round_ms"] = {k: [t * 1e3 for t in v] for k, v in per_round.items()}
    # Where each step's time goes (one profiled step per model): the GEMM share bounds any possible speedup.
    if a.profile:
        row["profile"] = {name: profile_ops(steps[name], top=10) for name in models}
        print("  GEMM share of step time: " + ", ".join(f"{n} {100 * row['profile'][n]['gemm_share']:.0f}%"
                                                      for n in models), flush=True)
    print(f"  -> ours {row['ours_tokens_per_s']:.0f} tok/s, HF {row['hf_tokens_per_s']:.0f} tok/s, "
          f"speedup {row['speedup_vs_hf']:.2f}x (target {TARGET[kind]}x)", flush=True)
    del ours, hf, models, steps
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    p = base_parser("bench_throughput", __doc__)
    p.add_argument("--models", default="dense,moe", help="comma list of dense, moe")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32, bf16 (autocast); default fp32, plus bf16 where the CPU has native bf16")
    p.add_argument("--modes", default=None, help="comma list of eager, compiled (default both; smoke: eager)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn-dim", type=int, default=704, help="dense FFN size, also each expert's size for moe")
    p.add_argument("--vocab", type=int, default=49152, help="49152 = the SmolLM2 tokenizer in assets/")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--no-hf-loop", dest="hf_loop", action="store_false",
                   help="skip the HF Mixtral per-expert-loop reference")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one step per model after timing (default on, off in --smoke)")
    a = p.parse_args(argv)
    a.profile = (not a.smoke) if a.profile is None else a.profile
    if a.smoke:
        a.dim, a.layers, a.heads, a.kv_heads, a.ffn_dim = 64, 2, 4, 2, 128
        a.vocab, a.batch, a.seq, a.reps = 512, 2, 32, 1
        a.modes = a.modes or "eager"
        a.dtypes = a.dtypes or "fp32,bf16"  # tiny shapes: bf16 is cheap even where it is emulated
    a.modes = a.modes or "eager,compiled"
    setup(a)
    dtypes, probe = default_dtypes(a.dtypes)
    rows = []
    for mode in a.modes.split(","):
        for kind in a.models.split(","):
            for dtype in dtypes:
                rows.append(run_config(kind, dtype, mode, a))
    print("\nmodel  dtype  mode      ours tok/s   HF tok/s   speedup  target")
    for r in rows:
        print(f"{r['model']:6} {r['dtype']:6} {r['mode']:9} {r['ours_tokens_per_s']:10.0f} {r['hf_tokens_per_s']:10.0f}"
              f"   {r['speedup_vs_hf']:6.2f}x  {r['target_speedup']}x {'met' if r['target_met'] else 'MISSED'}")
    write_result("bench_throughput", a, {"shapes": {k: getattr(a, k) for k in (
        "dim", "layers", "heads", "kv_heads", "ffn_dim", "vocab", "batch", "seq")}, "bf16_probe": probe,
        "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
