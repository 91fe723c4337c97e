"""Start-to-first-step and peak RSS of train.py on prepared shards vs raw text, at several corpus sizes, and the
throughput of `python -m titan_aquila.data prepare`.

    python benchmarks/bench_data.py [--sizes 0.1,1] [--raw-sizes 0.1,0.3] [--workers 2] [--workdir DIR]

Corpus. The real text of scripts/build_corpus.py (Debian packages: Austen, the KJV, the Jargon File, Chinese
classics and help pages, the Python docs; about 29 MB, built once into the work dir) is repeated until a corpus
reaches each size: copy c holds every document once, in an order shuffled with seed + c, written as .jsonl files
of 64 MB. Repeating text is fine here: this measures I/O, memory and start-up, not learning. `--smoke` uses the
shipped fixture instead (no packages, seconds).

Measured, each variant in a fresh process (nothing else runs in the benchmark meanwhile):
- prepare: wall seconds, input MB per wall second, and MB per CPU-second of the worker processes (= the rate of
  one fully busy process; `stats.cpu_s` of the index);
- train.py with a tiny model (dim 64, 2 layers, batch 2 x seq_len 512, one step) on the prepared folder and on the
  raw corpus: seconds from process start to the `step 1` console line, and the trainer's peak RSS at that moment
  (VmHWM read from /proc/PID/status as soon as the line appears; metrics.peak_rss_bytes is the same number read
  from inside).
Target: with prepared shards, start-to-first-step and RSS do not grow with the corpus. The raw path tokenizes the
whole corpus in the trainer (and keeps it in RAM), so it is measured only up to `--raw-sizes`.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, base_parser, setup, write_result

PART_BYTES = 64 * 10 ** 6
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}


def base_documents(work: Path, smoke: bool) -> list[str]:
    """Every document of the base text, in file order."""
    from titan_aquila.data.prepare import find_corpus_files, iter_documents, plan_pieces

    if smoke:
        src = [ROOT / "assets" / "text"]
    else:
        src = [work / "base"]
        if not (work / "base" / "PROVENANCE.md").is_file():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "build_corpus.py"), str(work / "base")],
                           check=True)
    docs = []
    for piece in plan_pieces(find_corpus_files(src), 1 << 40):
        docs += [d for d in iter_documents(*piece[:4], lambda n: None) if d.strip()]
    return docs


def make_corpus(docs: list[str], size: int, folder: Path, seed: int, part_bytes: int) -> int:
    """Copies of `docs` (each shuffled with seed + copy) as .jsonl parts until `size` bytes; returns the bytes."""
    done = folder / "DONE"
    if done.is_file():
        return int(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    total, part, copy, out = 0, 0, 0, None
    while total < size:
        order = list(range(len(docs)))
        random.Random(seed + copy).shuffle(order)
        for i in order:
            if out is None or out.tell() >= part_bytes:
                if out is not None:
                    out.close()
                out = (folder / f"part_{part:04d}.jsonl").open("w", encoding="utf-8")
                part += 1
            line = json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n"
            out.write(line)
            total += len(line.encode("utf-8"))
            if total >= size:
                break
        copy += 1
    if out is not None:
        out.close()
    done.write_text(str(total))
    return total


def run_prepare(corpus: Path, out: Path, workers: int, unit_mb: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "titan_aquila.data", "prepare", str(corpus), "--out", str(out),
                        "--workers", str(workers), "--unit-mb", str(unit_mb), "--progress-every", "30"],
                       cwd=ROOT, capture_output=True, text=True, env=_env())
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    wall = time.perf_counter() - t0
    index = json.loads((out / "index.json").read_text())
    st = index["stats"]
    mb = index["input_bytes"] / 1e6
    return {"input_mb": mb, "tokens": index["n_tokens"], "documents": index["n_documents"],
            "shards": len(index["shards"]), "workers": st["workers"], "wall_s": wall, "prepare_s": st["seconds"],
            "mb_per_s": mb / st["seconds"], "mb_per_s_per_process": mb / st["seconds"] / st["workers"],
            "mb_per_cpu_s": mb / st["cpu_s"], "progress_lines": p.stderr.count("prepare: ")}


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def first_step(data: Path, work: Path, tag: str, seq_len: int) -> dict:
    """train.py for one step on `data`: seconds to the step-1 line and peak RSS (MiB) at that moment."""
    cfg = work / f"train_{tag}.toml"
    cfg.write_text("\n".join([
        "[job]", f'dump_folder = "{work / ("run_" + tag)}"', "[model]", 'flavor = "debugmodel"',
        "overrides = {" + ", ".join(f"{k} = {v}" for k, v in TINY.items()) + "}",
        "[training]", "local_batch_size = 2", f"seq_len = {seq_len}", "steps = 1", f'dataset_path = ["{data}"]',
        "[metrics]", "log_freq = 1", "enable_tensorboard = false", ""]))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--job.config_file", str(cfg)], cwd=ROOT,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict = {}
    lines: list[str] = []

    def reader():
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step     1  loss") and "t" not in seen:
                seen["t"] = time.perf_counter() - t0
                seen["rss"] = _vmhwm(p.pid)

    th = threading.Thread(target=reader)
    th.start()
    p.wait()
    th.join()
    if p.returncode or "t" not in seen:
        raise SystemExit("".join(lines)[-3000:])
    return {"seconds_to_first_step": seen["t"], "peak_rss_mib": seen["rss"] / 2 ** 20}


def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def main(argv=None) -> int:
    ap = base_parser("bench_data", __doc__)
    ap.add_argument("--sizes", default="0.1,1", help="corpus sizes in GB for prepared shards (default %(default)s)")
    ap.add_argument("--raw-sizes", default="0.1,0.3", help="corpus sizes in GB also run on raw text")
    ap.add_argument("--workers", type=int, default=2, help="prepare worker processes (default %(default)s)")
    ap.add_argument("--workdir", default="/tmp/titan_aquila_bench_data", help="corpora and prepared folders")
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args(argv)
    setup(a)  # torch threads and seed, as every benchmark (recorded in the JSON's machine facts)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scale = 1e6 if a.smoke else 1e9  # smoke: "GB" are MB of the shipped fixture
    sizes = [float(s) for s in a.sizes.split(",")] if not a.smoke else [0.3, 1.0]
    raw_sizes = {float(s) for s in a.raw_sizes.split(",") if s} if not a.smoke else {0.3}
    seq_len = 64 if a.smoke else a.seq_len
    docs = base_documents(work, a.smoke)
    rows = []
    for size in sorted(set(sizes) | raw_sizes):
        tag = f"{size:g}{'_smoke' if a.smoke else ''}"
        corpus = work / f"corpus_{tag}"
        nbytes = make_corpus(docs, int(size * scale), corpus, a.seed, int(PART_BYTES * (1e-4 if a.smoke else 1)))
        row = {"size_gb": size, "corpus_mb": nbytes / 1e6}
        print(f"corpus {size:g} {'MB (smoke)' if a.smoke else 'GB'}: {nbytes / 1e6:,.1f} MB", flush=True)
        if size in sizes:
            prep = work / f"prepared_{tag}"
            row["prepare"] = run_prepare(corpus, prep, a.workers, 0.05 if a.smoke else 32)
            print(f"  prepare: {row['prepare']['prepare_s']:.1f} s, {row['prepare']['mb_per_s']:.2f} MB/s with "
                  f"{row['prepare']['workers']} processes, {row['prepare']['mb_per_cpu_s']:.2f} MB per CPU-second",
                  flush=True)
            row["prepared"] = first_step(prep, work, f"prepared_{tag}", seq_len)
            print(f"  prepared: first step after {row['prepared']['seconds_to_first_step']:.1f} s, peak RSS "
                  f"{row['prepared']['peak_rss_mib']:,.0f} MiB", flush=True)
        if size in raw_sizes:
            row["raw"] = first_step(corpus, work, f"raw_{tag}", seq_len)
            print(f"  raw text: first step after {row['raw']['seconds_to_first_step']:.1f} s, peak RSS "
                  f"{row['raw']['peak_rss_mib']:,.0f} MiB", flush=True)
        rows.append(row)
    prepared = [r for r in rows if "prepared" in r]
    summary = {}
    if len(prepared) >= 2:
        lo, hi = prepared[0], prepared[-1]
        summary = {"corpus_ratio": hi["corpus_mb"] / lo["corpus_mb"],
                   "prepared_time_ratio": hi["prepared"]["seconds_to_first_step"]
                   / lo["prepared"]["seconds_to_first_step"],
                   "prepared_rss_ratio": hi["prepared"]["peak_rss_mib"] / lo["prepared"]["peak_rss_mib"]}
        print(f"largest / smallest prepared corpus ({summary['corpus_ratio']:.1f}x the text): time to first step "
              f"{summary['prepared_time_ratio']:.2f}x, peak RSS {summary['prepared_rss_ratio']:.2f}x", flush=True)
    write_result("bench_data", a, {"seq_len": seq_len, "model": TINY, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
