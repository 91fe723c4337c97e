"""Training-step throughput and peak memory of titan_aquila vs HF transformers on the same shapes, weights, batch,
dtype and threads, every configuration of both frameworks side by side in one run.

    python benchmarks/bench_throughput.py --preset smollm2 --threads 2       # SmolLM2-135M, 1 x 1024 tokens
    python benchmarks/bench_throughput.py --preset smollm2_moe --threads 2   # SmolLM2 width, 8 layers of E8 top-2
    python benchmarks/bench_throughput.py --preset smollm2 --layers 2 --seq 128   # a preset, reduced (flags win)
    python benchmarks/bench_throughput.py --smoke        # seconds, tiny shapes, eager only
    python benchmarks/bench_throughput.py --dtypes fp32,bf16   # force bf16 (default: only where bf16 GEMMs are native)

Presets (PRESETS; any explicit flag overrides them): `smollm2` = SmolLM2-135M exactly (dim 576, 30 layers, 9/3 heads,
FFN 1536, vocab 49,152, tied), `smollm2_moe` = the same width with 8 layers of 8 experts top-2 (expert FFN 1536;
without the HF per-expert-loop reference), both at batch 1 x sequence 1024, eager and compiled, 2 rounds of 1 step.

One step = zero_grad, forward, cross-entropy on fp32 logits (ours: the fused chunked output + loss, the trainer's
default; + aux losses x 0.001 for our MoE; HF Mixtral runs with output_router_logits=False, so ours does strictly
more work), backward, torch.optim.AdamW(foreach) step.
  dense: ours vs HF LlamaForCausalLM (attn_implementation="sdpa")
  moe:   ours E8 top-2 vs HF MixtralForCausalLM (sdpa; transformers' default experts implementation, "grouped_mm"
         in transformers 5), and vs the same with the per-expert loop ("eager" experts, eager mode only) for reference.
Both models hold identical weights (copied through titan_aquila.convert.hf_map), so max_logit_diff checks they compute
the same function.

Configurations: per (model kind, dtype), every framework variant (ours, ours_plain with --plain-too, hf, hf_loop) in
every mode of --modes ("compiled" = torch.compile per decoder block: ours exactly as train.py compiles,
`parallelize.apply_compile`; HF each decoder layer whole). Eager and compiled versions of one model share its
parameters and optimizer (common.BlockSwitch swaps the blocks), so all configurations run interleaved in one process:
each is first warmed up (eager 1 step, compiled 2: compilation is excluded from the timing; `warmup_s` records those
steps), then `rounds` rounds of `reps` timed steps (common.interleaved). A compiled HF variant that fails to compile
is dropped with its error recorded (`failed`); ours failing is an error.
Best configuration: per framework, the variant with the lowest median step time; `speedup_best_vs_best` is the
median over rounds of time(HF best) / time(ours best) and is what the targets are stated on (dense >= 1.2x, MoE >=
1.3x). `speedup_same_mode` compares ours and hf mode by mode. MFU = ModelArgs.flops_per_token x tokens/s over a
1024^3 GEMM of the same dtype, timed as one more interleaved variant (target >= 60% for the dense model).

Peak memory per configuration (`memory`, before the timing, --no-memory skips it): VmHWM is process-wide, so each
configuration is measured alone in this process: free everything (gc + glibc malloc_trim, so the resident set is what
is still in use), reset the high-water mark to the current RSS (`5` into /proc/self/clear_refs), build that
configuration's model, compile it if compiled, create its AdamW state (one step on zero gradients), run one
training step, and read VmHWM; then tear it down (torch._dynamo.reset). `delta_gib` = VmHWM - RSS before the build is
the configuration's own peak: parameters + AdamW state + gradients + activations + (compiled) compilation, what a
training process of that configuration holds above its imports at its first step, its peak (later steps hold the same
minus the compile transient). The first step of any model in a process also allocates one-time state (lazy imports,
kernel caches, for compiled dynamo and inductor themselves; 0.06-0.14 GiB for an eager step at SmolLM2 width, 4
layers), which would be charged to whichever configuration runs first; a tiny run of each code path (`prime_code_paths`) pays it beforehand, so each
configuration is measured in the same state whatever its order (measured: a configuration probed first or after
another agrees within 2%). That is why this, and not a fresh subprocess per configuration: a fresh process would
add that one-time cost to every configuration, plus 6-16 s of imports each here. `file_pages_gib` is the part of the
delta that is shared-library code paged in (about 0 after priming); `peak_rss_gib` is the VmHWM itself (includes
the imports and what earlier configurations left resident); `baseline_rss_gib` (top level) is the RSS after imports.
The HF model of a memory probe has HF's own random init (same shapes, so the same memory; MoE routing differs, not
the T*k expert rows). Inductor's compile worker processes are not counted (their memory is their own).

After the timing, the best variant of each framework runs one step under torch.profiler (common.profile_ops):
`profile.<variant>.gemm_share` is the share of its step spent in GEMM kernels, which both implementations call with
the same shapes, so even with zero non-GEMM work ours is at most 1 / gemm_share(HF) times faster than HF.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import (BlockSwitch, base_parser, bf16_gemm_probe, build_hf_twin, build_ours, default_dtypes, hf_forward,
                    hf_model, interleaved, max_logit_diff, med, ours_forward, prime_optimizer, profile_ops,
                    random_batch, ratio, release_free_memory, reset_peak_rss, rss_bytes, setup, train_step_fn,
                    write_result)
from titan_aquila.metrics import cpu_bf16_report, measure_peak_flops, peak_rss_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = {"dense": 1.2, "moe": 1.3}
GIB = 2 ** 30
_SMOLLM2 = {"dim": 576, "heads": 9, "kv_heads": 3, "ffn_dim": 1536, "vocab": 49152, "tie": True, "batch": 1,
            "seq": 1024, "modes": "eager,compiled", "rounds": 2, "reps": 1}
PRESETS = {"smollm2": {**_SMOLLM2, "models": "dense", "layers": 30},
           "smollm2_moe": {**_SMOLLM2, "models": "moe", "layers": 8, "hf_loop": False}}


def model_args(kind: str, a):
    from titan_aquila.models.args import ModelArgs

    kw = dict(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn_dim,
              vocab_size=a.vocab, max_seq_len=max(a.seq, 64), tie_embeddings=a.tie)
    if kind == "moe":
        kw.update(n_experts=8, top_k=2, moe_ffn_dim=a.ffn_dim, n_layers=a.moe_layers or a.layers)
    return ModelArgs(**kw).validate()


def variant_list(kind: str, a) -> list[tuple[str, str, str]]:
    """(name, model, mode) of every configuration: name = '<model>.<mode>'."""
    models = ["ours"] + (["ours_plain"] if a.plain_too else []) + ["hf"]
    out = [(f"{m}.{mode}", m, mode) for mode in a.modes.split(",") for m in models]
    if kind == "moe" and a.hf_loop:  # a reference only: eager
        out.append(("hf_loop.eager", "hf_loop", "eager"))
    return out


def framework(model: str) -> str:
    return "hf" if model.startswith("hf") else "ours"


def make_step(model: str, m, kind: str, dtype: str, tokens, labels, a):
    is_hf = framework(model) == "hf"
    fwd = hf_forward(m) if is_hf else ours_forward(m, labels if a.fused and model == "ours" else None)
    return train_step_fn(fwd, list(m.parameters()), tokens, labels, dtype == "bf16",
                         aux_coeff=0.001 if (kind == "moe" and not is_hf) else 0.0)


def probe_step(model: str, mode: str, kind: str, dtype: str, margs, tokens, labels, a) -> None:
    """Build one configuration's model (HF: its own init), compile it if compiled, create its AdamW state (one step
    on zero gradients) and run one training step."""
    m = build_ours(margs, seed=a.seed) if framework(model) == "ours" else hf_model(margs)
    if model == "hf_loop":
        m.set_experts_implementation("eager")
    switch = BlockSwitch(m, hf=framework(model) == "hf")
    if mode == "compiled":
        switch.compile()
        switch.use("compiled")
    step = make_step(model, m, kind, dtype, tokens, labels, a)
    prime_optimizer(step.optimizer)
    step()


_PRIMED: set[tuple] = set()


def prime_code_paths(model: str, mode: str, kind: str, dtype: str, a) -> None:
    """Run `probe_step` once at tiny shapes (1 layer, dim 64, vocab 512, 32 tokens), once per process for each code
    path: the first run of a path allocates one-time state (lazily imported modules, kernel and dispatch caches;
    for compiled, dynamo and inductor themselves: 0.1-0.2 GiB) that would otherwise be charged to whichever
    configuration is measured first."""
    key = (kind, model, mode) + ((dtype,) if mode == "eager" else ())
    if key in _PRIMED:
        return
    _PRIMED.add(key)
    tiny = argparse.Namespace(**{**vars(a), "dim": 64, "layers": 1, "moe_layers": 0, "heads": 4, "kv_heads": 2,
                                 "ffn_dim": 128, "vocab": 512, "seq": 32})
    tokens, labels = random_batch(512, 1, 32, a.seed)
    probe_step(model, mode, kind, dtype, model_args(kind, tiny), tokens, labels, tiny)
    torch._dynamo.reset()


def memory_probe(model: str, mode: str, kind: str, dtype: str, margs, tokens, labels, a) -> dict:
    """Peak RSS of one configuration's first training step, alone in this process (see the module docstring)."""
    prime_code_paths(model, mode, kind, dtype, a)
    release_free_memory()
    before, file_before = rss_bytes(), rss_bytes("File")
    reset_peak_rss()
    probe_step(model, mode, kind, dtype, margs, tokens, labels, a)  # everything it built is freed on return
    peak, file_pages = peak_rss_bytes(), rss_bytes("File") - file_before
    torch._dynamo.reset()  # the next probe (or the timing) starts with release_free_memory()
    return {"rss_before_gib": before / GIB, "peak_rss_gib": peak / GIB, "delta_gib": (peak - before) / GIB,
            "file_pages_gib": file_pages / GIB}


