"""A weighted mixture of prepared sources (`training.datasets`), and the loaders a training run uses.

Sampling. Sequences are numbered globally: on data-parallel rank r of R, dataloader worker j of W, the k-th
sequence that worker yields is

    g = (k * W + j) * R + r

and sequence g comes from source schedule[g]. The schedule is stratified: in block b = g // K (K = max(16,
ceil(1 / min p_i) + 1)) source i appears exactly Q_i(b+1) - Q_i(b) times, where Q_i(n) is the largest-remainder
apportionment of n*K sequences to the weights p (ties to the lower index); the order inside the block is a
permutation drawn from a generator seeded with (seed, b). So after any whole number of blocks

    | count_i - p_i * n |  <=  1                 (n sequences, largest remainder)

and the shares equal the weights up to 1/n; K * p_i >= 1 makes Q_i non-decreasing, so every block is a valid
multiset. Each schedule entry costs O(K) to compute from (seed, b) alone: resuming never replays the past.

Source i serves its sequences from its own `PackedWindows` (epochs shuffled from seed + i, split across ranks and
workers exactly as a single dataset is), taken in order whenever the schedule names it. The state of a mixture is
k plus each source's (epoch, position), so a restored loader continues bit-exactly; `MixtureLoader` adds the
per-source token counts (this rank's) to that state, so the counts resume too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_aquila.data.dataset import PackedWindows, build_dataloader, build_validation_dataloader, load_tokens
from titan_aquila.data.prepared import is_prepared
from titan_aquila.data.sources import Source, parse_sources
from titan_aquila.errors import UserError


def block_size(weights: list[float]) -> int:
    return max(16, math.ceil(1 / min(weights)) + 1)  # K * p_i >= 1 + p_i: Q_i(n) never decreases


def apportion(weights: list[float], n: int) -> np.ndarray:
    """Largest remainder: integer counts summing to n, each within 1 of weights_i * n (ties to lower index)."""
    exact = np.asarray(weights, dtype=np.float64) * n
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    counts[order[:short]] += 1
    return counts


def schedule_block(weights: list[float], seed: int, b: int) -> np.ndarray:
    """Source ids of global sequences b*K .. (b+1)*K - 1."""
    K = block_size(weights)
    quota = apportion(weights, (b + 1) * K) - apportion(weights, b * K)
    ids = np.repeat(np.arange(len(weights)), quota)
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    return ids[torch.randperm(K, generator=g).numpy()]


class MixedWindows(IterableDataset):
    """(inputs [T], labels [T], source id) of one data-parallel rank; see the module docstring."""

    def __init__(self, sources: list[PackedWindows], weights: list[float], seed: int, dp_rank: int,
                 dp_degree: int):
        self.sources, self.weights, self.seed = sources, list(weights), seed
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.K = block_size(self.weights)
        self.k = 0  # sequences this worker has yielded
        self._block = (-1, None)

    def source_of(self, g: int) -> int:
        b = g // self.K
        if self._block[0] != b:
            self._block = (b, schedule_block(self.weights, self.seed, b))
        return int(self._block[1][g % self.K])

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = [iter(s) for s in self.sources]  # each continues from its own restored position
        while True:
            i = self.source_of((self.k * n_workers + worker) * self.dp_degree + self.dp_rank)
            inputs, labels = next(streams[i])
            self.k += 1  # advanced before yielding, like PackedWindows.pos
            yield inputs, labels, i

    def fingerprint(self) -> list:
        return [self.weights, self.seed, [s.fingerprint for s in self.sources]]

    def state_dict(self) -> dict:
        return {"k": self.k, "sources": [s.state_dict() for s in self.sources], "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint():
            import warnings

            warnings.warn("the saved data loader position belongs to another mixture (sources, weights, seq_len, "
                          "seed or data-parallel layout changed): starting the mixture from its beginning",
                          stacklevel=2)
            return
        self.k = int(state["k"])
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)


class MixtureLoader:
    """Batches (inputs, labels) of a mixture; counts this rank's training tokens per source (`source_tokens`),
    which travel with the loader's state through checkpoints."""

    def __init__(self, loader: StatefulDataLoader, names: list[str], weights: list[float], seq_len: int):
        self.loader, self.names, self.seq_len = loader, names, seq_len
        self.mixture = [names, weights, seq_len]
        self.source_tokens = [0] * len(names)

    def __iter__(self):
        for inputs, labels, src in self.loader:
            for i, n in enumerate(torch.bincount(src, minlength=len(self.names)).tolist()):
                self.source_tokens[i] += n * self.seq_len
            yield inputs, labels

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "source_tokens": list(self.source_tokens),
                "mixture": self.mixture}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])  # (the dataset itself warns if it is another mixture)
        if state.get("mixture") == self.mixture:
            self.source_tokens = [int(n) for n in state["source_tokens"]]


