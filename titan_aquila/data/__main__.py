"""Data commands.

    python -m titan_aquila.data prepare CORPUS_DIR_OR_FILES... --out PREPARED_DIR [--tokenizer T] [--workers N]

then train on it with `--training.dataset_path PREPARED_DIR` (or mix several: `[training.datasets]` in the README).
"""

from __future__ import annotations

import argparse
import sys

from titan_aquila.errors import UserError, exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_aquila.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize .txt/.jsonl/.jsonl.gz/.parquet once into memory-mapped shards")
    prep.add_argument("inputs", nargs="+", help="files or folders (searched recursively)")
    prep.add_argument("--out", required=True, help="prepared folder to write (replaced atomically if it is one)")
    prep.add_argument("--tokenizer", default="assets/tokenizer/smollm2.tiktoken",
                      help="tokenizer file, as model.tokenizer_path (default: %(default)s)")
    prep.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0 = one per CPU core")
    prep.add_argument("--unit-mb", type=float, default=32.0,
                      help="input MB per shard (one worker task); default %(default)s")
    prep.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from titan_aquila.data.prepare import prepare

        if args.workers < 0:
            raise UserError(f"--workers must be >= 0, got {args.workers}")
        if args.unit_mb <= 0:
            raise UserError(f"--unit-mb must be > 0, got {args.unit_mb}")
        index = prepare(args.inputs, args.out, args.tokenizer, workers=args.workers, unit_mb=args.unit_mb,
                        progress_every=args.progress_every)
        st = index.get("stats", {})
        per_cpu = index["input_bytes"] / 1e6 / st["cpu_s"] if st.get("cpu_s") else float("nan")
        print(f"prepared {index['n_documents']:,} documents, {index['n_tokens']:,} tokens ({index['dtype']}, "
              f"{len(index['shards'])} shards) from {index['input_bytes'] / 1e6:,.1f} MB into {args.out}"
              + (f" in {st['seconds']:.1f} s with {st['workers']} process(es): {per_cpu:.2f} MB per CPU-second"
                 if st else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