def build_models(kind: str, margs, a) -> dict:
    ours = build_ours(margs, seed=a.seed)
    models = {"ours": ours, "hf": build_hf_twin(ours, margs)}
    if a.plain_too:  # our model with the plain logits + loss, to separate the fused loss's share of the speedup
        models["ours_plain"] = ours
    if kind == "moe" and a.hf_loop:
        models["hf_loop"] = build_hf_twin(ours, margs)
        models["hf_loop"].set_experts_implementation("eager")
    return models


def warm_up(fns: dict, variants: list, failed: dict) -> dict[str, list[float]]:
    """Run each variant's untimed steps (eager 1, compiled 2: the first compiles); a compiled HF variant that fails
    is removed from `fns` with its error in `failed`."""
    times = {}
    for name, model, mode in variants:
        times[name] = []
        try:
            for _ in range(2 if mode == "compiled" else 1):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        except Exception as e:  # HF's compile support varies by version; ours must work
            if framework(model) == "ours" or mode != "compiled":
                raise
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {name}: dropped, compiling failed ({failed[name]})", flush=True)
            del fns[name], times[name]
        else:
            print(f"  {name}: warm-up steps {', '.join(f'{t:.2f}' for t in times[name])} s", flush=True)
    return times


def run_config(kind: str, dtype: str, a) -> dict:
    from torch._dynamo.utils import counters

    margs = model_args(kind, a)
    tokens, labels = random_batch(margs.vocab_size, a.batch, a.seq, a.seed)
    variants = variant_list(kind, a)
    print(f"{kind} {dtype}: {margs.num_params() / 1e6:.1f}M params ({margs.num_params(active=True) / 1e6:.1f}M "
          f"active), batch {a.batch} x {a.seq}, variants {', '.join(v[0] for v in variants)}", flush=True)
    clock = [time.perf_counter()]
    phase_s = {}

    def lap(name: str) -> None:  # wall seconds of each phase, to size a run
        clock.append(time.perf_counter())
        phase_s[name] = clock[-1] - clock[-2]

    memory = {}
    if a.memory:
        for name, model, mode in variants:
            memory[name] = memory_probe(model, mode, kind, dtype, margs, tokens, labels, a)
            print(f"  memory {name}: peak {memory[name]['peak_rss_gib']:.2f} GiB, +{memory[name]['delta_gib']:.2f} "
                  f"GiB over the {memory[name]['rss_before_gib']:.2f} GiB before it", flush=True)
    lap("memory")
    models = build_models(kind, margs, a)
    diff = max_logit_diff(ours_forward(models["ours"]), hf_forward(models["hf"]), tokens)
    print(f"  max|logit diff| ours vs HF {diff:.2e}", flush=True)
    switches = {m: BlockSwitch(models[m], hf=framework(m) == "hf") for m in models if m != "ours_plain"}
    switches["ours_plain"] = switches["ours"]  # the same module
    if "compiled" in a.modes.split(","):
        for m, sw in switches.items():
            if m in ("ours", "hf"):  # compiles ours_plain's blocks too; hf_loop is eager only
                sw.compile()
    step_fns = {m: make_step(m, models[m], kind, dtype, tokens, labels, a) for m in models}
    fns = {name: (lambda sw=switches[m], mode=mode, step=step_fns[m]: (sw.use(mode), step())[1])
           for name, m, mode in variants}
    failed: dict[str, str] = {}
    lap("build")
    warmup_s = warm_up(fns, variants, failed)
    lap("warmup")
    variants = [v for v in variants if v[0] in fns]
    # The GEMM peak of this dtype is one more interleaved variant, so MFU compares with a peak taken next to it.
    peaks: list[float] = []
    fns["gemm"] = lambda: peaks.append(measure_peak_flops(torch.device("cpu"), DTYPES[dtype], n=1024, iters=3))
    graphs = counters["stats"]["unique_graphs"]
    per_round = interleaved(fns, a.rounds, reps=a.reps, warmup=0)
    lap("timing")
    recompiled = counters["stats"]["unique_graphs"] - graphs  # swapping eager/compiled blocks must not recompile
    if recompiled:
        print(f"  warning: {recompiled} graph(s) compiled during the timed rounds", flush=True)
    ntok, fpt, peak = a.batch * a.seq, margs.flops_per_token(a.seq), max(peaks)
    row = {"model": kind, "dtype": dtype, "params": margs.num_params(), "active_params": margs.num_params(active=True),
           "tokens_per_step": ntok, "max_logit_diff": diff, "target_speedup": TARGET[kind],
           "gemm_peak_gflops": peak / 1e9, "variants": {}, "failed": failed,
           "graphs_compiled_while_timing": recompiled}
    for name, model, mode in variants:
        t = med(per_round[name])
        row["variants"][name] = {"framework": framework(model), "model": model, "mode": mode, "step_ms": t * 1e3,
                                 "tokens_per_s": ntok / t, "mfu_pct": 100 * fpt * ntok / t / peak,
                                 "warmup_s": warmup_s[name], "memory": memory.get(name)}
    best = {fw: min((n for n, m, _ in variants if framework(m) == fw), key=lambda n: med(per_round[n]))
            for fw in ("ours", "hf")}
    row["best"] = best
    row["speedup_best_vs_best"] = ratio(per_round, best["hf"], best["ours"])
    row["target_met"] = row["speedup_best_vs_best"] >= TARGET[kind]
    row["speedup_same_mode"] = {mode: ratio(per_round, f"hf.{mode}", f"ours.{mode}") for mode in a.modes.split(",")
                                if f"hf.{mode}" in per_round}
    if "hf_loop.eager" in per_round:
        row["speedup_vs_hf_loop"] = ratio(per_round, "hf_loop.eager", best["ours"])
    if a.plain_too:
        row["speedup_fused_vs_plain_loss"] = {mode: ratio(per_round, f"ours_plain.{mode}", f"ours.{mode}")
                                              for mode in a.modes.split(",")}
    row["process_peak_rss_gib"] = peak_rss_bytes() / GIB
    row["per_round_ms"] = {k: [t * 1e3 for t in v] for k, v in per_round.items()}
    # Where each best step's time goes (one profiled step each): the GEMM share bounds any possible speedup.
    if a.profile:
        row["profile"] = {n: profile_ops(fns[n], top=10, warmup=0) for n in best.values()}
        print("  GEMM share of step time: " + ", ".join(f"{n} {100 * p['gemm_share']:.0f}%"
                                                      for n, p in row["profile"].items()), flush=True)
    lap("profile")
    row["phase_s"] = phase_s
    v = row["variants"]
    print(f"  -> best: ours {best['ours']} {v[best['ours']]['tokens_per_s']:.0f} tok/s, HF {best['hf']} "
          f"{v[best['hf']]['tokens_per_s']:.0f} tok/s: {row['speedup_best_vs_best']:.2f}x (target {TARGET[kind]}x); "
          f"MFU ours {v[best['ours']]['mfu_pct']:.1f}% of {peak / 1e9:.1f} GFLOP/s ({dtype} 1024^3 GEMM)", flush=True)
    for sw in switches.values():
        sw.use("eager")  # drop the compiled blocks' references before the reset
    del models, switches, step_fns, fns
    torch._dynamo.reset()
    release_free_memory()
    return row