def _check_prepared(source: Source, path: str, what: str) -> None:
    if not is_prepared(path):
        raise UserError(f"training.datasets.{source.name}.{what} {path} is not a prepared folder (no index.json): "
                        f"run python -m titan_aquila.data prepare on the text first")


def build_mixture_loader(sources: list[Source], tokenizer, seq_len: int, local_batch_size: int, dp_rank: int,
                         dp_degree: int, *, num_workers: int = 0, seed: int = 0) -> MixtureLoader:
    """The training loader of a mixture of prepared sources (weights already normalised)."""
    parts = []
    for i, src in enumerate(sources):
        _check_prepared(src, src.path, "path")
        parts.append(PackedWindows(load_tokens([src.path], tokenizer), seq_len, dp_rank, dp_degree,
                                   seed=seed + 7919 * (i + 1), source=f"training.datasets.{src.name}"))
    dataset = MixedWindows(parts, [s.weight for s in sources], seed, dp_rank, dp_degree)
    loader = StatefulDataLoader(dataset, batch_size=local_batch_size, num_workers=num_workers, drop_last=False)
    return MixtureLoader(loader, [s.name for s in sources], [s.weight for s in sources], seq_len)


def build_loaders(cfg, tokenizer, dp_rank: int, dp_degree: int, validation: bool):
    """(training loader, {name: validation loader}, {name: weight}) for a run.

    Without `training.datasets` the validation dict is {"": validation.dataset_path's loader}. With a mixture it
    has one loader per source with a validation_path (weights renormalised over them), or, when no source has
    one, {"": validation.dataset_path's loader}. Empty when `validation` is false."""
    t, v = cfg.training, cfg.validation
    val_batch = v.local_batch_size if v.local_batch_size > 0 else t.local_batch_size
    sources = parse_sources(t.datasets) if t.datasets else []
    if sources:
        train = build_mixture_loader(sources, tokenizer, t.seq_len, t.local_batch_size, dp_rank, dp_degree,
                                     num_workers=t.num_workers, seed=t.seed)
    else:
        train = build_dataloader(t.dataset_path, tokenizer, t.seq_len, t.local_batch_size, dp_rank, dp_degree,
                                 num_workers=t.num_workers, seed=t.seed)
    if not validation:
        return train, {}, {}
    per_source = [s for s in sources if s.validation_path]
    for s in per_source:
        _check_prepared(s, s.validation_path, "validation_path")
    if not per_source:
        loader = build_validation_dataloader(v.dataset_path, tokenizer, t.seq_len, val_batch, dp_rank, dp_degree)
        return train, {"": loader}, {"": 1.0}
    total = sum(s.weight for s in per_source)
    loaders = {s.name: build_validation_dataloader([s.validation_path], tokenizer, t.seq_len, val_batch, dp_rank,
                                                   dp_degree) for s in per_source}
    return train, loaders, {s.name: s.weight / total for s in per_source}
