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
Targets: dense >= 1.2x, MoE >= 1.3x; MFU (against a 1024^3 GEMM of the same dtype, timed as one more interleaved
variant) >= 60% for the dense model. After the timing, one step of each model runs under torch.profiler
(common.profile_ops): `profile.<model>.gemm_share` is the share of its step spent in GEMM kernels, which both
implementations call with the same shapes, so even with zero non-GEMM work ours is at most 1 / gemm_share(HF)
times faster than HF.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import (base_parser, build_hf_twin, build_ours, compile_blocks, default_dtypes, hf_forward, interleaved,
                    max_logit_diff, med, ours_forward, profile_ops, random_batch, ratio, setup, train_step_fn,
                    write_result)
from titan_aquila.metrics import measure_peak_flops, peak_rss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

TARGET = {"dense": 1.2, "moe": 1.3}


def model_args(kind: str, a):
    from titan_aquila.models.args import ModelArgs

    kw = dict(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn_dim,
              vocab_size=a.vocab, max_seq_len=max(a.seq, 64), tie_embeddings=a.tie)
    if kind == "moe":
        kw.update(n_experts=8, top_k=2, moe_ffn_dim=a.ffn_dim, n_layers=a.moe_layers or a.layers)
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
    if a.plain_too:  # our model with the plain logits + loss, to separate the fused loss's share of the speedup
        models["ours_plain"] = (ours, False)
    if kind == "moe" and a.hf_loop:
        hf_loop = build_hf_twin(ours, margs)
        hf_loop.set_experts_implementation("eager")
        models["hf_loop"] = (hf_loop, True)
    if mode == "compiled":
        for name, (m, is_hf) in models.items():
            if name != "ours_plain":  # the same module as "ours"
                compile_blocks(m, hf=is_hf, moe=kind == "moe")
    steps = {}
    for name, (m, is_hf) in models.items():
        fwd = hf_forward(m) if is_hf else ours_forward(m, labels if a.fused and name == "ours" else None)
        steps[name] = train_step_fn(fwd, list(m.parameters()), tokens, labels, bf16,
                                    aux_coeff=0.001 if (kind == "moe" and not is_hf) else 0.0)
    print(f"{kind} {dtype} {mode}: {margs.num_params() / 1e6:.1f}M params, batch {a.batch} x {a.seq}, "
          f"max|logit diff| {diff:.2e}", flush=True)
    # The GEMM peak of this dtype is one more interleaved variant, so MFU compares with a peak taken next to it.
    peaks: list[float] = []
    steps["gemm"] = lambda: peaks.append(measure_peak_flops(torch.device("cpu"), DTYPES[dtype], n=1024, iters=3))
    per_round = interleaved(steps, a.rounds, reps=a.reps, warmup=2 if mode == "compiled" else 1)
    del steps["gemm"], per_round["gemm"]
    ntok = a.batch * a.seq
    row = {"model": kind, "dtype": dtype, "mode": mode, "params": margs.num_params(),
           "active_params": margs.num_params(active=True), "tokens_per_step": ntok, "max_logit_diff": diff,
           "target_speedup": TARGET[kind]}
    for name in models:
        row[f"{name}_step_ms"] = med(per_round[name]) * 1e3
        row[f"{name}_tokens_per_s"] = ntok / med(per_round[name])
    row["speedup_vs_hf"] = ratio(per_round, "hf", "ours")
    if "ours_plain" in models:
        row["speedup_fused_vs_plain_loss"] = ratio(per_round, "ours_plain", "ours")
    row["gemm_peak_gflops"] = max(peaks) / 1e9
    fpt = margs.flops_per_token(a.seq)
    for name in models:
        row[f"{name}_mfu_pct"] = 100 * fpt * row[f"{name}_tokens_per_s"] / max(peaks)
    row["peak_rss_gib_so_far"] = peak_rss_bytes() / 2 ** 30
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
          f"speedup {row['speedup_vs_hf']:.2f}x (target {TARGET[kind]}x); MFU ours {row['ours_mfu_pct']:.1f}%, HF "
          f"{row['hf_mfu_pct']:.1f}% of {row['gemm_peak_gflops']:.1f} GFLOP/s ({dtype} 1024^3 GEMM)", flush=True)
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
    p.add_argument("--tie", action="store_true", help="tied input/output embeddings (SmolLM2)")
    p.add_argument("--moe-layers", type=int, default=0, help="layers of the MoE model (default: --layers)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="ours with the fused chunked output + loss (the trainer's default)")
    p.add_argument("--plain-too", action="store_true", help="also time ours with the plain logits + loss")
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
        "dim", "layers", "moe_layers", "heads", "kv_heads", "ffn_dim", "vocab", "batch", "seq", "tie", "fused")}, "bf16_probe": probe,
        "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