def parse(argv=None):
    p = base_parser("bench_throughput", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="real shapes (see the docstring); explicit flags override the preset's values")
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
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False,
                   help="tied input/output embeddings (SmolLM2)")
    p.add_argument("--moe-layers", type=int, default=0, help="layers of the MoE model (default: --layers)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="ours with the fused chunked output + loss (the trainer's default)")
    p.add_argument("--plain-too", action="store_true", help="also time ours with the plain logits + loss")
    p.add_argument("--hf-loop", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HF Mixtral with its per-expert loop (eager; a reference)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak RSS of each configuration before the timing (one step each)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one step of each framework's best variant after timing (default on, off in --smoke)")
    a = p.parse_args(argv)
    if a.preset:  # the preset's values become the defaults; flags given on the command line still win
        p.set_defaults(**PRESETS[a.preset])
        a = p.parse_args(argv)
    a.profile = (not a.smoke) if a.profile is None else a.profile
    if a.smoke:
        a.dim, a.layers, a.heads, a.kv_heads, a.ffn_dim = 64, 2, 4, 2, 128
        a.vocab, a.batch, a.seq, a.reps = 512, 2, 32, 1
        a.modes = a.modes or "eager"
        a.dtypes = a.dtypes or "fp32,bf16"  # tiny shapes: bf16 is cheap even where it is emulated
    a.modes = a.modes or "eager,compiled"
    for flag, value, allowed in (("--modes", a.modes, {"eager", "compiled"}), ("--models", a.models, set(TARGET)),
                                 ("--dtypes", a.dtypes or "fp32", set(DTYPES))):
        if not value or not set(value.split(",")) <= allowed:
            p.error(f"{flag} {value!r}: a comma list of {', '.join(sorted(allowed))}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    setup(a)
    import gc

    gc.freeze()  # the imported modules' objects: each memory probe's gc.collect() then skips them (0.3 s -> ms)
    if a.memory:
        try:
            reset_peak_rss()
        except OSError as e:
            print(f"error: the peak RSS per configuration needs a writable /proc/self/clear_refs ({e}); "
                  f"run with --no-memory", file=sys.stderr)
            return 2
    release_free_memory()
    baseline = rss_bytes()
    dtypes, probe = default_dtypes(a.dtypes)
    probe = probe or bf16_gemm_probe()
    print(f"{torch.get_num_threads()} thread(s); {cpu_bf16_report(torch.bfloat16)}; GEMM probe fp32 "
          f"{probe['fp32_gflops']:.1f} / bf16 {probe['bf16_gflops']:.1f} GFLOP/s", flush=True)
    rows = [run_config(kind, dtype, a) for kind in a.models.split(",") for dtype in dtypes]
    print("\nmodel  dtype  variant              tok/s    MFU   peak-RSS delta")
    for r in rows:
        for name, v in r["variants"].items():
            mem = f"{v['memory']['delta_gib']:6.2f} GiB" if v["memory"] else "     -"
            print(f"{r['model']:6} {r['dtype']:6} {name:18} {v['tokens_per_s']:8.1f} {v['mfu_pct']:5.1f}%   {mem}")
        print(f"{'':14}best vs best: ours {r['best']['ours']} / HF {r['best']['hf']} = "
              f"{r['speedup_best_vs_best']:.2f}x (target {r['target_speedup']}x "
              f"{'met' if r['target_met'] else 'MISSED'})")
    shapes = {k: getattr(a, k) for k in ("preset", "dim", "layers", "moe_layers", "heads", "kv_heads", "ffn_dim",
                                         "vocab", "batch", "seq", "tie", "fused", "modes", "rounds", "reps")}
    write_result("bench_throughput", a, {"shapes": shapes, "bf16_probe": probe,
                                         "bf16_report": cpu_bf16_report(torch.bfloat16),
                                         "baseline_rss_gib": baseline / GIB, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
