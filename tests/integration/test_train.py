"""train.py end to end as a user runs it: loss falls, FSDP2 parity, accumulation, determinism, non-finite
policies, aux-loss-free balancing, bad inputs; and the loss / expert-bias pieces of the step in-process.

Tolerances: runs that differ only in how the same global batch is split (ranks, micro-batches) agree to abs 2e-5 on
losses of ~11 (fp32 summation order, ~2e-6 relative); the same run twice is bit-identical."""


import pytest
import torch

from _util import losses, read_tensorboard, run_train, tensorboard_runs, tiny_config, val_losses


def test_single_process_run_learns_validates_and_writes_tensorboard(tmp_path):
    cfg = tiny_config(tmp_path, training={"steps": 12}, validation={"enable": True, "freq": 6, "steps": 2},
                      optimizer={"lr": 1e-2},
                      metrics={"log_freq": 1, "enable_tensorboard": True})
    rc, out, err = run_train(cfg)
    assert rc == 0, err
    ls = losses(out)
    assert sorted(ls) == list(range(1, 13))
    assert ls[12] < ls[1] - 0.5, ls
    assert set(val_losses(out)) == {6, 12}
    assert "mfu" in out and "tok/s" in out
    # torchtitan's tag names, with the console's values; one folder per run, so a second run is a new series
    (run,) = tensorboard_runs(tmp_path / "run" / "tb")
    acc = read_tensorboard(run)
    loss = acc.Scalars("loss_metrics/global_avg_loss")
    assert [e.step for e in loss] == list(range(1, 13)) and [round(e.value, 4) for e in loss] == [ls[i] for i in ls]
    assert [e.value for e in acc.Scalars("n_tokens_seen")] == [64 * i for i in range(1, 13)]  # 2 x 32 per step
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("validation_metrics/loss")] == sorted(val_losses(out).items())
    assert {"lr", "grad_norm", "mfu(%)", "throughput(tps)", "memory/max_active(GiB)"} <= set(acc.Tags()["scalars"])
    assert run_train(cfg, "--training.steps", "1").rc == 0
    runs = tensorboard_runs(tmp_path / "run" / "tb")
    assert len(runs) == 2 and runs[0] == run
    assert [e.step for e in read_tensorboard(runs[1]).Scalars("loss_metrics/global_avg_loss")] == [1]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    rc, out, err = run_train(tiny_config(tmp, training={"local_batch_size": 4}))
    assert rc == 0, err
    return losses(out)


def test_two_rank_fsdp_equals_single_process(tmp_path, reference_losses):
    """Same global batch (1 x 4 vs 2 x 2): per-step losses agree to fp32 reduction-order noise."""
    rc, out, err = run_train(tiny_config(tmp_path, training={"local_batch_size": 2}), nproc=2)
    assert rc == 0, err
    assert "FSDP2 over 2 ranks" in out
    got = losses(out)
    assert sorted(got) == sorted(reference_losses)
    for step, ref in reference_losses.items():
        assert got[step] == pytest.approx(ref, abs=2e-5), (step, got[step], ref)


def test_gradient_accumulation_equals_the_big_batch(tmp_path, reference_losses):
    rc, out, err = run_train(tiny_config(tmp_path, training={"local_batch_size": 2, "global_batch_size": 4}))
    assert rc == 0, err
    assert "gradient accumulation 2" in out
    for step, ref in reference_losses.items():
        assert losses(out)[step] == pytest.approx(ref, abs=2e-5)


def test_same_seed_same_losses(tmp_path, reference_losses):
    rc, out, err = run_train(tiny_config(tmp_path, training={"local_batch_size": 4}))
    assert rc == 0, err
    assert losses(out) == reference_losses  # bit-identical printed values


def test_moe_run_logs_aux_losses_and_expert_load(tmp_path):
    cfg = tiny_config(tmp_path, flavor="debugmoe", overrides={"n_experts": 4, "top_k": 2, "moe_ffn_dim": 32},
                      metrics={"log_freq": 1, "enable_tensorboard": True}, training={"steps": 4})
    rc, out, err = run_train(cfg)
    assert rc == 0, err
    assert " lb " in out and " z " in out
    (run,) = tensorboard_runs(tmp_path / "run" / "tb")
    acc = read_tensorboard(run)
    assert {"loss_metrics/load_balance", "loss_metrics/z", "moe_load/layer0/cv"} <= set(acc.Tags()["scalars"])
    # per layer: one histogram whose bucket e is expert e's share, and its summary as three scalars
    for layer in (0, 1):
        hist = acc.Histograms(f"moe_load/layer{layer}/shares")
        assert [h.step for h in hist] == [1, 2, 3, 4]
        shares = list(hist[-1].histogram_value.bucket)
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-5)
        mean, std = sum(shares) / 4, (sum((x - sum(shares) / 4) ** 2 for x in shares) / 4) ** 0.5
        summary = {k: acc.Scalars(f"moe_load/layer{layer}/{k}")[-1].value for k in ("max_share", "min_share", "cv")}
        assert summary == pytest.approx({"max_share": max(shares), "min_share": min(shares), "cv": std / mean},
                                        abs=1e-6)


