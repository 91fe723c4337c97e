"""`training.datasets`: the sources of a training mixture, read from the config without importing torch; and
`walk_files`, how a list of files and folders becomes the input files (raw text and `prepare` inputs alike).

    [training.datasets.en]            # NAME: used in logs and TensorBoard (data/tokens/NAME, validation_metrics/NAME/loss)
    path = "prepared/en"              # a prepared folder (python -m titan_aquila.data prepare)
    weight = 0.7                      # share of training sequences, normalised: p_i = weight_i / sum(weights)
    validation_path = "prepared/en_val"   # optional: a prepared folder validated on its own

Sources are ordered by NAME (TOML tables have no order a user can rely on), which fixes the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from titan_aquila.errors import UserError

KEYS = {"path", "weight", "validation_path"}


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: float  # normalised: the sources' weights sum to 1
    validation_path: str = ""


def mixture_errors(datasets: dict, dataset_path: list[str]) -> list[str]:
    """Every mistake in `training.datasets` (empty list when it is fine or not used)."""
    errors = []
    if datasets and dataset_path:
        errors.append("training.datasets and training.dataset_path are both set: use one (a mixture lists each "
                      "source's path in its own table)")
    for name, table in datasets.items():
        key = f"training.datasets.{name}"
        if not isinstance(table, dict):
            errors.append(f"{key} must be a table with path and weight, got {table!r}")
            continue
        if unknown := sorted(set(table) - KEYS):
            errors.append(f"{key} has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(KEYS))})")
        if not isinstance(table.get("path"), str) or not table.get("path"):
            errors.append(f"{key}.path must be a prepared folder path, got {table.get('path')!r}")
        w = table.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
            errors.append(f"{key}.weight must be a finite number > 0, got {w!r}")
        if not isinstance(table.get("validation_path", ""), str):
            errors.append(f"{key}.validation_path must be a path, got {table.get('validation_path')!r}")
    return errors


def parse_sources(datasets: dict) -> list[Source]:
    """The (already validated) tables as Sources ordered by name, weights normalised."""
    total = sum(float(t["weight"]) for t in datasets.values())
    return [Source(name, t["path"], float(t["weight"]) / total, t.get("validation_path", ""))
            for name, t in sorted(datasets.items())]


def walk_files(paths, accept, what: str, kinds: str) -> list[Path]:
    """Files named directly, plus every file under named folders that `accept(path)` keeps (recursive, hidden
    parts skipped, sorted for determinism). `what` names the paths in errors ("data", "input"), `kinds` the files
    a folder must hold."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if accept(f) and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{what} folder {p} has no {kinds} files")
            files.extend(found)
        else:
            raise UserError(f"{what} path not found: {p}")
    return files
