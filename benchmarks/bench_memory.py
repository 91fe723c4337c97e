"""Per-rank peak RSS of start-up + growth + the first training step at world size 1, 2, 4, and of import/export.

Training part: a dense source checkpoint is grown at load (`growth.methods = ["fpi", "upcycle"]`: width x2, then
E experts top-2) by `train.py` under torchrun (gloo, FSDP2 over all ranks), one optimizer step. Each rank's peak
resident set (VmHWM, `titan_aquila.metrics.peak_rss_bytes`) is read just before the process exits. The fixed
per-process overhead (python, torch, gloo, tokenizer, data loader) is the same run with a model of ~1.6M
parameters (no growth). Target per rank at N ranks:

    peak_N <= 1.25 x (peak_1 - overhead_1) / N + overhead_N + root_N        (activations are ~20 MB here)

root_N (N > 1) = FSDP2's working copy of its root unit: embeddings and output (2 x 49152 x D floats) stay
unsharded from forward through backward (torchtitan's reshard_after_forward default), plus their unsharded
gradients; it does not shrink with N and one process has none.

Conversion part: `export-hf` of the grown checkpoint (after the 1-rank run) and `import-hf` of the result, each in
a fresh process; their peak RSS minus the overhead of a process that only imports the converter, against the
largest safetensors shard (target: peak <= 1.5 x the largest shard; reported with and without the overhead).

`--repo DIR` runs train.py and the converter of another checkout (e.g. the code before streaming) on the same
checkpoints, for a before/after table.

    python benchmarks/bench_memory.py [--worlds 1,2,4] [--repo DIR] [--smoke]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER, CONVERT = "--train-worker", "--convert-worker"


def _worker(kind: str, result: str, repo: str, argv: list[str]) -> None:
    """Run train.main / convert.main in this process and write this rank's peak RSS to `result`.rankN."""
    sys.path.insert(0, repo)
    from titan_aquila.metrics import peak_rss_bytes

    rank = os.environ.get("RANK", "0")

    def record() -> None:
        Path(f"{result}.rank{rank}").write_text(str(peak_rss_bytes()))

    if kind == CONVERT:
        from titan_aquila.convert.__main__ import main

        code = main(argv) if argv else 0  # no argv: the converter's import overhead only
        record()
        sys.exit(code)
    import titan_aquila.parallel.dist_utils as dist_utils

    finish = dist_utils.finish

    def finish_and_record(code: int) -> None:  # train.main ends with finish(code), an os._exit
        record()
        finish(code)

    dist_utils.finish = finish_and_record
    import train

    train.main(argv)


def _run(cmd: list[str], repo: Path, timeout: int = 1200) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def _peaks(result: Path, n: int) -> list[int]:
    return [int(Path(f"{result}.rank{r}").read_text()) for r in range(n)]


def _toml(path: Path, sections: dict) -> Path:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {val(v)}" for k, v in kv.items()) + "\n"
                              for s, kv in sections.items()))
    return path


def train_peaks(work: Path, repo: Path, world: int, sections: dict, name: str) -> list[int]:
    cfg = _toml(work / f"{name}.toml", sections)
    result = work / f"{name}.peak"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    _run([sys.executable, *launcher, str(Path(__file__).resolve()), WORKER, str(result), str(repo), "--",
          "--job.config_file", str(cfg)], repo)
    return _peaks(result, world)


