"""Summarise how an MoE run's routing moved, from its TensorBoard folder (no browser needed).

    python scripts/expert_load.py outputs/smollm2_8x_top2/tb [--plot load.png]

Reads the `validation_metrics/moe_load/layer{L}/shares` histograms that train.py writes at every validation (bucket
e = expert e's share of the routing slots of the same held-out tokens; step 0 is the growth audit, before any
update) and prints, per MoE layer, the shares at the first and last validation step, the largest change of one
expert's share, and the coefficient of variation (std / mean) of the shares, 0 for a perfectly balanced layer.
TB_DIR is one run's folder or the job's `tb` folder, whose newest run (`tb/<timestamp>`) is then read. `--plot`
draws the first and last step's shares per layer as a PNG (matplotlib). Exits with status 2 and one line if the
folder has no such histograms.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

TAG = re.compile(r"validation_metrics/moe_load/layer(\d+)/shares$")


def run_folder(tb_dir: str | Path) -> Path:
    """`tb_dir` itself if it holds event files, else its newest `<timestamp>` run folder that does."""
    tb_dir = Path(tb_dir)
    if any(tb_dir.glob("events.out.tfevents.*")):
        return tb_dir
    runs = sorted(p for p in tb_dir.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*")))
    return runs[-1] if runs else tb_dir


def read_expert_load(tb_dir: str | Path) -> dict[int, dict[int, list[float]]]:
    """{layer: {step: [share of expert 0, 1, ...]}} from a TensorBoard event folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_folder(tb_dir)), size_guidance={"histograms": 0})  # 0 = keep every event
    acc.Reload()
    load: dict[int, dict[int, list[float]]] = {}
    for tag in acc.Tags().get("histograms", []):
        m = TAG.match(tag)
        if m:
            load[int(m[1])] = {ev.step: list(ev.histogram_value.bucket) for ev in acc.Histograms(tag)}
    return {layer: dict(sorted(steps.items())) for layer, steps in sorted(load.items())}


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
    p.add_argument("tb_dir", help="TensorBoard folder: one run's, or <dump_folder>/<metrics.save_tb_folder> (newest run)")
    p.add_argument("--plot", help="write a PNG of the first and last shares per layer")
    a = p.parse_args(argv)
    if not Path(a.tb_dir).is_dir():
        print(f"error: {a.tb_dir} is not a folder", file=sys.stderr)
        return 2
    rows = summarise(read_expert_load(a.tb_dir))
    if not rows:
        print(f"error: no validation_metrics/moe_load/*/shares histograms in {a.tb_dir} (an MoE run with "
              "validation.enable and metrics.enable_tensorboard writes them)", file=sys.stderr)
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
