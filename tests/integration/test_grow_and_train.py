"""train.py grows a trained dense checkpoint at load time and keeps training on 2 FSDP2 ranks (gloo).

One tiny dense run (module fixture) saves the source checkpoint; then
  - Scale-Up: [growth] methods = ["fpi", "zero"] (width x2, 2 -> 3 layers, both exact): the growth audit shows the
    source loss kept (<= 1e-4) and the grown model's training loss falls;
  - Scale-Out: methods = ["upcycle"] (4 experts, top-2, Mixtral routing): the audit keeps the loss, the loss falls,
    and the experts' share of the *same* validation batches (TensorBoard `validation_metrics/moe_load/...`, step 0 = the audit,
    before any update) moves away from its initial value as the router trains.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _util import ROOT, losses, read_tensorboard, run_train, tensorboard_runs, tiny_config

COMMON = dict(training={"local_batch_size": 2, "seq_len": 32, "steps": 10, "seed": 7},
              optimizer={"lr": 3e-3}, lr_scheduler={"warmup_steps": 2})


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dense")
    cfg = tiny_config(tmp, "dense", checkpoint={"enable": True, "interval": 1000},
                      **{**COMMON, "training": {**COMMON["training"], "steps": 8}, "optimizer": {"lr": 1e-2}})
    rc, out, err = run_train(cfg, timeout=120)
    assert rc == 0, err[-3000:]
    return tmp / "dense" / "checkpoint"


def _grow_and_train(tmp_path, source: Path, methods: list[str], overrides: dict, audit_steps: int = 2, **sections):
    cfg = tiny_config(tmp_path, "grown", overrides=overrides,
                      growth={"enable": True, "source_path": str(source), "methods": methods,
                              "audit_steps": audit_steps},
                      **{**COMMON, **sections})
    rc, out, err = run_train(cfg, nproc=2, timeout=240)
    assert rc == 0, err[-3000:]
    assert "FSDP2 over 2 ranks" in out
    # a clean run prints no library warning (torch's DeviceMesh deprecation came from slicing the flattened "dp")
    assert "Warning" not in err and "deprecat" not in err.lower(), err[-3000:]
    audit = json.loads((tmp_path / "grown" / "growth_audit.json").read_text())
    ls = losses(out)
    print(f"\ngrowth audit: {audit}\ntraining losses: {ls}")
    assert audit["tokens"] > 0 and audit["source_loss"] < 10.7  # the source learned (ln 49152 = 10.80 is chance)
    assert abs(audit["grown_loss"] - audit["source_loss"]) <= 1e-4 and audit["max_logit_diff"] <= 1e-4
    assert sorted(ls) == list(range(1, 11))
    assert ls[10] < ls[1] - 0.1, ls
    return audit, out


def test_train_py_grows_width_and_depth_on_two_ranks(tmp_path, dense_checkpoint):
    audit, out = _grow_and_train(tmp_path, dense_checkpoint, ["fpi", "zero"],
                                 {"dim": 128, "n_heads": 8, "ffn_dim": 256, "n_layers": 3}, audit_steps=-1,
                                 validation={"enable": True, "freq": 10, "steps": -1})
    assert audit["methods"] == "fpi -> zero" and "expert_load" not in audit
    # audit_steps = -1 audits the whole validation set: as many tokens as a full validation pass
    full = re.findall(r"validation loss [\d.]+ +\(([\d,]+) tokens\)", out)
    assert full and audit["tokens"] == int(full[-1].replace(",", "")), (audit, full)
    assert "grown by fpi -> zero" in out


def test_train_py_upcycles_on_two_ranks_and_the_validation_expert_load_moves(tmp_path, dense_checkpoint):
    E = 4
    audit, out = _grow_and_train(
        tmp_path, dense_checkpoint, ["upcycle"], {"n_experts": E, "top_k": 2, "router_order": "topk_softmax"},
        moe={"load_balance_coeff": 1e-3}, validation={"enable": True, "freq": 10, "steps": 2},
        metrics={"log_freq": 1, "enable_tensorboard": True})
    assert audit["methods"] == "upcycle" and sorted(audit["expert_load"]) == ["0", "1"]
    assert "experts used per MoE layer" in out

    (run,) = tensorboard_runs(tmp_path / "grown" / "tb")
    acc = read_tensorboard(run)
    moved = []
    for layer in (0, 1):
        series = acc.Histograms(f"validation_metrics/moe_load/layer{layer}/shares")  # bucket e = expert e's share
        assert [h.step for h in series] == [0, 10]
        start, end = [list(h.histogram_value.bucket) for h in series]
        assert len(start) == E
        assert start == pytest.approx(audit["expert_load"][str(layer)], abs=1e-6)  # step 0 is the audit
        assert sum(start) == pytest.approx(1.0, abs=1e-5) and sum(end) == pytest.approx(1.0, abs=1e-5)
        moved.append(max(abs(a - b) for a, b in zip(start, end)))
    print(f"largest change of an expert's share of the validation tokens, per layer: {moved}")
    assert max(moved) > 0.01  # same tokens, trained router: the routing changed

    # scripts/expert_load.py reports the same numbers from the same events
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "expert_load.py"), str(tmp_path / "grown" / "tb")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"over all layers: {max(moved):.4f}" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines()[1:3]]
    assert [(row[0], row[1], float(row[2])) for row in rows] == [
        ("0", "0->10", pytest.approx(moved[0], abs=1e-4)), ("1", "0->10", pytest.approx(moved[1], abs=1e-4))]
    empty = subprocess.run([sys.executable, str(ROOT / "scripts" / "expert_load.py"), str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and empty.stderr.startswith("error: no validation_metrics/moe_load/") and \
        "Traceback" not in empty.stderr



def test_grown_weights_and_audit_equal_at_one_two_and_four_ranks(tmp_path, dense_checkpoint):
    """Streaming growth into shards (training.steps = 0: grow, audit, save): AKI-Pro width x2 + depth 2 -> 3, then
    4 experts. The step-0 checkpoints of 1 rank, 2 ranks (EP 2) and 4 ranks (FSDP2 x TP2) hold bit-identical
    weights, and the audits (whole validation set, source sharded like the grown model) agree."""
    from titan_aquila.checkpoint.storage import read_model_state_dict

    saved, audits = {}, {}
    for name, nproc, flags in (("one", 1, ()), ("ep", 2, ("--parallelism.expert_parallel_degree", "2")),
                               ("fsdp_tp", 4, ("--parallelism.tensor_parallel_degree", "2"))):
        cfg = tiny_config(tmp_path, name, overrides={"dim": 128, "n_heads": 8, "ffn_dim": 256, "n_layers": 3,
                                                      "n_experts": 4, "top_k": 2, "moe_ffn_dim": 256},
                          growth={"enable": True, "source_path": str(dense_checkpoint),
                                  "methods": ["aki_pro", "upcycle"], "audit_steps": -1},
                          checkpoint={"enable": True}, **{**COMMON, "training": {**COMMON["training"], "steps": 0}})
        rc, out, err = run_train(cfg, *flags, nproc=nproc, timeout=400)
        assert rc == 0, err[-3000:]
        saved[name] = read_model_state_dict(tmp_path / name / "checkpoint" / "step-0")
        audits[name] = json.loads((tmp_path / name / "growth_audit.json").read_text())
    for name in ("ep", "fsdp_tp"):
        assert all(torch.equal(saved[name][k], v) for k, v in saved["one"].items()), name
        assert audits[name]["tokens"] == audits["one"]["tokens"] > 0
        for key in ("source_loss", "grown_loss"):
            assert abs(audits[name][key] - audits["one"][key]) <= 1e-5, (name, key, audits)
    assert abs(audits["one"]["grown_loss"] - audits["one"]["source_loss"]) > 1e-3  # AKI is not function-preserving
