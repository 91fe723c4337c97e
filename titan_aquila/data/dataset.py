"""Text -> packed token windows -> a resumable, data-parallel-sharded `StatefulDataLoader`.

Prepared data. A folder made by `python -m titan_aquila.data prepare` (it has an index.json) is read memory-mapped
instead (prepared.py): the same stream, no tokenization, no corpus in RAM. Raw text and prepared folders cannot be
mixed in one path list; several prepared folders are concatenated in the order given.

Documents. Each `.txt` file is one document; each line of a `.jsonl` file is one document (its "text" field).
Folders are searched recursively (hidden entries skipped) and files are read in sorted order, so the stream is
the same on every rank and every run. Blank documents are skipped.

Packing. Each document's ids are followed by the separator `tokenizer.eos_id` (<|endoftext|>) and the documents
form one stream s[0..N). With T = seq_len, window w is

    s[w*T : w*T + T + 1]        inputs = window[:-1], labels = window[1:],   w = 0 .. W-1,   W = (N - 1) // T

Consecutive windows share one token (the last label of w is the first input of w+1); together they cover
s[0 .. W*T] and drop only the final partial window (fewer than T + 1 tokens). Windows cross document boundaries;
the separator tells the model where a document ends.

Sharding. Each epoch e the W window ids are permuted (a generator seeded from (seed, e); the identity when
`shuffle` is off), cut to R*P ids (R = data-parallel degree, P = W // R), and rank r takes ids r, r+R, r+2R, ... of
that list. So ranks never share a window within an epoch, every rank takes exactly P windows (equal step counts,
no rank waits on another), and together they cover all windows but W - R*P < R; with shuffling the left-out ones
change every epoch. A dataloader worker k of K takes every K-th of its rank's windows. `infinite` repeats epochs
forever (training); otherwise one epoch is served (validation: unshuffled, restarting at window 0 on every pass).

Held-out split. `holdout = f` in (0, 1) cuts the stream at c = N - round(f * N): `build_dataloader(...,
holdout=f)` trains on s[0..c), `build_validation_dataloader(paths, ..., holdout=f)` on the *same* paths validates on
s[c..N). The two parts share no token; the cut may fall inside a document. Use it when there is no separate
validation text; with separate validation paths keep holdout = 0 for both.

Resume. The dataset's state is (epoch, position in this worker's window list) plus a fingerprint of the stream;
`StatefulDataLoader.state_dict()` snapshots it per worker (prefetched batches accounted for), so a restored loader
yields exactly the batches an uninterrupted one would. A state saved for another stream, seq_len or data-parallel
layout is ignored with a warning: the position would be meaningless.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_aquila.data.sources import walk_files
from titan_aquila.errors import UserError
from titan_aquila.logging import logger

# torchdata 0.11 calls a deprecated torch API on every iterator; the warning says nothing to our users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "text"
TEXT_SUFFIXES = (".txt", ".jsonl")
_STREAMS: dict[tuple, torch.Tensor] = {}  # in-memory only: train + held-out loaders tokenize the same files once


def default_train_paths() -> list[str]:
    """The shipped bilingual fixture: Pride and Prejudice ch. 1-6 and Tang 300 poems 1-280 (assets/PROVENANCE.md)."""
    return [str(ASSETS / "train")]


def default_validation_paths() -> list[str]:
    """Held-out text: Pride and Prejudice ch. 7-8 and Tang 300 poems 281-313."""
    return [str(ASSETS / "val")]


def default_eval_paths() -> list[str]:
    """Pride and Prejudice ch. 34 (mid-novel), for perplexity checks of pretrained SmolLM2 (about 41-44)."""
    return [str(ASSETS / "eval")]


def find_text_files(paths: list[str] | str) -> list[Path]:
    """Files named directly, plus every .txt/.jsonl under named folders (recursive, sorted for determinism)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no data path given")
    return walk_files(paths, lambda f: f.suffix in TEXT_SUFFIXES, "data", ".txt or .jsonl")


