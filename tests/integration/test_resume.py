"""Resume and resharding with real processes.

- FSDP2 on 2 gloo ranks saves -> 1 process loads (and 1 -> 2, and 2 -> 2): same logits, same next training step
  (optimizer resharded), data position restored only at the same data-parallel degree.
- Growth into an FSDP2-sharded MoE: each rank builds only the experts of its own shard (LazyExperts).
- A process SIGKILLed in the middle of a save (TITAN_AQUILA_TEST_KILL_DURING_SAVE) leaves a tmp folder that is never
  loaded; the restarted run ends bit-identical to an uninterrupted one.
- End to end with train.py (skipped until train.py and train_configs/debug_model.toml exist).
Workers are this file run as a script (`python tests/integration/test_resume.py SCENARIO ...`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
N_EXPERTS = 4


def _args():
    from titan_aquila.models.args import ModelArgs

    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=32,
                     n_experts=N_EXPERTS, top_k=2, moe_ffn_dim=16, moe_layer_step=2, init_std=0.1).validate()


# ================================ worker side ==================================================================
def _setup(world: int, out: Path, seed: int, args=None, interval: int = 2):
    import torch
    import torch.distributed as dist
    from torchdata.stateful_dataloader import StatefulDataLoader

    from titan_aquila.checkpoint.manager import CheckpointManager
    from titan_aquila.config import JobConfig
    from titan_aquila.models.aquila import build_model

    rank = dist.get_rank() if dist.is_initialized() else 0
    args = args or _args()
    model = build_model(args, seed=seed)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3))
    data = torch.arange(400).reshape(100, 4)[rank::world]
    dl = StatefulDataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(rank))
    cfg = JobConfig()
    cfg.job.dump_folder = str(out)
    cfg.checkpoint.enable, cfg.checkpoint.interval, cfg.checkpoint.keep_latest_k = True, interval, 0
    cfg.checkpoint.async_mode = os.environ.get("TEST_ASYNC_MODE", "disabled")
    return model, opt, sched, dl, CheckpointManager(cfg, model, opt, sched, dl, args), cfg


def _train_step(model, opt, sched, step: int) -> float:
    import torch

    g = torch.Generator().manual_seed(1000 + step)  # same batch on every rank: FSDP mean == one process
    tokens = torch.randint(0, 64, (2, 9), generator=g)
    logits, aux = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + 0.01 * aux.sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def _probe(model) -> list:
    import torch

    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(tokens)[0].tolist()


def _register_test_upcycle(built: list):
    from titan_aquila.growth import GrowthMethod, LazyExperts, register

    def apply(src_args, sd, dst_args, opts):
        import torch

        out = dict(sd)
        for i in dst_args.moe_layer_ids:
            ff = f"layers.{i}.feed_forward."
            for w in ("w1", "w2", "w3"):
                dense = out.pop(ff + w + ".weight")

                def make(e, dense=dense):
                    built.append(e)
                    return dense.clone()
                out[f"layers.{i}.moe.experts.{w}"] = LazyExperts((dst_args.n_experts, *dense.shape), dense.dtype, make)
            out[f"layers.{i}.moe.router.weight"] = torch.randn(dst_args.n_experts, dst_args.dim)
            out[f"layers.{i}.moe.expert_bias"] = torch.zeros(dst_args.n_experts)
        return out

    register(GrowthMethod("test_copy_upcycle", ("n_experts", "top_k", "moe_ffn_dim", "moe_layer_step"),
                          plan=lambda a, b, o: b.validate(), apply=apply))


def worker(scenario: str, out: Path) -> dict:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if scenario == "save":  # train 2 steps, advance data 2 batches, save, record next batch / logits / step 3
        model, opt, sched, dl, ckpt, _ = _setup(world, out, seed=0)
        for s in (1, 2):
            _train_step(model, opt, sched, s)
        it = iter(dl)
        next(it), next(it)
        ckpt.save(2)
        res = {"logits": _probe(model), "next_batch": next(it).tolist()}
        _train_step(model, opt, sched, 3)  # with async_mode, while the save is in flight
        ckpt.close()
        return {**res, "logits3": _probe(model)}
    if scenario == "load":
        model, opt, sched, dl, ckpt, _ = _setup(world, out, seed=99)
        step = ckpt.load()
        res = {"step": step, "logits": _probe(model), "next_batch": next(iter(dl)).tolist(), "lr": sched.get_last_lr()}
        _train_step(model, opt, sched, 3)
        return {**res, "logits3": _probe(model)}
    if scenario == "grow":  # dense source (one process wrote it) -> FSDP-sharded MoE, lazily
        built: list[int] = []
        _register_test_upcycle(built)
        target = _args().replace(moe_ffn_dim=_args().ffn_dim)  # copies of the dense FFN
        model, opt, sched, dl, ckpt, cfg = _setup(world, out / "grown", seed=3, args=target)
        cfg.growth.enable, cfg.growth.methods, cfg.growth.source_path = True, ["test_copy_upcycle"], str(out / "src")
        from titan_aquila.checkpoint.manager import resolve_growth

        plan = resolve_growth(cfg, target)
        assert plan.dst_args == target
        assert ckpt.load() == 0
        return {"built": sorted(set(built)), "n_built": len(built), "logits": _probe(model)}
    if scenario == "dense_src":
        from titan_aquila.checkpoint.storage import write_model_checkpoint
        from titan_aquila.models.aquila import build_model

        dense = _args().replace(n_experts=0)
        model = build_model(dense, seed=4)
        write_model_checkpoint(out / "src", model.state_dict(), dense, {})
        return {"logits": _probe(model)}
    if scenario == "train":  # single process, 6 steps, checkpoint every 2 (the kill hook may end it)
        model, opt, sched, dl, ckpt, _ = _setup(1, out, seed=0)
        start, losses = ckpt.load(), []
        for s in range(start + 1, 7):
            losses.append(_train_step(model, opt, sched, s))
            ckpt.maybe_save(s)
        ckpt.maybe_save(6, force=True)
        ckpt.close()
        return {"start": start, "losses": losses, "params": {k: v.tolist() for k, v in model.state_dict().items()}}
    raise ValueError(scenario)


def _worker_main() -> None:
    import torch.distributed as dist

    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    code = 0
    try:
        res = worker(scenario, out)
        rank = dist.get_rank() if world > 1 else 0
        (out / f"{scenario}.w{world}.rank{rank}.json").write_text(json.dumps(res))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if world > 1:  # gloo-safe teardown (gloo can crash a normal interpreter exit)
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _worker_main()


# ================================ test side ====================================================================
import pytest  # noqa: E402
import torch  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int, env: dict | None = None, expect_rc: int = 0) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
             "PYTHONPATH": str(REPO), **(env or {})}
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(out)], env=e, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == expect_rc, f"{scenario} (world {world}) exited {p.returncode}:\n{o[-3000:]}"
    if expect_rc:
        return []
    return [json.loads((out / f"{scenario}.w{world}.rank{r}.json").read_text()) for r in range(world)]


def _first_batch(rank: int, world: int) -> list:
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = torch.arange(400).reshape(100, 4)[rank::world]
    dl = StatefulDataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(rank))
    return next(iter(dl)).tolist()


def _maxdiff(a, b) -> float:
    import torch

    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


@pytest.mark.parametrize("save_world,load_world,mode", [(2, 1, "disabled"), (1, 2, "disabled"), (2, 2, "disabled"),
                                                        (2, 1, "async")])
def test_reshard_save_then_load(tmp_path, save_world, load_world, mode):
    saved = launch("save", tmp_path, save_world, env={"TEST_ASYNC_MODE": mode})
    loaded = launch("load", tmp_path, load_world)
    for r, res in enumerate(loaded):
        assert res["step"] == 2
        d0, d3 = _maxdiff(res["logits"], saved[0]["logits"]), _maxdiff(res["logits3"], saved[0]["logits3"])
        print(f"\n{save_world}->{load_world} rank {r}: logits diff after load {d0:.2e}, after one more step {d3:.2e}")
        assert d0 == 0.0  # parameters restored exactly
        assert d3 <= 1e-5  # optimizer state resharded (FSDP reduce order may differ by rounding)
        if save_world == load_world:  # same dp degree: data position restored per rank
            assert res["next_batch"] == saved[r]["next_batch"]
        else:  # dp degree changed: restarted from the beginning, i.e. the first batch of a fresh loader
            assert res["next_batch"] == _first_batch(r, load_world)


def test_growth_into_fsdp_builds_only_local_experts(tmp_path):
    src = launch("dense_src", tmp_path, 1)[0]
    grown = launch("grow", tmp_path, 2)
    half = N_EXPERTS // 2
    assert grown[0]["built"] == list(range(half)) and grown[1]["built"] == list(range(half, N_EXPERTS))
    assert grown[0]["n_built"] == 3 * half  # w1, w2, w3 of its own experts, once each, in the one MoE layer
    # Identical experts + topk_softmax routing: the grown MoE computes exactly the dense source function.
    assert _maxdiff(grown[0]["logits"], src["logits"]) <= 1e-5


def test_killed_save_is_never_loaded_and_resume_is_bit_exact(tmp_path):
    ref = launch("train", tmp_path / "ref", 1)[0]
    run = tmp_path / "run"
    launch("train", run, 1, env={"TITAN_AQUILA_TEST_KILL_DURING_SAVE": "4"}, expect_rc=-signal.SIGKILL)
    folder = run / "checkpoint"
    names = sorted(p.name for p in folder.iterdir())
    assert names[0] == "step-2" and names[1].startswith("step-4.tmp-") and len(names) == 2, names
    res = launch("train", run, 1)[0]
    assert res["start"] == 2  # the killed step-4 save was not loaded
    assert res["losses"] == ref["losses"][2:]  # bit-identical
    assert res["params"] == ref["params"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-6"]


# ---- end to end with train.py ---------------------------------------------------------------------------------
TRAIN = REPO / "train.py"
DEBUG_TOML = REPO / "train_configs" / "debug_model.toml"
LOSS_RE = re.compile(r"step\D{0,3}(\d+)\b.*?loss\D{0,3}([-+]?\d+\.\d+(?:[eE][-+]?\d+)?)")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _tiny_toml(path: Path) -> None:
    """train_configs/debug_model.toml with a tiny model (2 layers, dim 64) for a fast CPU test."""
    import tomli

    cfg = tomli.loads(DEBUG_TOML.read_text())
    cfg.setdefault("model", {}).setdefault("overrides", {}).update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                                  ffn_dim=128)
    lines = []
    for section, table in cfg.items():
        flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines += [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in flat.items()] + [""]
        for k, sub in table.items():
            if isinstance(sub, dict):
                lines += [f"[{section}.{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in sub.items()] + [""]
    path.write_text("\n".join(lines))


def _train(folder: Path, steps: int, env=None, kill_when=None):
    """Run train.py on one process; with `kill_when`, SIGKILL it as soon as kill_when() is true (or it exits)."""
    folder.mkdir(parents=True, exist_ok=True)
    _tiny_toml(folder / "tiny.toml")
    cmd = [sys.executable, str(TRAIN), "--job.config_file", str(folder / "tiny.toml"), "--job.dump_folder", str(folder),
           "--training.steps", str(steps), "--training.seq_len", "32", "--training.local_batch_size", "2",
           "--checkpoint.enable", "true", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0",
           "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false"]
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if kill_when is None:
        stdout = p.communicate(timeout=600)[0]
        assert p.returncode == 0, stdout[-3000:]
        return {int(a): b for a, b in LOSS_RE.findall(stdout)}
    deadline = time.time() + 600
    while not kill_when() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    assert p.returncode == -signal.SIGKILL, out[-3000:]
    return {int(a): b for a, b in LOSS_RE.findall(out)}


@pytest.mark.skipif(not (TRAIN.exists() and DEBUG_TOML.exists()), reason="needs train.py and "
                    "train_configs/debug_model.toml (trainer helper)")
def test_train_py_resume_after_sigkill_is_bit_exact(tmp_path):
    from titan_aquila.checkpoint.storage import read_model_state_dict

    steps = 12
    ref_losses = _train(tmp_path / "ref", steps)
    run = tmp_path / "run"
    ck = run / "checkpoint"
    # 1) SIGKILL in the middle of training, as soon as step-4 is committed (training goes on meanwhile).
    _train(run, steps, kill_when=lambda: (ck / "step-4").is_dir())
    # 2) Restart; the test hook SIGKILLs the process inside the save of step 10: step-10 must never be committed.
    _train(run, steps, env={"TITAN_AQUILA_TEST_KILL_DURING_SAVE": "10"}, kill_when=lambda: False)
    assert not (ck / "step-10").exists() and any(p.name.startswith("step-10.tmp-") for p in ck.iterdir())
    # 3) Restart to the end: resumes from step 8, never from the killed save.
    losses = _train(run, steps)
    assert not any(p.name.startswith("step-10.tmp-") for p in ck.iterdir())
    common = sorted(set(losses) & set(ref_losses))
    assert all(losses[s] == ref_losses[s] for s in common), [(s, losses[s], ref_losses[s]) for s in common]
    ref = read_model_state_dict(tmp_path / "ref" / "checkpoint" / f"step-{steps}")
    got = read_model_state_dict(ck / f"step-{steps}")
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)  # bit-identical weights


def test_resume_with_more_steps_follows_the_new_lr_schedule(tmp_path):
    """10 steps with a 10-step linear schedule, then the same job resumed with training.steps 20: steps 11-20 take
    the 20-step schedule's LR (the saved optimizer holds the old schedule's end value, 0)."""
    from _util import read_tensorboard, run_train, tensorboard_runs, tiny_config

    from titan_aquila.optim import lr_multiplier

    cfg = tiny_config(tmp_path, training={"steps": 10}, checkpoint={"enable": True, "interval": 10},
                      lr_scheduler={"warmup_steps": 2, "decay_type": "linear"},
                      metrics={"log_freq": 1, "enable_tensorboard": True})
    assert run_train(cfg).rc == 0
    resumed = run_train(cfg, "--training.steps", "20")
    assert resumed.rc == 0, resumed.err
    assert sorted(resumed.losses) == list(range(11, 21))
    lrs = {e.step: e.value for e in read_tensorboard(tensorboard_runs(tmp_path / "run" / "tb")[-1]).Scalars("lr")}
    want = {s: 3e-3 * lr_multiplier(s, 2, 20, None, "linear", 0.0) for s in range(11, 21)}
    assert want[11] == pytest.approx(1.5e-3) and 3e-3 * lr_multiplier(11, 2, 10, None, "linear", 0.0) == 0.0
    assert lrs == pytest.approx(want, rel=1e-6)
