"""Reading a prepared token folder (written by `python -m titan_aquila.data prepare`, see prepare.py).

A prepared folder holds `index.json` and shards `shard_NNNNN.bin`: raw little-endian uint16 (vocabulary <= 65,536)
or uint32 token ids. Shard k holds the documents of its share of the inputs, each followed by the separator
`eos_id`, so the concatenation of the shards in index order is exactly the stream `tokenize_documents` builds
from the same files (dataset.py):

    s = shard_0 ++ shard_1 ++ ... ++ shard_{K-1},     len(s) = sum of the shards' n_tokens

`TokenStream` exposes s as a read-only sequence: len(s), s[a:b] -> int32 tensor (a copy of just those tokens).
The shards are memory-mapped, never read whole: a process touches only the pages of the windows it trains on, so
its memory and its start-up time do not grow with the corpus.

The index names the tokenizer by its fingerprint (`Tokenizer.fingerprint`, a hash of what decides the ids): a
prepared set is refused by a run whose tokenizer would give other ids, instead of training on the wrong vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from titan_aquila.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "titan_aquila.prepared/1"


def is_prepared(path: str | Path) -> bool:
    """True for a folder with an index.json: a prepared set (the trainer reads it instead of tokenizing)."""
    return (Path(path) / INDEX_NAME).is_file()


def read_index(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"prepared data {folder}: cannot read {INDEX_NAME} ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"prepared data {folder}: {INDEX_NAME} is not a {FORMAT} index (format "
                        f"{index.get('format') if isinstance(index, dict) else None!r}); prepare it again")
    return index


def check_tokenizer(index: dict, folder: Path, tokenizer) -> None:
    """A prepared set is usable only with the tokenizer (and document separator) it was made with."""
    want = tokenizer.fingerprint
    if index["tokenizer_fingerprint"] != want or index["eos_id"] != tokenizer.eos_id:
        raise UserError(f"prepared data {folder} was tokenized with another tokenizer ({index['tokenizer']}, "
                        f"fingerprint {index['tokenizer_fingerprint'][:12]}, separator {index['eos_id']}) than "
                        f"this run's ({getattr(tokenizer, 'path', '?')}, fingerprint {want[:12]}, separator "
                        f"{tokenizer.eos_id}): prepare it again (python -m titan_aquila.data prepare ... --tokenizer "
                        f"{getattr(tokenizer, 'path', '?')})")


class TokenStream:
    """The concatenated token stream of one or more prepared folders, memory-mapped, sliceable like a 1-D tensor.

    Only `len()` and `[a:b]` slices (step 1, negative bounds allowed) are supported: that is all PackedWindows
    reads. Pickling (DataLoader workers) sends the file list, not the mapped data; workers map the files again."""

    def __init__(self, folders: list[str | Path], tokenizer):
        self.files: list[tuple[str, str, int]] = []  # (path, dtype, n_tokens)
        for folder in map(Path, folders):
            index = read_index(folder)
            check_tokenizer(index, folder, tokenizer)
            for shard in index["shards"]:
                path = folder / shard["file"]
                size = path.stat().st_size if path.is_file() else -1
                itemsize = np.dtype(index["dtype"]).itemsize
                if size != shard["n_tokens"] * itemsize:
                    raise UserError(f"prepared data {folder}: shard {shard['file']} has {size} bytes, the index says "
                                    f"{shard['n_tokens']} x {itemsize}; the folder is damaged, prepare it again")
                self.files.append((str(path), index["dtype"], shard["n_tokens"]))
        self.starts = np.cumsum([0] + [n for _, _, n in self.files])  # shard k covers s[starts[k] : starts[k+1])
        self._maps: list[np.ndarray] | None = None

    def _mapped(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=np.dtype(dt), mode="r", shape=(n,)) if n else np.zeros(0, dt)
                          for p, dt, n in self.files]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        import torch  # here, not at import: prepare.py's worker processes read this module without torch

        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports only [a:b] slices")
        a, b, _ = key.indices(len(self))
        b = max(a, b)
        maps, parts = self._mapped(), []
        k = int(np.searchsorted(self.starts, a, side="right")) - 1  # the shard holding token a
        while a < b:
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            take = min(b, hi) - a
            if take > 0:
                parts.append(np.asarray(maps[k][a - lo: a - lo + take], dtype=np.int32))
                a += take
            k += 1
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int32))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}
