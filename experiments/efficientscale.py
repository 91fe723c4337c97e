"""The whole EfficientScale pipeline in miniature (AquilaMoE's training-loss figure): dense -> grown dense -> MoE,
loss vs cumulative training FLOPs, against the final MoE trained from scratch for the same FLOPs.

    python experiments/efficientscale.py             # full mode: 7.5 min measured on the shared 2-core box
    python experiments/efficientscale.py --smoke     # tiny shapes, seconds; everything under --out

Stage 0 trains the small dense model (full mode: dim 64, 2 layers, FFN 176) from scratch; stage 1 (Scale-Up,
`--scale-up aki_pro` as in AquilaMoE) grows it to dim 128, 4 layers, FFN 352 and trains on; stage 2 (Scale-Out)
upcycles that into 8 experts, top-2, and trains on. Each stage is one train.py run whose `[growth]` reads the
previous stage's final checkpoint. The baseline is the stage-2 MoE shape from a fresh init (from-scratch LR) with
as many steps as make its FLOPs equal the three stages' sum (to within one step):

    cumulative FLOPs at step s of stage i = sum_{j<i} FLOPs_j + flops_per_token_i(seq_len) x tokens_per_step x s

Expected: the Scale-Up boundary is a jump (AKI-Pro is not function-preserving), the Scale-Out one is not (upcycling
is exact to float rounding: asserted). AquilaMoE's claim, that the pipeline gets lower than training the final model
from scratch for the same compute, is reported, not asserted: at this scale it held only for the first ~60% of the
budget (docs/results.md), and the table gives the FLOPs each side needs to match the other's final loss.
Writes docs/efficientscale.png and the "efficientscale" section of docs/results.md.
"""

from __future__ import annotations

import time

