"""Capacity-factor routing: training-step time and dropped fraction of one E8 top-2 MoE for capacity factors
c = 1, 1.25, 2 (each without and with `pad_to_capacity`) and dropless, side by side in one run, eager and compiled.

    python benchmarks/bench_moe_capacity.py --threads 1           # full run (eager + compiled, ~10 min here)
    python benchmarks/bench_moe_capacity.py --smoke               # seconds: tiny shapes, c = 1, eager
    python benchmarks/bench_moe_capacity.py --factors 1,2 --modes eager

Every variant is the same model (same seed, same weights, same batch), built once per variant because the capacity
is a property of the MoE layers; steps are interleaved round-robin (common.interleaved). A step is forward +
backward + AdamW, with the aux losses x 0.001 as the trainer adds them. 'compiled' compiles each block exactly as
train.py does (`parallelize.apply_compile`: fp32 dropless experts stay eager, padded experts compile).

Then, eager only, the MoE layer alone (layer 0 of each variant's model, input x ~ N(0, 1) of the step's shape,
forward + backward with fixed random output gradients, `--layer-reps` calls per round): the part capacity changes,
without the attention, output layer and optimizer that dilute the step ratio.

Reported per variant: median step time, ratio to dropless (< 1 = faster), the fraction of the routed (token, slot)
assignments dropped (over every MoE layer and every timed step), and the expert rows computed per layer and step:
T·k dropless, T·k − dropped unpadded, E·C padded (C = min(ceil(c·k·T/E), T): padding computes the empty slots too).
"""

from __future__ import annotations

import sys

import torch

from common import base_parser, build_ours, interleaved, llama_args, med, random_batch, ratio, setup, train_step_fn
from common import ours_forward, write_result


def variants(factors: list[float]) -> list[tuple[str, float | None, bool]]:
    out = [("dropless", None, False)]
    for c in factors:
        out += [(f"c={c:g}", c, False), (f"c={c:g} padded", c, True)]
    return out


def compile_like_trainer(model) -> None:
    from titan_aquila.config.job_config import Compile
    from titan_aquila.parallel.parallelize import apply_compile

    apply_compile(model, Compile(enable=True))  # one process, fp32: as train.py compiles


def moe_layers(model) -> list:
    from titan_aquila.train_utils import moe_modules

    return list(moe_modules(model).values())


def run_mode(a, mode: str) -> tuple[list[dict], dict]:
    """The interleaved steps of every variant in `mode`; returns the rows and the models (name -> model)."""
    from titan_aquila.models.capacity import expert_capacity

    T = a.batch * a.seq
    tokens, labels = random_batch(a.vocab, a.batch, a.seq, a.seed)
    steps, models, rows = {}, {}, []
    for name, c, pad in variants(a.factor_list):
        args = llama_args(a.dim, a.layers, a.vocab, a.seq, head_dim=a.dim // a.heads, n_experts=a.experts,
                          top_k=a.top_k, moe_ffn_dim=a.expert_ffn_dim, capacity_factor=c, pad_to_capacity=pad)
        model = build_ours(args, a.seed)
        if mode == "compiled":
            compile_like_trainer(model)
        models[name] = model
        steps[name] = train_step_fn(ours_forward(model), model.parameters(), tokens, labels, bf16=False,
                                    aux_coeff=0.001)
    print(f"{mode}: E{a.experts} top-{a.top_k}, Fe {a.expert_ffn_dim}, dim {a.dim}, {a.layers} layers, vocab "
          f"{a.vocab}, T = {a.batch} x {a.seq} = {T} tokens per micro-batch", flush=True)
    pr = interleaved(steps, a.rounds, reps=a.reps, warmup=2 if mode == "compiled" else 1)
    for name, c, pad in variants(a.factor_list):
        layers = moe_layers(models[name])
        routed = sum(m.tokens_per_expert.sum().item() for m in layers)
        dropped = sum(m.tokens_dropped.sum().item() for m in layers)
        cap = expert_capacity(c, a.top_k, T, a.experts) if c else None
        frac = dropped / routed if routed else 0.0
        computed = a.experts * cap if pad else T * a.top_k * (1 - frac)
        rows.append({"mode": mode, "variant": name, "capacity_factor": c, "pad_to_capacity": pad, "capacity": cap,
                     "step_ms": med(pr[name]) * 1e3, "vs_dropless": ratio(pr, name, "dropless"),
                     "dropped_fraction": frac, "expert_rows_per_layer_step": computed,
                     "per_round_ms": [t * 1e3 for t in pr[name]]})
    return rows, models


def layer_rows(a, models: dict) -> list[dict]:
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(a.batch, a.seq, a.dim, generator=g).requires_grad_()
    gy = torch.randn(a.batch, a.seq, a.dim, generator=g)

    def call(moe):
        def run():
            moe.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = moe(x)
            torch.autograd.backward([y, aux], [gy, torch.ones(2)])
        return run

    layers = {name: moe_layers(m)[0] for name, m in models.items()}
    pr = interleaved({name: call(m) for name, m in layers.items()}, a.rounds, reps=a.layer_reps, log=False)
    return [{"variant": name, "layer_ms": med(pr[name]) * 1e3, "vs_dropless": ratio(pr, name, "dropless"),
             "per_round_ms": [t * 1e3 for t in pr[name]]} for name in layers]


def main(argv=None) -> int:
    p = base_parser("bench_moe_capacity", __doc__)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn-dim", type=int, default=352)
    p.add_argument("--vocab", type=int, default=4096, help="small, so the MoE layers are most of the step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--layer-reps", type=int, default=5, help="timed MoE layer calls per variant per round")
    p.add_argument("--factors", default=None, help="comma list of capacity factors, default 1,1.25,2 (smoke: 1); "
                   "dropless always runs")
    p.add_argument("--modes", default=None, help="comma list of eager, compiled; default both (smoke: eager)")
    a = p.parse_args(argv)
    if a.smoke:
        a.dim, a.layers, a.heads, a.expert_ffn_dim, a.vocab, a.batch, a.seq = 64, 2, 2, 64, 256, 2, 32
        a.factors, a.modes = a.factors or "1", a.modes or "eager"
    a.factors, a.modes = a.factors or "1,1.25,2", a.modes or "eager,compiled"
    a.factor_list = [float(c) for c in a.factors.split(",")]
    setup(a)
    rows, layer = [], []
    for mode in a.modes.split(","):
        mode_rows, models = run_mode(a, mode)
        rows += mode_rows
        if mode == "eager":
            print("MoE layer 0 alone, forward + backward, eager", flush=True)
            layer = layer_rows(a, models)
        torch._dynamo.reset()
    print(f"\n{'mode':9} {'variant':16} {'C':>5} {'step ms':>9} {'vs dropless':>12} {'dropped':>8} {'expert rows':>12}")
    for r in rows:
        print(f"{r['mode']:9} {r['variant']:16} {r['capacity'] or '-':>5} {r['step_ms']:9.1f} "
              f"{r['vs_dropless']:11.3f}x {100 * r['dropped_fraction']:7.2f}% {r['expert_rows_per_layer_step']:12.0f}")
    for r in layer:
        print(f"{'layer':9} {r['variant']:16} {'':>5} {r['layer_ms']:9.1f} {r['vs_dropless']:11.3f}x")
    write_result("bench_moe_capacity", a, {"shapes": {k: getattr(a, k) for k in (
        "dim", "layers", "heads", "experts", "top_k", "expert_ffn_dim", "vocab", "batch", "seq")},
        "factors": a.factor_list, "results": rows, "moe_layer_eager": layer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