def test_non_finite_loss_stops_with_the_step_named(tmp_path):
    """Step 1 is finite and takes a 1e30-sized update; step 2's logits overflow."""
    cfg = tiny_config(tmp_path, optimizer={"lr": 1e30}, lr_scheduler={"warmup_steps": 0}, training={"max_norm": 1e30})
    run = run_train(cfg)
    assert run.rc == 2 and len(run.errors) == 1, run.err
    assert "non-finite gradient norm at step 2 (" in run.errors[0] and "Traceback" not in run.err
    assert sorted(run.losses) == [1]


def test_non_finite_skip_policy_keeps_going(tmp_path):
    cfg = tiny_config(tmp_path, optimizer={"lr": 1e30}, lr_scheduler={"warmup_steps": 0},
                      training={"max_norm": 1e30, "on_nonfinite": "skip", "steps": 4})
    run = run_train(cfg)
    assert run.rc == 0, run.err
    # Step 1's 1e30-sized update leaves weights whose gradient overflows: steps 2-4 are skipped, the run goes on.
    warnings = [ln for ln in run.err.splitlines() if ln.startswith("warning: ")]  # the logger's warnings: stderr
    assert [any(f"non-finite gradient norm at step {s} " in w for w in warnings) for s in (1, 2, 3, 4)] == [
        False, True, True, True]
    assert sum("skipping the optimizer step" in w for w in warnings) == 3 and sorted(run.losses) == [1, 2, 3, 4]
    assert "Warning" not in run.err  # no Python warning from a library


BAD = [
    ("unknown key", {"training": {"stepz": 3}}, "did you mean 'training.steps'"),
    ("unknown section", {"trainig": {"steps": 3}}, "unknown section"),
    ("bad type", {"training": {"steps": "many"}}, "training.steps"),
    ("unknown flavor", {"model": {"flavor": "debugmodle"}}, "did you mean 'debugmodel'"),
    ("missing data", {"training": {"dataset_path": ["/nonexistent/data"]}}, "data path not found"),
    ("seq_len > context", {"training": {"seq_len": 4096}}, "max_seq_len"),
    ("top_k > experts", {"model": {"overrides": {"n_experts": 2, "top_k": 3}}}, "top_k"),
    ("heads vs kv heads", {"model": {"overrides": {"n_heads": 4, "n_kv_heads": 3}}}, "not divisible by n_kv_heads"),
    ("bad decay type", {"lr_scheduler": {"decay_type": "cosin"}}, "cosine"),
    ("negative steps", {"training": {"steps": -1}}, "training.steps"),
    ("bad model override", {"model": {"overrides": {"hidden": 3}}}, "unknown model argument 'hidden'"),
    ("degrees vs world", {"parallelism": {"tensor_parallel_degree": 2}}, "world size"),
    ("bad global batch", {"training": {"global_batch_size": 3}}, "global_batch_size"),
]


@pytest.mark.parametrize("name,sections,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line(tmp_path, name, sections, message):
    model = sections.pop("model", {})
    overrides = model.pop("overrides", None)
    cfg = tiny_config(tmp_path, overrides=overrides, **sections, **({"model": model} if model else {}))
    rc, out, err = run_train(cfg, timeout=120)
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]


def test_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n")
    rc, out, err = run_train(tiny_config(tmp_path, training={"dataset_path": [str(tmp_path / "data")]}))
    assert rc == 2 and err.strip().startswith("error: no text in"), err


def test_help_answers_without_a_config():
    run = run_train(None, "--help", timeout=60)
    assert run.rc == 0 and run.out.startswith("usage: train.py") and "--training.steps" in run.out, run.err