def convert_peak(work: Path, repo: Path, name: str, *argv: str) -> int:
    result = work / f"{name}.peak"
    _run([sys.executable, str(Path(__file__).resolve()), CONVERT, str(result), str(repo), "--", *argv], repo)
    return _peaks(result, 1)[0]


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import base_parser, setup, write_result

    p = base_parser("bench_memory", __doc__)
    p.add_argument("--worlds", default="1,2,4", help="world sizes (gloo ranks)")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose train.py / converter run (default: this one)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    p.add_argument("--layers", type=int, default=8, help="source (and grown) layers")
    p.add_argument("--ffn-dim", type=int, default=1024, help="source FFN width (grown: 2x, and 8 experts of that)")
    args = p.parse_args()
    setup(args)
    import torch  # noqa: F401

    from titan_aquila.checkpoint.storage import write_model_checkpoint
    from titan_aquila.models.args import ModelArgs
    from titan_aquila.models.aquila import build_model

    repo = Path(args.repo).resolve()
    worlds = [int(w) for w in args.worlds.split(",")]
    dim, layers, ffn, experts = (64, 2, 128, 4) if args.smoke else (256, args.layers, args.ffn_dim, 8)
    src = ModelArgs(dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, ffn_dim=ffn, vocab_size=49152)
    grown = dict(dim=2 * dim, n_heads=16, n_kv_heads=4, ffn_dim=2 * ffn, n_layers=layers, n_experts=experts,
                 top_k=2, moe_ffn_dim=2 * ffn, vocab_size=49152)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        write_model_checkpoint(work / "src", build_model(src, seed=args.seed).state_dict(), src, {})
        n_params = src.replace(**grown).num_params()
        common = {"training": {"steps": 1, "seq_len": 64, "global_batch_size": 4, "local_batch_size": 1, "seed": 1},
                  "lr_scheduler": {"warmup_steps": 1}, "metrics": {"log_freq": 1, "enable_tensorboard": False}}
        rows = []
        for world in worlds:
            base = train_peaks(work, repo, world, {**common, "job": {"dump_folder": str(work / f"b{world}")},
                                                   "model": {"flavor": "debugmodel", "overrides": dict(
                                                       dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)},
                                                   "training": {**common["training"], "local_batch_size": 4 // world}},
                               f"base{world}")
            ckpt = {"enable": True, "last_save_model_only": True} if world == 1 else {}
            peaks = train_peaks(work, repo, world, {
                **common, "job": {"dump_folder": str(work / f"g{world}")},
                "model": {"flavor": "debugmodel", "overrides": grown},
                "training": {**common["training"], "local_batch_size": 4 // world},
                "growth": {"enable": True, "source_path": str(work / "src"), "methods": ["fpi", "upcycle"]},
                "checkpoint": ckpt}, f"grow{world}")
            rows.append({"world": world, "peak_gib": [x / 2**30 for x in peaks], "overhead_gib": max(base) / 2**30})
            print(f"world {world}: per-rank peak {', '.join(f'{x / 2**30:.2f}' for x in peaks)} GiB; fixed "
                  f"overhead {max(base) / 2**30:.2f} GiB", flush=True)
        one = next((r for r in rows if r["world"] == 1), None)
        # FSDP2 keeps its root unit (embeddings + output: 2 V D floats) unsharded from forward through backward
        # (torchtitan's reshard_after_forward default), with its unsharded gradients: a per-rank working set that
        # does not shrink with N, like activations. One process has no such copy.
        root = 2 * 2 * 49152 * grown["dim"] * 4 / 2**30
        for r in rows:
            if one is not None:
                model_1 = max(one["peak_gib"]) - one["overhead_gib"]
                r["fsdp_root_gib"] = root if r["world"] > 1 else 0.0
                r["bound_gib"] = 1.25 * model_1 / r["world"] + r["overhead_gib"] + r["fsdp_root_gib"]
                r["met"] = max(r["peak_gib"]) <= r["bound_gib"]
                print(f"world {r['world']}: max peak {max(r['peak_gib']):.2f} GiB vs bound 1.25 x {model_1:.2f} / "
                      f"{r['world']} + overhead {r['overhead_gib']:.2f} + FSDP root {r['fsdp_root_gib']:.2f} = "
                      f"{r['bound_gib']:.2f} GiB: {'met' if r['met'] else 'missed'}", flush=True)
        conv = {}
        if one is not None:
            step = next((work / "g1" / "checkpoint").glob("step-*"))
            size = sum(f.stat().st_size for f in step.iterdir() if f.suffix == ".distcp")
            overhead = convert_peak(work, repo, "conv_base")
            exp = convert_peak(work, repo, "export", "export-hf", str(step), str(work / "hf"), "--dtype", "float32")
            shard = max(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
            imp = convert_peak(work, repo, "import", "import-hf", str(work / "hf"), str(work / "back"))
            conv = {"checkpoint_gib": size / 2**30, "largest_shard_gib": shard / 2**30,
                    "overhead_gib": overhead / 2**30, "export_peak_gib": exp / 2**30, "import_peak_gib": imp / 2**30,
                    "export_over_shard": (exp - overhead) / shard, "import_over_shard": (imp - overhead) / shard,
                    "export_over_shard_with_overhead": exp / shard, "import_over_shard_with_overhead": imp / shard}
            print(f"checkpoint {size / 2**30:.2f} GiB, largest shard {shard / 2**30:.2f} GiB; export peak "
                  f"{exp / 2**30:.2f} GiB, import peak {imp / 2**30:.2f} GiB, converter overhead "
                  f"{overhead / 2**30:.2f} GiB", flush=True)
    write_result("bench_memory", args, {"repo": str(repo), "grown_params": n_params, "train": rows, "convert": conv})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in (WORKER, CONVERT):
        kind, result, repo = sys.argv[1:4]
        _worker(kind, result, repo, sys.argv[5:])
    else:
        main()
