"""`training.datasets`: the sources of a training mixture, read from the config without importing torch.

    [training.datasets.en]            # NAME: used in logs and TensorBoard (data/tokens/NAME, validation/NAME/loss)
    path = "prepared/en"              # a prepared folder (python -m titan_aquila.data prepare)
    weight = 0.7                      # share of training sequences, normalised: p_i = weight_i / sum(weights)
    validation_path = "prepared/en_val"   # optional: a prepared folder validated on its own

Sources are ordered by NAME (TOML tables have no order a user can rely on), which fixes the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

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
