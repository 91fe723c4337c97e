"""Tokenize a corpus once into memory-mappable token shards: `python -m titan_aquila.data prepare IN... --out DIR`.

Inputs and documents. Files named directly, plus every `.txt`, `.jsonl`, `.jsonl.gz` and `.parquet` file under
named folders (recursive, hidden entries skipped, sorted). A `.txt` file is one document; each non-blank line of
a `.jsonl`/`.jsonl.gz` file is one document (its "text" field); each row of a `.parquet` file is one (its "text"
column; needs pyarrow). Blank documents are skipped. This is the document order and the packing of the raw-text
loader (dataset.py), so for .txt/.jsonl inputs

    concat(shards)  ==  tokenize_documents(inputs)  ==  ids(d_0) ++ [eos] ++ ids(d_1) ++ [eos] ++ ...

Work. The inputs are cut into pieces at document boundaries (a .txt or .jsonl.gz file whole, a .jsonl file in
byte ranges ending at a newline, a parquet file by row group) and consecutive pieces grouped into units of about
`unit_mb`; worker processes tokenize one unit each into its own shard, streaming (bounded memory per worker). The
shards keep the units' order, so the result does not depend on the number of workers.

Atomic. Everything is written into a hidden temporary folder next to `--out` and renamed into place after the
index; an interrupted run leaves no prepared folder (and its temporary one is never read). An existing prepared
folder at `--out` is replaced only when the new one is complete; an existing folder that is not a prepared set is
refused. See prepared.py for the format and for reading.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from titan_aquila.data.prepared import FORMAT, INDEX_NAME, is_prepared
from titan_aquila.data.progress import Progress
from titan_aquila.data.sources import walk_files
from titan_aquila.errors import UserError

KINDS = {".jsonl.gz": "jsonl.gz", ".jsonl": "jsonl", ".txt": "txt", ".parquet": "parquet"}
FLUSH_TOKENS = 1 << 20  # a worker writes its ids to disk every ~1M tokens: memory per worker stays bounded


def file_kind(path: Path) -> str | None:
    return next((kind for suffix, kind in KINDS.items() if path.name.endswith(suffix)), None)


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type holding ids 0 .. vocab_size - 1 (half the disk and page cache of uint32)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def find_corpus_files(paths: list[str | Path]) -> list[Path]:
    """The input files in document order (see the module docstring); a bad path is a UserError."""
    if not paths:
        raise UserError("no input path given")
    for p in map(Path, paths):
        if p.is_file() and file_kind(p) is None:
            raise UserError(f"{p}: unsupported input (expected {', '.join(KINDS)})")
    files = walk_files(paths, file_kind, "input", ", ".join(KINDS))
    if any(file_kind(f) == "parquet" for f in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UserError(".parquet inputs need pyarrow (pip install pyarrow)") from None
    return files


def plan_pieces(files: list[Path], piece_bytes: int) -> list[tuple[str, str, int, int, int]]:
    """[(kind, path, start, stop, input bytes)]: byte ranges of .jsonl, row groups of .parquet, whole other files.
    A parquet file without a "text" column is refused here, before any work."""
    pieces = []
    for f in files:
        kind, size = file_kind(f), f.stat().st_size
        if kind == "jsonl" and size > piece_bytes:
            cuts = [0]
            with f.open("rb") as fh:
                while cuts[-1] + piece_bytes < size:
                    fh.seek(cuts[-1] + piece_bytes)
                    fh.readline()  # move to the start of the next line: a piece never splits a document
                    cuts.append(min(fh.tell(), size))
            cuts.append(size)
            pieces += [(kind, str(f), a, b, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
        elif kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f)
            names = meta.schema_arrow.names
            if "text" not in names:
                raise UserError(f"{f} has no 'text' column (columns: {', '.join(names) or 'none'})")
            md = meta.metadata
            sizes = [sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
                     for g in range(md.num_row_groups)]
            pieces += [(kind, str(f), g, g + 1, s) for g, s in enumerate(sizes)]
        else:
            pieces.append((kind, str(f), 0, size, size))
    return pieces


def group_units(pieces: list, unit_bytes: int) -> list[list]:
    """Consecutive pieces grouped until each unit holds at least `unit_bytes` of input (the last may hold less)."""
    units, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += piece[4]
        if size >= unit_bytes:
            units.append(current)
            current, size = [], 0
    return units + ([current] if current else [])


def _json_text(line: bytes, where: str) -> str | None:
    if not line.strip():
        return None
    try:
        text = json.loads(line.decode("utf-8-sig", errors="replace"))["text"]  # a byte-order mark is not text
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{where} is not a JSON object with a 'text' field") from None
    if not isinstance(text, str):
        raise UserError(f"{where}: 'text' is a {type(text).__name__}, not a string")
    return text


def iter_documents(kind: str, path: str, start: int, stop: int, done):
    """Documents of one piece, in file order; calls done(input bytes) as it reads (for the progress line)."""
    if kind == "txt":
        yield Path(path).read_text(encoding="utf-8-sig", errors="replace")  # text mode, as dataset.py reads it
        done(stop - start)
    elif kind == "jsonl":
        with open(path, "rb") as fh:
            fh.seek(start)
            pos = start
            for n, line in enumerate(fh, 1):
                if pos >= stop:
                    break
                # messages name the line; in a later piece of a split file, by its byte offset (no recount)
                text = _json_text(line, f"{path}:{n}" if start == 0 else f"{path} (line at byte {pos})")
                pos += len(line)
                done(len(line))
                if text is not None:
                    yield text
    elif kind == "jsonl.gz":
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as fh:
            seen = 0
            try:
                for n, line in enumerate(fh, 1):
                    text = _json_text(line, f"{path}:{n}")
                    done(raw.tell() - seen)
                    seen = raw.tell()
                    if text is not None:
                        yield text
            except (OSError, EOFError) as e:
                raise UserError(f"{path}: not a readable gzip file ({e})") from None
    else:  # parquet: one row group
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(start, columns=["text"])
        column = table.column("text")
        for n, text in enumerate(column.to_pylist()):
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path} row group {start} row {n}: 'text' is a {type(text).__name__}, not a string")
            yield text


# ------------------------------------------------------------------------------------------------ worker side
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, dtype: str, out_dir: str, counters) -> None:
    from titan_aquila.data.tokenizer import Tokenizer

    _WORKER.update(tokenizer=Tokenizer(tokenizer_path), dtype=np.dtype(dtype), out=Path(out_dir), counters=counters)


def tokenize_unit(job: tuple[int, list]) -> dict:
    """Tokenize one unit into `shard_NNNNN.bin` of the temporary folder; returns its counts."""
    uid, pieces = job
    tok, dtype, counters = _WORKER["tokenizer"], _WORKER["dtype"], _WORKER["counters"]
    name = f"shard_{uid:05d}.bin"
    cpu0 = time.process_time()
    n_tokens = n_docs = text_bytes = 0
    pending_bytes = 0

    def done(nbytes: int) -> None:
        nonlocal pending_bytes
        pending_bytes += nbytes

    with open(_WORKER["out"] / name, "wb") as out:
        buf: list[int] = []
        for kind, path, start, stop, size in pieces:
            for text in iter_documents(kind, path, start, stop, done):
                if not text.strip():
                    continue
                buf += tok.encode(text)
                buf.append(tok.eos_id)
                n_docs += 1
                text_bytes += len(text.encode("utf-8", errors="replace"))
                if len(buf) >= FLUSH_TOKENS:
                    np.asarray(buf, dtype=dtype).tofile(out)
                    n_tokens += len(buf)
                    _report(counters, pending_bytes, len(buf))
                    buf, pending_bytes = [], 0
            if kind == "parquet":
                done(size)
        np.asarray(buf, dtype=dtype).tofile(out)
        n_tokens += len(buf)
        _report(counters, pending_bytes, len(buf))
    return {"file": name, "n_tokens": n_tokens, "n_documents": n_docs, "text_bytes": text_bytes,
            "cpu_s": time.process_time() - cpu0}


def _report(counters, nbytes: int, ntokens: int) -> None:
    with counters.get_lock():
        counters[0] += nbytes
        counters[1] += ntokens


# ------------------------------------------------------------------------------------------------ main side
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def prepare(inputs: list[str | Path], out: str | Path, tokenizer_path: str | Path, *, workers: int = 0,
            unit_mb: float = 32.0, progress_every: float = 5.0, stream=None) -> dict:
    """Tokenize `inputs` into the prepared folder `out` (see the module docstring); returns the index.

    workers 0 = one per CPU core (at most one per unit); 1 = in this process."""
    from titan_aquila.data.tokenizer import Tokenizer

    out = Path(out)
    tokenizer = Tokenizer(tokenizer_path)
    fingerprint = tokenizer.fingerprint
    files = find_corpus_files(inputs)
    signature = [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    if out.exists() and not is_prepared(out) and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not a prepared data folder; choose another path")
    if is_prepared(out):
        try:
            old = json.loads((out / INDEX_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("tokenizer_fingerprint") == fingerprint and old.get("inputs") == signature:
            print(f"prepare: {out} is up to date ({old['n_tokens']:,} tokens)", file=stream or sys.stderr)
            return old
    unit_bytes = max(int(unit_mb * 1e6), 1)
    units = group_units(plan_pieces(files, max(unit_bytes // 4, 1)), unit_bytes)
    total = sum(p[4] for u in units for p in u)
    dtype = token_dtype(tokenizer.vocab_size)
    workers = min(workers or os.cpu_count() or 1, len(units)) or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (never read): remove it
        if not _alive(int(stale.name.rsplit("-", 1)[1])) or stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tiktoken, torch)
    counters = ctx.Array("q", 2)
    progress = Progress(total, workers, progress_every, stream)
    t0 = time.perf_counter()
    try:
        jobs = list(enumerate(units))
        init = (str(tokenizer.path), dtype, str(tmp), counters)
        if workers == 1:
            _init_worker(*init)
            shards = []
            for job in jobs:
                shards.append(tokenize_unit(job))
                progress.update(counters[0], counters[1])
        else:
            with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                results, shards = pool.imap(tokenize_unit, jobs), []  # imap keeps the units' order
                while len(shards) < len(jobs):
                    with contextlib.suppress(mp.TimeoutError):  # none finished in this interval: just redraw
                        shards.append(results.next(timeout=min(progress_every, 1.0)))
                    progress.update(counters[0], counters[1])
        for s in shards:
            if s["n_tokens"] == 0:
                (tmp / s["file"]).unlink()
        kept = [s for s in shards if s["n_tokens"]]
        n_docs = sum(s["n_documents"] for s in kept)
        if n_docs == 0:
            raise UserError(f"no text in {len(files)} input file(s): every document is blank")
        progress.update(total, counters[1], force=True)
        seconds = time.perf_counter() - t0
        index = {"format": FORMAT, "tokenizer": str(Path(tokenizer.path).resolve()),
                 "tokenizer_fingerprint": fingerprint, "eos_id": tokenizer.eos_id,
                 "vocab_size": tokenizer.vocab_size, "dtype": dtype,
                 "n_tokens": sum(s["n_tokens"] for s in kept), "n_documents": n_docs,
                 "text_bytes": sum(s["text_bytes"] for s in kept), "input_bytes": total,
                 "shards": [{k: s[k] for k in ("file", "n_tokens", "n_documents")} for s in kept],
                 "inputs": signature,
                 "stats": {"seconds": seconds, "workers": workers, "cpu_s": sum(s["cpu_s"] for s in shards)}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        _replace(tmp, out)
    finally:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder to `out`; an older prepared folder there is removed only afterwards."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)  # (an empty folder or a prepared set: checked before any work)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