def read_documents(files: list[Path], sanitize=None) -> list[str]:
    """One document per .txt file and per non-blank .jsonl line; blank documents dropped. A UTF-8 byte-order mark
    is not text (utf-8-sig drops it); bytes that are not UTF-8 become U+FFFD. `sanitize(text) -> (text, n)` (the
    tokenizer's) makes every document encodable, with one warning per file that needed it."""
    docs = []
    for f in files:
        first = len(docs)
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{f}:{n} is not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise UserError(f"{f}:{n}: 'text' is a {type(text).__name__}, not a string")
                docs.append(text)
        else:
            docs.append(f.read_text(encoding="utf-8-sig", errors="replace"))
        if sanitize is not None:
            changed = 0
            for i in range(first, len(docs)):
                docs[i], n = sanitize(docs[i])
                changed += n
            if changed:
                logger.warning(f"{f}: {changed} character(s) the tokenizer cannot represent were dropped or replaced "
                               "by U+FFFD (see data/tokenizer.py)")
    return [d for d in docs if d.strip()]


def tokenize_documents(paths: list[str] | str, tokenizer) -> torch.Tensor:
    """The packed stream: every non-blank document's ids followed by `tokenizer.eos_id`, as one int32 tensor."""
    files = find_text_files(paths)
    key = (str(getattr(tokenizer, "path", id(tokenizer))), tokenizer.eos_id,
           tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key in _STREAMS:
        return _STREAMS[key]
    docs = read_documents(files, getattr(tokenizer, "sanitize", None))
    if not docs:
        raise UserError(f"no text in {len(files)} file(s): {_describe(files)}")
    chunks = []
    progress = _Progress(sum(map(len, docs)))
    for i in range(0, len(docs), 512):  # bounded batches: python int lists of a large corpus are 28 bytes/token
        progress.update(sum(map(len, docs[i:i + 512])))
        batch = tokenizer.encode_batch(docs[i:i + 512])
        total = sum(map(len, batch)) + len(batch)
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids + [tokenizer.eos_id] for ids in batch),
                                  dtype=np.int32, count=total))
    stream = torch.from_numpy(np.concatenate(chunks))
    _STREAMS.clear()
    _STREAMS[key] = stream
    return stream


def load_tokens(paths: list[str] | str, tokenizer):
    """The packed stream of `paths`: memory-mapped prepared folders, or raw text tokenized now."""
    from titan_aquila.data.prepared import TokenStream, is_prepared

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    prepared = [is_prepared(p) for p in paths]
    if any(prepared) and not all(prepared):
        raise UserError(f"data paths mix prepared folders and raw text ({_describe(list(map(Path, paths)))}): "
                        f"prepare the raw text too (python -m titan_aquila.data prepare) or list them separately")
    return TokenStream(paths, tokenizer) if paths and all(prepared) else tokenize_documents(paths, tokenizer)


