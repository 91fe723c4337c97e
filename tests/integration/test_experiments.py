"""experiments/*.py end to end in --smoke mode (real train.py stages on the shipped text, tiny shapes).

Each script runs as a subprocess into a temporary folder (sharing one stage-0 model, as the scripts do) and the
numbers its summary JSON reports are checked against what the growth transforms guarantee.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiments")


def run_script(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / f"{name}.py"), "--smoke", "--out",
                           str(out / name), "--docs", str(out / "docs")], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    png = out / "docs" / f"{name}.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "docs" / "results.md").read_text()
    assert text.count(f"<!-- {name}: begin -->") == 1 and text.count(f"<!-- {name}: end -->") == 1
    return json.loads((out / name / f"{name}_summary.json").read_text())


def test_scale_up(out):
    s = run_script("scale_up", out)
    r = s["runs"]
    # integer width ratio: FPI is the source function (fp32 rounding only); so is fpi + zero-initialised depth
    for key in ("fpi_w2", "fpi+zero"):
        assert abs(r[key]["drift"]) < 1e-3 and r[key]["max_logit_diff"] < 1e-4, key
    # stacking / interpolating copies and AKI's borrowed units change the function
    for key in ("fpi+stack", "fpi+interpolate", "aki_w2", "aki_pro"):
        assert r[key]["max_logit_diff"] > 1e-3, key
    assert r["random"]["init"] > s["source_loss"] + 0.5  # a fresh model starts near ln(49152) = 10.8
    # non-integer ratio x1.5: FPI's RMSNorm statistics drift, `exact` (zero padding, eps' = c eps) does not
    assert abs(r["fpi_w1.5"]["drift"]) > 1e-3 and r["fpi_w1.5"]["max_logit_diff"] > 1e-3
    for key in ("exact_w1.5", "zero+exact_w1.5d2"):
        assert abs(r[key]["drift"]) < 1e-3 and r[key]["max_logit_diff"] < 1e-4, key
    assert all(ok for ok, _, must in s["facts"] if must)


def test_scale_out(out):
    s = run_script("scale_out", out)
    r, flops = s["runs"], s["total_flops"]
    assert abs(r["upcycle"]["init"] - s["source_loss"]) < 1e-3  # Mixtral-routed copies = the dense FFN
    assert r["du_1.0"]["init"] > r["upcycle"]["init"] + 1e-3  # r = 1 re-draws every FFN unit
    assert r["scratch"]["init"] > s["source_loss"] + 0.5
    moe = [flops[k] for k in r if k != "dense"]
    assert len(set(moe)) == 1  # one MoE shape, equal steps: equal FLOPs exactly
    per_step_dense = flops["dense"] / s["dense_steps"]
    assert abs(flops["dense"] - moe[0]) <= per_step_dense


def test_efficientscale(out):
    s = run_script("efficientscale", out)
    xs = [x for x, _ in s["pipeline"]]
    offsets = s["stage_offsets"]
    assert xs == sorted(xs) and xs[0] == 0 and xs[-1] == s["budget"]
    assert offsets == sorted(offsets) and offsets[1] > 0 and offsets[1] in xs and offsets[2] in xs
    scratch = [x for x, _ in s["scratch"]]
    assert scratch == sorted(scratch) and abs(scratch[-1] - s["budget"]) / s["budget"] < 0.05
    assert all(ok for ok, _, must in s["facts"] if must)


def test_results_sections_are_independent(tmp_path):
    from report import write_section

    md = tmp_path / "results.md"
    write_section(md, "a", "first A")
    write_section(md, "b", "only B")
    write_section(md, "a", "second A\n\nwith | a table |")
    text = md.read_text()
    assert "second A" in text and "first A" not in text and text.count("only B") == 1
    assert text.index("<!-- a: begin -->") < text.index("<!-- b: begin -->")  # a section keeps its place