from common import MOE, describe, parse_args, run_stage, scaled, stage0, stage_config
from report import check, facts_md, finish, md_table, plot_panels, save_summary, wall_note, write_section


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First FLOPs at which a piecewise-linear loss curve [(flops, loss)] gets to `target` (None if it never does)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return x1 if y0 <= target or y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def loss_at(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve at FLOPs x (at a stage boundary: the end of the earlier stage)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def main() -> None:
    a = parse_args(__doc__, "efficientscale", lambda parser: parser.add_argument(
        "--scale-up", default="aki_pro", help="stage-1 growth methods joined by '+', e.g. fpi+interpolate"))
    p, t0, method = a.preset, time.time(), a.scale_up
    steps = a.steps or p.steps
    dense = scaled(p.shape, 2, 2)
    moe = {**dense, **MOE, "moe_ffn_dim": dense["ffn_dim"]}
    s0 = stage0(a)
    c1 = stage_config(a.out / "stage1", p, dense, steps, p.grown_lr, save=True,
                      growth={"source": s0.checkpoint, "methods": method.split("+")})
    c2 = stage_config(a.out / "stage2", p, moe, steps, p.grown_lr,
                      growth={"source": a.out / "stage1" / "checkpoint", "methods": ["upcycle"]})
    for c in (c1, c2):
        c["validation"]["freq"] = max(1, steps // 4)  # the short stages get as many points as stage 0
    s1 = run_stage("stage 1: Scale-Up", c1, a)
    s2 = run_stage("stage 2: Scale-Out", c2, a)
    stages = [("stage 0: dense", s0), (f"stage 1: {method}", s1), ("stage 2: upcycle", s2)]
    offsets = [0.0, s0.flops(s0.steps), s0.flops(s0.steps) + s1.flops(s1.steps)]
    budget = offsets[2] + s2.flops(s2.steps)
    per_step = s2.flops(1)  # the scratch MoE has the stage-2 shape
    scratch_steps = round(budget / per_step)
    scratch = run_stage("MoE from scratch", stage_config(a.out / "scratch", p, moe, scratch_steps, p.scratch_lr), a)

    pipe = [pt for (_, r), off in zip(stages, offsets) for pt in zip(*r.curve("val", off))]
    scratch_pts = list(zip(*scratch.curve("val")))
    xs = [x for x, _ in pipe]
    need = flops_to_reach(scratch_pts, s2.final_val)  # scratch FLOPs to match the pipeline's final loss
    pipe_need = flops_to_reach(pipe, scratch.final_val)  # pipeline FLOPs to match scratch's final loss

    facts: list = []
    print("facts:")
    check(facts, xs == sorted(xs) and xs[-1] == budget, "the cumulative FLOPs axis is monotonic across the three "
          f"stages (a stage's step 0 sits at the previous stage's end) and ends at the budget {budget:.4e}")
    check(facts, abs(scratch.flops(scratch.steps) - budget) <= per_step / 2,
          f"the scratch MoE trains the same FLOPs: {scratch.flops(scratch.steps):.4e} vs {budget:.4e}")
    check(facts, abs(s2.audit["grown_loss"] - s2.audit["source_loss"]) < 1e-3,
          f"Scale-Out (upcycle) keeps the stage-1 loss: {s2.audit['grown_loss']:.4f} vs {s2.audit['source_loss']:.4f}")
    check(facts, s2.final_val < scratch.final_val, f"at equal FLOPs the pipeline beats the MoE from scratch: "
          f"{s2.final_val:.3f} vs {scratch.final_val:.3f}", must=False)
    check(facts, s1.final_val < s0.final_val and s2.final_val < s1.final_val,
          "every stage ends below the previous one: " + " > ".join(f"{r.final_val:.3f}" for _, r in stages),
          must=False)

    png = a.docs / "efficientscale.png"
    colors = ["tab:blue", "tab:orange", "tab:green"]
    lines = {"val": [], "train": []}
    for which, style in (("val", {"marker": "o", "markersize": 4}), ("train", {"linewidth": 1})):
        for (label, r), off, c in zip(stages, offsets, colors):
            x, y = r.curve(which, off)
            lines[which].append({"label": label, "x": x, "y": y, "color": c, **style})
        x, y = scratch.curve(which)
        lines[which].append({"label": "MoE from scratch", "x": x, "y": y, "color": "black", "linestyle": "--",
                             "marker": "s" if which == "val" else None, "markersize": 3, "linewidth": 1})
    vlines = [(offsets[1], f"Scale-Up ({method})"), (offsets[2], "Scale-Out (upcycle)")]
    plot_panels(png, [{"title": "held-out loss", "xlabel": "cumulative training FLOPs", "ylabel": "loss",
                       "series": lines["val"], "vlines": vlines},
                      {"title": "training loss (the batch of each logged step)", "xlabel": "cumulative training FLOPs",
                       "ylabel": "loss", "series": lines["train"], "vlines": vlines}],
                f"EfficientScale in miniature: {describe(p.shape)} → {describe(dense)} → "
                f"{MOE['n_experts']} experts, top-{MOE['top_k']}")

    rows = [[label, describe(m), r.steps, f"{r.flops_per_token / 1e6:.2f}M", f"{r.flops(r.steps):.3e}",
             f"{off + r.flops(r.steps):.3e}", r.init_val, r.final_val, f"{r.wall_s:.0f}"]
            for (label, r), off, m in zip(stages, offsets, [p.shape, dense, moe])]
    rows.append(["MoE from scratch", describe(moe), scratch.steps, f"{scratch.flops_per_token / 1e6:.2f}M",
                 f"{scratch.flops(scratch.steps):.3e}", f"{scratch.flops(scratch.steps):.3e}", scratch.init_val,
                 scratch.final_val, f"{scratch.wall_s:.0f}"])
    table = md_table(["run", "model", "steps", "FLOP/token", "FLOPs", "cumulative FLOPs", "start loss", "end loss",
                      "wall s"], rows)
    saving = (f"the scratch MoE reaches the pipeline's final loss {s2.final_val:.4f} after {need:.3e} FLOPs, "
              f"{need / budget:.2f}x the pipeline's" if need else
              f"the scratch MoE does not reach the pipeline's final loss {s2.final_val:.4f} within the budget "
              f"(it ends at {scratch.final_val:.4f})")
    saving += (f"; the pipeline reaches the scratch MoE's final loss after {pipe_need:.3e} FLOPs "
               f"({pipe_need / budget:.0%} of the budget)" if pipe_need else "")
    lead = md_table(["FLOPs", "MoE from scratch", "pipeline (interpolated)", "ahead"],
                    [[f"{x:.3e}", y, loss_at(pipe, x), "pipeline" if loss_at(pipe, x) < y else "scratch"]
                     for x, y in scratch_pts[1:]])
    body = f"""## EfficientScale pipeline (AquilaMoE training-loss figure) — `experiments/efficientscale.py{' --smoke' if a.smoke else ''}`

Stage 0 trains {describe(p.shape)} from scratch (LR {p.scratch_lr:g}, {s0.steps} steps); stage 1 grows it with
`{method}` to {describe(dense)} ({steps} steps, LR {p.grown_lr:g}); stage 2 upcycles that into {MOE['n_experts']} experts,
top-{MOE['top_k']} ({steps} steps, LR {p.grown_lr:g}). Baseline: the stage-2 MoE from scratch for the same total FLOPs
(LR {p.scratch_lr:g}). {p.batch * p.seq_len} tokens per step everywhere; "start loss" of a grown stage is its growth audit.

{table}
Compute: {saving}.

Who is ahead at the scratch run's evaluations:

{lead}
![EfficientScale loss vs FLOPs](efficientscale.png)

Facts ([x] held, [ ] did not; the first three are asserted):

""" + facts_md(facts) + f"\n\n{wall_note(s0, [s1, s2, scratch])}\n"
    write_section(a.docs / "results.md", "efficientscale", body)
    save_summary(a, "efficientscale", {"budget": budget, "pipeline": pipe, "scratch": scratch_pts,
                 "stage_offsets": offsets, "scratch_flops_to_match": need, "pipeline_flops_to_match": pipe_need,
                 "final": {"pipeline": s2.final_val, "scratch": scratch.final_val}, "png": str(png), "facts": facts})
    print(f"wrote {png} and {a.docs / 'results.md'} in {time.time() - t0:.0f} s")
    finish(facts)


if __name__ == "__main__":
    main()