def test_moe_bias_update_moves_expert_bias_in_steps_of_the_rate(tmp_path):
    """Aux-loss-free balancing end to end: after 3 steps each bias is k * rate with |k| <= 3, and some moved."""
    cfg = tiny_config(tmp_path, flavor="debugmoe", overrides={"n_experts": 4, "top_k": 1, "moe_ffn_dim": 32,
                                                                 "router_order": "softmax_topk"},
                      training={"steps": 3}, moe={"bias_update_rate": 0.25, "load_balance_coeff": 0.0},
                      checkpoint={"enable": True, "interval": 100})
    rc, out, err = run_train(cfg)
    assert rc == 0, err
    from titan_aquila.checkpoint.storage import read_model_state_dict, resolve_checkpoint_dir

    sd = read_model_state_dict(resolve_checkpoint_dir(str(tmp_path / "run" / "checkpoint")))
    for layer in (0, 1):
        k = sd[f"layers.{layer}.moe.expert_bias"] / 0.25
        assert torch.equal(k, k.round()) and k.abs().max() <= 3, k
        assert k.abs().sum() > 0, k


# ---- the pieces of one step, in-process ------------------------------------------------------------------------
def _coeffs(kind="router_lse", lb=0.1, z=0.01):
    return lb, z, kind == "output_max"


def test_training_loss_adds_weighted_aux_terms():
    from titan_aquila.train_utils import training_loss

    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])  # [B=1, T=2, V=3]
    labels = torch.tensor([[0, 1]])
    ce = -(torch.log(torch.tensor(2.0).exp() / (torch.tensor([2.0, 0.0, -1.0]).exp().sum()))
           + torch.log(torch.tensor(0.5).exp() / torch.tensor([0.5, 0.5, 3.0]).exp().sum())) / 2
    loss, parts = training_loss(logits, labels, torch.tensor([2.0, 3.0]), *_coeffs())
    torch.testing.assert_close(parts, torch.stack([ce, torch.tensor(2.0), torch.tensor(3.0)]))
    torch.testing.assert_close(loss, ce + 0.1 * 2.0 + 0.01 * 3.0)
    # Baichuan-style output max-z: mean over tokens of (max logit)^2 = (2^2 + 3^2) / 2 = 6.5; the router z is unused.
    loss, parts = training_loss(logits, labels, torch.tensor([2.0, 0.0]), *_coeffs("output_max"))
    assert parts[2].item() == pytest.approx(6.5)
    torch.testing.assert_close(loss, ce + 0.1 * 2.0 + 0.01 * 6.5)


def test_expert_bias_update_follows_the_sign_of_the_load_gap():
    from titan_aquila.models.aquila import build_model
    from titan_aquila.models.args import ModelArgs
    from titan_aquila.train_utils import collect_expert_load, update_expert_bias

    model = build_model(ModelArgs(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=32, n_experts=4, top_k=2,
                                  moe_ffn_dim=8), seed=0)
    moe = model.layers["0"].moe
    moe.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    load = collect_expert_load(model)
    assert load[0].tolist() == [10.0, 2.0, 4.0, 4.0] and moe.tokens_per_expert.sum() == 0  # read, then reset
    update_expert_bias(model, load, 0.5)
    assert moe.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    update_expert_bias(model, {0: torch.tensor([5.0, 5.0, 5.0, 5.0])}, 0.5)  # balanced: no change
    assert moe.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_fused_linear_cross_entropy_on_fsdp_equals_the_plain_path(tmp_path):
    """The plain logits + loss on one process against the fused chunked loss on 2 FSDP2 ranks (same global batch;
    chunk 24 does not divide a rank's 32 tokens), with the 'output_max' z-loss on so its gradient counts too.
    (Fused against plain on one process, gradient by gradient: tests/unit/test_losses.py.)"""
    moe = {"z_loss_type": "output_max", "z_loss_coeff": 1e-2}
    ref = run_train(tiny_config(tmp_path, name="plain", training={"local_batch_size": 2, "steps": 4}, moe=moe),
                    "--training.fused_linear_cross_entropy=false")
    assert ref.rc == 0, ref.err
    assert "plain output layer + cross-entropy" in ref.out
    fsdp = run_train(tiny_config(tmp_path, name="fsdp", training={"local_batch_size": 1, "steps": 4}, moe=moe),
                     "--training.loss_chunk_size", "24", nproc=2)
    assert fsdp.rc == 0, fsdp.err
    assert "FSDP2 over 2 ranks" in fsdp.out and "fused chunked linear + cross-entropy, 24 tokens per chunk" in fsdp.out
    assert sorted(ref.losses) == sorted(fsdp.losses) == [1, 2, 3, 4]
    for step, want in ref.losses.items():
        assert fsdp.losses[step] == pytest.approx(want, abs=2e-5), (step, fsdp.losses, ref.losses)
