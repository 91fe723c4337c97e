"""Model FLOPs utilisation (MFU) of our training step for a few model widths, against a GEMM peak measured in the
same run.

    python benchmarks/bench_mfu.py                       # full run (a few minutes on the 2-core box)
    python benchmarks/bench_mfu.py --smoke               # seconds, tiny shapes
    python benchmarks/bench_mfu.py --dims 256 --dtypes fp32,bf16 --gemm-n 1024

MFU = (flops_per_token(seq) * tokens per step / step time) / peak, where flops_per_token is
ModelArgs.flops_per_token (6 * matmul parameters + 12 * L * H * head_dim * seq, torchtitan/PaLM convention) and
peak is titan_aquila.metrics.measure_peak_flops (best of a few n^3 GEMMs, n = --gemm-n, default 2048) in the
step's dtype. The GEMM is one more variant of the interleaved round-robin, so the peak is taken next to the steps
it is compared with. `mfu_pct` = median step FLOP/s / best peak over the rounds (a peak is a best case, and one
descheduled OpenMP thread on the shared box can make a single GEMM measurement 40x slow); `mfu_pct_paired` is the
median over rounds of each round's step FLOP/s / that round's peak. One step = zero_grad, forward, cross-entropy,
backward, AdamW (common.train_step_fn). Models: common.llama_args (head_dim 64, GQA 2:1, FFN 8/3 dim).

Caveat (CPUs without native bf16, e.g. an AVX2 box): the bf16 fallback GEMM is layout dependent (square
a @ b ~0.9 GFLOP/s, a @ b.T as F.linear does ~5.6, a.T @ b ~13, which autograd's weight gradient can hit), and
measure_peak_flops takes the best of a @ b and F.linear only, so the bf16 "peak" is not a ceiling there and bf16
MFU can exceed 100%; bf16 is left out of the defaults on such CPUs. With native bf16 (AVX512-BF16/AMX) the layouts
differ less (a @ b 108, F.linear 190 GFLOP/s on one thread of one such box).

Also checks the FLOP model: torch.utils.flop_counter counts the matmul FLOPs of one real step, compared with
the analytic matmul part (flops_per_token minus the attention-score term, which the counter does not see on CPU
because SDPA runs as one fused kernel there); `flop_counter_ratio` ~ 1 (slightly below: ModelArgs counts the
norm weights as matmul parameters, 6 * (2L+1) * dim FLOPs/token).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (base_parser, build_ours, default_dtypes, interleaved, llama_args, med, ours_forward, random_batch,
                    setup, train_step_fn, write_result)
from titan_aquila.metrics import measure_peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def counted_matmul_flops(step) -> int:
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def run_size(dim: int, dtype: str, a) -> dict:
    margs = llama_args(dim, a.layers, a.vocab, a.seq)
    model = build_ours(margs, seed=a.seed)
    tokens, labels = random_batch(margs.vocab_size, a.batch, a.seq, a.seed)
    step = train_step_fn(ours_forward(model), model.parameters(), tokens, labels, bf16=dtype == "bf16")
    ntok = a.batch * a.seq
    fpt = margs.flops_per_token(a.seq)
    step_flops = fpt * ntok
    attn = 12 * margs.n_layers * margs.n_heads * margs.head_dim * a.seq
    counter_ratio = counted_matmul_flops(step) / ((fpt - attn) * ntok)

    peaks: list[float] = []  # one entry per GEMM call, in call order (warmup first)
    cpu = torch.device("cpu")
    gemm = lambda: peaks.append(measure_peak_flops(cpu, DTYPES[dtype], n=a.gemm_n, iters=a.gemm_iters))  # noqa
    print(f"dim {dim} {dtype}: {margs.num_params() / 1e6:.1f}M params, {fpt / 1e6:.1f} MFLOP/token, "
          f"batch {a.batch} x {a.seq}, flop counter / analytic matmul FLOPs {counter_ratio:.4f}", flush=True)
    per_round = interleaved({"step": step, "gemm": gemm}, a.rounds, reps=a.reps, warmup=1)
    round_peak = [max(peaks[1 + r * a.reps:1 + (r + 1) * a.reps]) for r in range(a.rounds)]
    mfu_rounds = [100 * step_flops / t / p for t, p in zip(per_round["step"], round_peak)]
    row = {"dim": dim, "dtype": dtype, "n_layers": margs.n_layers, "n_heads": margs.n_heads,
           "n_kv_heads": margs.n_kv_heads, "ffn_dim": margs.ffn_dim, "vocab": margs.vocab_size,
           "params": margs.num_params(), "flops_per_token": fpt, "tokens_per_step": ntok,
           "flop_counter_ratio": counter_ratio, "step_ms": med(per_round["step"]) * 1e3,
           "tokens_per_s": ntok / med(per_round["step"]), "achieved_gflops": step_flops / med(per_round["step"]) / 1e9,
           "gemm_n": a.gemm_n, "peak_gflops": max(round_peak) / 1e9, "median_peak_gflops": med(round_peak) / 1e9,
           "mfu_pct": 100 * step_flops / med(per_round["step"]) / max(round_peak), "mfu_pct_paired": med(mfu_rounds),
           "per_round": {"step_ms": [t * 1e3 for t in per_round["step"]], "peak_gflops": [p / 1e9 for p in round_peak],
                         "mfu_pct": mfu_rounds}}
    print(f"  -> {row['achieved_gflops']:.1f} GFLOP/s of {row['peak_gflops']:.1f} ({dtype} {a.gemm_n}^3 GEMM): "
          f"MFU {row['mfu_pct']:.1f}%", flush=True)
    return row


def main(argv=None) -> int:
    p = base_parser("bench_mfu", __doc__)
    p.add_argument("--dims", default="128,256,512", help="comma list of model widths")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192,
                   help="small on purpose: with 49152 the output layer is most of the FLOPs of a dim-128 model")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="timed steps (and GEMM peaks) per variant per round")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16; default fp32 (+ bf16 if native)")
    p.add_argument("--gemm-n", type=int, default=2048, help="peak GEMM size n (n x n x n)")
    p.add_argument("--gemm-iters", type=int, default=3, help="GEMMs per peak measurement (best is kept)")
    a = p.parse_args(argv)
    if a.smoke:
        a.dims, a.layers, a.vocab, a.batch, a.seq, a.reps, a.gemm_n = "32,64", 2, 256, 2, 32, 1, 256
        a.dtypes = a.dtypes or "fp32,bf16"
    setup(a)
    dtypes, probe = default_dtypes(a.dtypes)
    rows = [run_size(int(d), dt, a) for dt in dtypes for d in a.dims.split(",")]
    print("\n  dim  dtype   params   MFLOP/tok   step ms   GFLOP/s   peak GFLOP/s   MFU%")
    for r in rows:
        print(f"{r['dim']:5} {r['dtype']:6} {r['params'] / 1e6:7.1f}M {r['flops_per_token'] / 1e6:10.1f} "
              f"{r['step_ms']:9.1f} {r['achieved_gflops']:9.1f} {r['peak_gflops']:14.1f} {r['mfu_pct']:6.1f}")
    write_result("bench_mfu", a, {"shapes": {"layers": a.layers, "vocab": a.vocab, "batch": a.batch, "seq": a.seq},
                                  "bf16_probe": probe, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
