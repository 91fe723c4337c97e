"""train.py with moe.capacity_factor = 1 on a freshly upcycled model: the growth audit shows how far token dropping
takes the MoE from its dense source, and training logs each MoE layer's dropped fraction (console and TensorBoard).

The source is a tiny dense model written as a checkpoint in this process; `upcycle` (identical experts, Mixtral
routing) is exact when dropless, so every difference the audit reports is the dropping's. The audit's per-layer
fractions are checked against a recount: the same validation batches through the same upcycled model, in process.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from _util import TINY, read_tensorboard, run_train, tensorboard_runs, tiny_config

E, K = 4, 2


def test_upcycled_model_with_capacity_one_audit_and_logging(tmp_path):
    from titan_aquila.checkpoint.storage import write_model_checkpoint
    from titan_aquila.models.args import ModelArgs
    from titan_aquila.models.aquila import build_model

    dense_args = ModelArgs(**TINY).validate()
    dense = build_model(dense_args, seed=11)
    write_model_checkpoint(tmp_path / "dense", dense.state_dict(), dense_args, {})
    cfg = tiny_config(tmp_path, "moe", overrides={"n_experts": E, "top_k": K, "router_order": "topk_softmax"},
                      growth={"enable": True, "source_path": str(tmp_path / "dense"), "methods": ["upcycle"],
                              "audit_steps": 2, "router_init_std": 0.5},
                      moe={"capacity_factor": 1.0, "pad_to_capacity": True},
                      training={"steps": 3}, validation={"enable": True, "freq": 3, "steps": 1},
                      metrics={"log_freq": 1, "enable_tensorboard": True})
    rc, out, err = run_train(cfg, timeout=240)
    assert rc == 0, err[-3000:]
    audit = json.loads((tmp_path / "moe" / "growth_audit.json").read_text())
    print(f"\n{out}")
    drops = {int(k): v for k, v in audit["dropped_fraction"].items()}
    assert sorted(drops) == [0, 1] and all(0.02 < f < 0.5 for f in drops.values()), drops
    # not the dense model any more, and the audit says by how much
    assert audit["max_logit_diff"] > 1e-3 and audit["grown_loss"] != audit["source_loss"]
    mean, worst = sum(drops.values()) / 2, max(drops, key=drops.get)
    assert (f"capacity factor 1.0: dropped {100 * mean:.2f}% (max {100 * drops[worst]:.2f}% layer {worst})"
            in out)
    steps = re.findall(r"^step\s+(\d+)\s+loss .*  dropped ([\d.]+)% \(max ([\d.]+)% layer (\d)\)", out, re.M)
    assert [int(s[0]) for s in steps] == [1, 2, 3]
    assert re.search(r"^step\s+3\s+validation loss [\d.]+ +\([\d,]+ tokens\)  dropped [\d.]+%", out, re.M)

    (tb_run,) = tensorboard_runs(tmp_path / "moe" / "tb")
    acc = read_tensorboard(tb_run)
    for layer in (0, 1):
        train = acc.Scalars(f"moe_load/layer{layer}/dropped_frac")
        assert [s.step for s in train] == [1, 2, 3] and all(0 < s.value < 1 for s in train)
        val = acc.Scalars(f"validation_metrics/moe_load/layer{layer}/dropped_frac")
        assert [s.step for s in val] == [0, 3]
        assert val[0].value == pytest.approx(drops[layer], abs=1e-6)  # step 0 is the audit
    for s, mean_pct, max_pct, layer in steps:  # the console line is the TensorBoard values' mean and max
        vals = [acc.Scalars(f"moe_load/layer{i}/dropped_frac")[int(s) - 1].value for i in (0, 1)]
        assert float(mean_pct) == pytest.approx(100 * sum(vals) / 2, abs=0.006)
        assert float(max_pct) == pytest.approx(100 * max(vals), abs=0.006) and vals[int(layer)] == max(vals)

    # Recount in process: the audited upcycled model (from the same growth) on the same validation batches.
    from titan_aquila.config import load_job_config
    from titan_aquila.data.dataset import build_validation_dataloader
    from titan_aquila.data.tokenizer import Tokenizer
    from titan_aquila.growth import apply_growth, materialize, plan_growth
    from titan_aquila.growth.loader import growth_options
    from titan_aquila.train_utils import moe_modules

    job = load_job_config(["--job.config_file", str(cfg)])
    opts = growth_options(job)
    target = dense_args.replace(n_experts=E, top_k=K, router_order="topk_softmax", capacity_factor=1.0,
                                pad_to_capacity=True)
    plan = plan_growth(["upcycle"], dense_args, target, opts)
    moe = build_model(plan.dst_args)
    moe.load_state_dict({k: materialize(v) for k, v in apply_growth(plan, dense.state_dict(), opts).items()})
    tok = Tokenizer(job.model.tokenizer_path)
    loader = build_validation_dataloader(job.validation.dataset_path, tok, job.training.seq_len,
                                         job.training.local_batch_size, 0, 1)
    with torch.no_grad():
        for i, (inputs, _) in enumerate(loader):
            if i == 2:
                break
            moe(inputs)
    for layer, m in moe_modules(moe).items():
        assert (m.tokens_dropped.sum() / m.tokens_per_expert.sum()).item() == pytest.approx(drops[layer], abs=1e-7)
