"""Summarise how an MoE run's routing moved, from its TensorBoard folder (no browser needed).

    python scripts/expert_load.py outputs/smollm2_8x_top2/tb [--plot load.png]

Reads the `validation/moe/layer{L}/expert{e}_frac` scalars that train.py writes at every validation (each expert's
share of the routing slots of the same held-out tokens; step 0 is the growth audit, before any update) and prints,
per MoE layer, the shares at the first and last validation step, the largest change of one expert's share, and the
coefficient of variation (std / mean) of the shares, 0 for a perfectly balanced layer. `--plot` draws the first
and last step's shares per layer as a PNG (matplotlib). Exits with status 2 and one line if the folder has no such
scalars.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TAG = re.compile(r"validation/moe/layer(\d+)/expert(\d+)_frac$")


def read_expert_load(tb_dir: str | Path) -> dict[int, dict[int, list[float]]]:
    """{layer: {step: [share of expert 0, 1, ...]}} from a TensorBoard event folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    raw: dict[int, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for tag in acc.Tags().get("scalars", []):
        m = TAG.match(tag)
        if m:
            for ev in acc.Scalars(tag):
                raw[int(m[1])][ev.step][int(m[2])] = ev.value
    return {layer: {step: [fr[e] for e in sorted(fr)] for step, fr in sorted(steps.items())}
            for layer, steps in sorted(raw.items())}


def cv(shares: list[float]) -> float:
    return statistics.pstdev(shares) / statistics.fmean(shares)


def summarise(load: dict[int, dict[int, list[float]]]) -> list[dict]:
    rows = []
    for layer, by_step in load.items():
        (s0, first), (s1, last) = next(iter(by_step.items())), list(by_step.items())[-1]
        rows.append({"layer": layer, "first_step": s0, "last_step": s1, "first": first, "last": last,
                     "max_change": max(abs(a - b) for a, b in zip(first, last)),
                     "cv_first": cv(first), "cv_last": cv(last)})
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_exp = len(rows[0]["first"])
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(rows) * 0.4), 6), sharex=True)
    for ax, key in zip(axes, ("first", "last")):
        bottom = [0.0] * len(rows)
        for e in range(n_exp):
            vals = [r[key][e] for r in rows]
            ax.bar([r["layer"] for r in rows], vals, bottom=bottom, label=f"expert {e}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("share of routing slots")
        ax.set_title(f"validation step {rows[0][key + '_step']}")
    axes[-1].set_xlabel("MoE layer")
    axes[0].legend(ncol=min(n_exp, 8), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tb_dir", help="TensorBoard folder of the run (<dump_folder>/<metrics.save_tb_folder>)")
    p.add_argument("--plot", help="write a PNG of the first and last shares per layer")
    a = p.parse_args(argv)
    if not Path(a.tb_dir).is_dir():
        print(f"error: {a.tb_dir} is not a folder", file=sys.stderr)
        return 2
    rows = summarise(read_expert_load(a.tb_dir))
    if not rows:
        print(f"error: no validation/moe/*/expert*_frac scalars in {a.tb_dir} (an MoE run with validation.enable "
              "and metrics.enable_tensorboard writes them)", file=sys.stderr)
        return 2
    print(f"{'layer':>5} {'steps':>9} {'max change':>10} {'cv first':>8} {'cv last':>8}  last shares")
    for r in rows:
        print(f"{r['layer']:5d} {r['first_step']:>4}->{r['last_step']:<4} {r['max_change']:10.4f} {r['cv_first']:8.3f} "
              f"{r['cv_last']:8.3f}  " + " ".join(f"{x:.3f}" for x in r["last"]))
    print(f"largest change of one expert's share over all layers: {max(r['max_change'] for r in rows):.4f}")
    if a.plot:
        plot(rows, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