class _Progress:
    """A line every 10 s while a large raw corpus is tokenized at start-up (rank 0 only; every rank tokenizes)."""

    def __init__(self, total_chars: int, every: float = 10.0):
        self.total, self.done, self.every = total_chars, 0, every
        self.t0 = self.last = time.perf_counter()

    def update(self, chars: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / 1e6 / (now - self.t0)
            logger.info(f"tokenize: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} M characters "
                        f"({100 * self.done / max(self.total, 1):.0f}%), {rate:.2f} M/s; a corpus prepared once "
                        f"(python -m titan_aquila.data prepare) starts without this")
        self.done += chars


def split_validation(tokens: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s[0..c), s[c..N)) with c = N - round(holdout * N): the training part and the held-out tail."""
    if not 0.0 < holdout < 1.0:
        raise UserError(f"validation holdout must be a fraction in (0, 1), got {holdout}")
    cut = len(tokens) - round(holdout * len(tokens))
    return tokens[:cut], tokens[cut:]


def _describe(files: list[Path], limit: int = 3) -> str:
    names = ", ".join(map(str, files[:limit]))
    return names + (f" and {len(files) - limit} more" if len(files) > limit else "")


class PackedWindows(IterableDataset):
    """(inputs [T], labels [T]) int64 windows of one data-parallel rank; see the module docstring for the math."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, dp_rank: int, dp_degree: int, *,
                 infinite: bool = True, shuffle: bool = True, seed: int = 0, source: str = "data",
                 restart: bool = False):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= dp_rank < dp_degree:
            raise UserError(f"data-parallel rank {dp_rank} is outside 0..{dp_degree - 1}")
        self.tokens, self.seq_len = tokens, seq_len
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.infinite, self.shuffle, self.seed = infinite, shuffle, seed
        self.restart = restart  # every iteration starts from the first window (validation passes)
        self.n_windows = max(len(tokens) - 1, 0) // seq_len
        self.per_rank = self.n_windows // dp_degree
        if self.per_rank == 0:
            raise UserError(f"{source} has {len(tokens)} tokens, fewer than the {dp_degree * seq_len + 1} needed for "
                            f"one window of seq_len {seq_len} on each of {dp_degree} data-parallel rank(s)")
        self.fingerprint = [self.n_windows, seq_len, dp_rank, dp_degree, int(shuffle), seed,
                            int(tokens[:4096].long().sum()), int(tokens[-4096:].long().sum())]
        self.epoch, self.pos = 0, 0

    def rank_windows(self, epoch: int) -> torch.Tensor:
        """Window ids this rank reads in `epoch`, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # distinct (seed, epoch) streams
            order = torch.randperm(self.n_windows, generator=g)
        else:
            order = torch.arange(self.n_windows)
        return order[: self.per_rank * self.dp_degree][self.dp_rank::self.dp_degree]

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        T = self.seq_len
        if self.restart:
            self.epoch, self.pos = 0, 0
        while True:
            ids = self.rank_windows(self.epoch)[worker::n_workers]  # a tensor: 8 bytes per window, not a list
            while self.pos < len(ids):
                w = int(ids[self.pos])
                self.pos += 1  # advanced before yielding: a snapshot taken now resumes at the next window
                window = self.tokens[w * T: w * T + T + 1].long()
                yield window[:-1], window[1:]
            if not self.infinite:
                return
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("fingerprint", [])) != self.fingerprint:
            warnings.warn("the saved data loader position belongs to other data (tokens, seq_len, seed or "
                          "data-parallel layout changed): starting this data from its first window", stacklevel=2)
            self.epoch, self.pos = 0, 0
            return
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def _check_loader_args(local_batch_size: int, num_workers: int) -> None:
    if local_batch_size < 1:
        raise UserError(f"local batch size must be >= 1, got {local_batch_size}")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")


def build_dataloader(paths: list[str] | str | None, tokenizer, seq_len: int, local_batch_size: int, dp_rank: int,
                     dp_degree: int, *, num_workers: int = 0, infinite: bool = True, shuffle: bool = True,
                     seed: int = 0, restart: bool = False, holdout: float = 0.0) -> StatefulDataLoader:
    """Batches `(inputs [B, T], labels [B, T])` (int64) of rank `dp_rank` of `dp_degree`.

    `paths` empty/None = the shipped training fixture. `holdout` > 0 trains on the first 1 - holdout of the stream
    (see `split_validation`). With `infinite` epochs repeat, batches run across epoch boundaries and never end;
    otherwise one epoch, the last batch possibly short."""
    _check_loader_args(local_batch_size, num_workers)
    paths = paths or default_train_paths()
    source = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
    tokens = load_tokens(paths, tokenizer)
    if holdout:
        tokens = split_validation(tokens, holdout)[0]
        source = f"the first {1 - holdout:g} of {source}"
    dataset = PackedWindows(tokens, seq_len, dp_rank, dp_degree, infinite=infinite, shuffle=shuffle, seed=seed,
                            source=source, restart=restart)
    return StatefulDataLoader(dataset, batch_size=local_batch_size, num_workers=num_workers, drop_last=False)


def build_validation_dataloader(paths: list[str] | str | None, tokenizer, seq_len: int, local_batch_size: int,
                                dp_rank: int, dp_degree: int, *, holdout: float = 0.0) -> StatefulDataLoader:
    """One ordered pass over held-out text; every `iter()` starts again at its first window.

    `paths` empty/None = the shipped validation fixture. `holdout` > 0: `paths` are the *training* paths and the
    loader serves their last `holdout` fraction of tokens, the part `build_dataloader(..., holdout=...)` leaves out.
    Every rank gets the same number of batches (the last one possibly short)."""
    _check_loader_args(local_batch_size, 0)
    if holdout:
        paths = paths or default_train_paths()
        source = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
        tokens = split_validation(load_tokens(paths, tokenizer), holdout)[1]
        source = f"the held-out last {holdout:g} of {source}"
    else:
        paths = paths or default_validation_paths()
        source = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
        tokens = load_tokens(paths, tokenizer)
    dataset = PackedWindows(tokens, seq_len, dp_rank, dp_degree, infinite=False, shuffle=False, source=source,
                            restart=True)
    return StatefulDataLoader(dataset, batch_size=local_batch_size, num_workers=0, drop_last=False)
