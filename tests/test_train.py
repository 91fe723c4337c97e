"""train.py end to end as a user runs it: loss falls, FSDP2 parity, accumulation, determinism, bad inputs."""

import pytest

from _util import losses, run_train, tiny_config, val_losses


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
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert "mfu" in out and "tok/s" in out


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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/load_balance", "loss/router_z", "moe/layer0/expert3_frac"} <= set(tags)
    fracs = [acc.Scalars(f"moe/layer1/expert{e}_frac")[-1].value for e in range(4)]
    assert sum(fracs) == pytest.approx(1.0, abs=1e-5)


def test_non_finite_loss_stops_with_the_step_named(tmp_path):
    cfg = tiny_config(tmp_path, optimizer={"lr": 1e30}, lr_scheduler={"warmup_steps": 0}, training={"max_norm": 1e30})
    rc, out, err = run_train(cfg)
    assert rc != 0
    assert "non-finite" in err and "at step" in err and "Traceback" not in err


def test_non_finite_skip_policy_keeps_going(tmp_path):
    cfg = tiny_config(tmp_path, optimizer={"lr": 1e30}, lr_scheduler={"warmup_steps": 0},
                      training={"max_norm": 1e30, "on_nonfinite": "skip", "steps": 4})
    rc, out, err = run_train(cfg)
    assert rc == 0, err
    assert "skipping the optimizer step" in out


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
    if name == "empty data":
        pass
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
