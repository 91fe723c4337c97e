"""Text -> packed token windows -> a resumable, data-parallel-sharded `StatefulDataLoader`.

Packing. Every document (a `.txt` file, or one `{"text": ...}` line of a `.jsonl` file) is tokenized and followed
by the separator <|endoftext|>; the documents, in sorted file order, form one stream s[0..N). Window w is

    s[w*T : w*T + T + 1]          inputs = window[:-1], labels = window[1:],   w = 0 .. W-1,  W = (N-1) // T

so consecutive windows share exactly one token (the last label of w is the first input of w+1) and together they
cover s[0 .. W*T] with nothing dropped but the final partial window (< T+1 tokens).

Sharding. Each epoch the W window ids are permuted (seed + epoch; identity when shuffle is off), cut to
P*R ids (R = data-parallel degree, P = W // R per rank, so every rank takes the same number of steps) and rank r
takes ids r, r+R, r+2R, ... of that list: ranks never see the same window in an epoch, and together they cover
all but the last W - P*R (< R) windows. A dataloader worker k of K takes every K-th of its rank's windows.

Resume. The dataset's state is (epoch, position); `StatefulDataLoader.state_dict()` snapshots it per worker, so
a restored loader yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_aquila.errors import UserError

# torchdata 0.11 calls a deprecated torch API on every iterator; the warning says nothing to our users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "text"
TEXT_SUFFIXES = (".txt", ".jsonl")


def default_train_paths() -> list[str]:
    """The shipped bilingual fixture: Pride and Prejudice ch. 1-6 and Tang 300 poems 1-280 (assets/PROVENANCE.md)."""
    return [str(ASSETS / "train")]


def default_validation_paths() -> list[str]:
    """Held-out text: Pride and Prejudice ch. 7-8 and Tang 300 poems 281-313."""
    return [str(ASSETS / "val")]


def find_text_files(paths: list[str] | str) -> list[Path]:
    """Files named directly, plus every .txt/.jsonl under named folders (recursive, sorted for determinism)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no data path given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"data folder {p} has no .txt or .jsonl files")
            files.extend(found)
        else:
            raise UserError(f"data path not found: {p}")
    return files


def read_documents(files: list[Path]) -> list[str]:
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{f}:{n} is not a JSON object with a 'text' field") from None
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    return [d for d in docs if d.strip()]


def tokenize_documents(paths: list[str] | str, tokenizer) -> torch.Tensor:
    """The packed stream: every non-empty document's ids followed by the separator, as one int64 tensor."""
    files = find_text_files(paths)
    docs = read_documents(files)
    if not docs:
        raise UserError(f"no text in {', '.join(map(str, files))}")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(docs):
        stream.extend(ids)
        stream.append(tokenizer.eos_id)
    return torch.tensor(stream, dtype=torch.int64)


class PackedWindows(IterableDataset):
    """(inputs [T], labels [T]) windows of one data-parallel rank; see the module docstring for the math."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, dp_rank: int, dp_degree: int, *,
                 infinite: bool = True, shuffle: bool = True, seed: int = 0, source: str = "data",
                 restart: bool = False):
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.infinite, self.shuffle, self.seed = infinite, shuffle, seed
        self.restart = restart  # every iteration starts from the first window (validation passes)
        self.n_windows = max(len(tokens) - 1, 0) // seq_len
        self.per_rank = self.n_windows // dp_degree
        if self.per_rank == 0:
            raise UserError(f"{source} has {len(tokens)} tokens: fewer than the {dp_degree} x ({seq_len} + 1) needed "
                            f"for one window of seq_len {seq_len} per data-parallel rank")
        self.epoch, self.pos = 0, 0

    def rank_windows(self, epoch: int) -> torch.Tensor:
        """Window ids this rank reads in `epoch`, in order."""
        if self.shuffle:
            order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
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
            ids = self.rank_windows(self.epoch)[worker::n_workers].tolist()
            while self.pos < len(ids):
                w = ids[self.pos]
                self.pos += 1  # advanced before yielding: a snapshot taken now resumes at the next window
                window = self.tokens[w * T: w * T + T + 1]
                yield window[:-1], window[1:]
            if not self.infinite:
                return
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def build_dataloader(paths: list[str] | str | None, tokenizer, seq_len: int, local_batch_size: int, dp_rank: int,
                     dp_degree: int, *, num_workers: int = 0, infinite: bool = True, shuffle: bool = True,
                     seed: int = 0, restart: bool = False) -> StatefulDataLoader:
    """Training batches `(inputs [B, T], labels [B, T])` of this rank; `paths` empty/None = the shipped fixture."""
    paths = paths or default_train_paths()
    tokens = tokenize_documents(paths, tokenizer)
    dataset = PackedWindows(tokens, seq_len, dp_rank, dp_degree, infinite=infinite, shuffle=shuffle, seed=seed,
                            source=", ".join(map(str, paths)), restart=restart)
    return StatefulDataLoader(dataset, batch_size=local_batch_size, num_workers=num_workers,
                              drop_last=infinite)


def build_validation_dataloader(paths: list[str] | str | None, tokenizer, seq_len: int, local_batch_size: int,
                                dp_rank: int, dp_degree: int) -> StatefulDataLoader:
    """One ordered pass over the held-out text (`paths` empty/None = the shipped validation fixture)."""
    return build_dataloader(paths or default_validation_paths(), tokenizer, seq_len, local_batch_size, dp_rank,
                            dp_degree, infinite=False, shuffle=False, restart=True)
