"""Reporting shared by the experiments: markdown tables, the per-experiment sections of results.md, PNG plots,
the summary JSON the tests read, and the list of checked facts."""

from __future__ import annotations

import json
import math
from pathlib import Path


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}")
    return str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


RESULTS_HEADER = ("# Experiment results\n\nProduced by `experiments/*.py` on the shipped text (`assets/text`, SmolLM2 "
                  "tokenizer); every loss is the held-out (validation split) cross-entropy unless a table says "
                  "otherwise. Each script rewrites only its own section.\n")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block between this experiment's markers in results.md."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def plot_panels(path: Path, panels: list[dict], title: str) -> None:
    """panels: [{title, xlabel, ylabel, series: [{label, x, y, **matplotlib kwargs}], vlines: [(x, text)]}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for s in panel["series"]:
            s = dict(s)
            ax.plot(s.pop("x"), s.pop("y"), **s)
        for x, text in panel.get("vlines", []):
            ax.axvline(x, color="gray", linestyle=":", linewidth=1)
            ax.text(x, 1.0, " " + text, transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="gray")
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        if "ylim" in panel:
            ax.set_ylim(*panel["ylim"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_summary(a, name: str, summary: dict) -> Path:
    path = a.out / f"{name}_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return path


def wall_note(source, runs) -> str:
    """Where the time went: the recorded wall seconds of the runs (a reused run keeps its recorded time)."""
    runs = list(runs)
    return (f"Wall time: {sum(r.wall_s for r in runs):.0f} s of training runs ({len(runs)} runs) + stage 0 "
            f"{source.wall_s:.0f} s (shared by the three scripts), 1 torch thread on the shared 2-core box.")


def check(facts: list, cond: bool, text: str, must: bool = True) -> None:
    """Collect one fact. `must`: the script fails (after writing its results) if it is false; otherwise it is a
    claim of a paper that is only reported, whichever way it comes out at this scale."""
    facts.append((bool(cond), text, must))
    print(f"  [{'ok' if cond else ('FAILED' if must else 'no')}] {text}", flush=True)


def facts_md(facts: list) -> str:
    return "\n".join(f"- [{'x' if ok else ' '}] {text}" for ok, text, _ in facts)


def finish(facts: list) -> None:
    bad = [t for ok, t, must in facts if must and not ok]
    if bad:
        raise SystemExit("facts that did not hold:\n  " + "\n  ".join(bad))
