"""CheckpointManager in one process: exact resume, atomic layout, keep_latest_k, async, model-only final save,
the growth hook with LazyExperts, and bad inputs (one-line UserError, nothing written)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from titan_aquila.checkpoint.manager import CheckpointManager, read_checkpoint_args
from titan_aquila.checkpoint.storage import from_blob, latest_checkpoint, read_model_state_dict, to_blob
from titan_aquila.config import JobConfig
from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

warnings.filterwarnings("ignore", message=".*set_vital.*")
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=32).validate()


def make_cfg(tmp_path, **ck) -> JobConfig:
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path / "run")
    cfg.checkpoint.enable = True
    cfg.checkpoint.interval = 2
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


class Trainer:
    """Model + AdamW + warmup LambdaLR + shuffling StatefulDataLoader, as train.py wires them."""

    def __init__(self, cfg, args=ARGS, seed=0):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.model = build_model(args, seed=seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / 3))
        data = torch.randint(0, args.vocab_size, (40, 9), generator=torch.Generator().manual_seed(0))
        self.dl = StatefulDataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
        self.ckpt = CheckpointManager(cfg, self.model, self.opt, self.sched, self.dl, args)
        self.it = None

    def run(self, first: int, last: int) -> list[float]:
        self.it = self.it or iter(self.dl)
        losses = []
        for step in range(first, last + 1):
            b = next(self.it)
            logits, _ = self.model(b[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.sched.step()
            losses.append(loss.item())
            self.ckpt.maybe_save(step)
        return losses


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_resume_is_bit_exact(tmp_path, async_mode):
    ref = Trainer(make_cfg(tmp_path / "ref", enable=False))
    expected = ref.run(1, 7)
    a = Trainer(make_cfg(tmp_path, async_mode=async_mode, keep_latest_k=0))
    assert a.ckpt.load() == 0
    assert a.run(1, 5) == expected[:5]
    a.ckpt.close()
    # A fresh process-like restart: new objects, resume from step-4 (latest), continue 5..7.
    b = Trainer(make_cfg(tmp_path, async_mode=async_mode, keep_latest_k=0), seed=123)
    assert b.ckpt.load() == 4
    assert b.run(5, 7) == expected[4:]  # bit-identical floats: model, optimizer, scheduler, data order all restored
    assert b.sched.last_epoch == ref.sched.last_epoch
    b.ckpt.close()  # an async save in flight is committed here
    for (n, p), q in zip(b.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(p, q), n
    folder = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-6"]
    meta = json.loads((folder / "step-6" / "metadata.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["torch_version"] == torch.__version__
    assert read_checkpoint_args(folder) == ARGS
    assert json.loads((folder / "step-6" / "job_config.json").read_text())["checkpoint"]["interval"] == 2


def test_tmp_dirs_never_latest_keep_latest_k_and_cleanup(tmp_path):
    t = Trainer(make_cfg(tmp_path, keep_latest_k=2))
    t.ckpt.load()
    t.run(1, 6)
    folder = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-4", "step-6"]
    # A killed save of a later step: complete-looking DCP files, but still a tmp name -> never latest.
    stale = folder / "step-8.tmp-deadbeef"
    stale.mkdir()
    for f in (folder / "step-6").iterdir():
        (stale / f.name).write_bytes(f.read_bytes())
    assert latest_checkpoint(folder).name == "step-6"
    t.ckpt.close()  # the restart below is another run: the first one releases the folder
    u = Trainer(make_cfg(tmp_path, keep_latest_k=2))
    assert u.ckpt.load() == 6
    assert not stale.exists()  # cleaned on start


def test_final_save_model_only_in_export_dtype(tmp_path):
    t = Trainer(make_cfg(tmp_path, last_save_model_only=True, export_dtype="bfloat16", interval=100))
    t.ckpt.load()
    t.run(1, 3)
    t.ckpt.maybe_save(3, force=True)
    d = tmp_path / "run" / "checkpoint" / "step-3"
    assert json.loads((d / "metadata.json").read_text())["model_only"] is True
    sd = read_model_state_dict(d)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["norm.weight"], t.model.norm.weight.detach().to(torch.bfloat16))
    # As initial_load_path it loads model-only (the full load is refused with a clear message).
    cfg = make_cfg(tmp_path / "next", initial_load_path=str(d))
    assert Trainer(cfg, seed=5).ckpt.load() == 0
    cfg.checkpoint.initial_load_model_only = False
    with pytest.raises(UserError, match="model weights only"):
        Trainer(cfg, seed=5).ckpt.load()


def test_initial_load_full_and_model_only(tmp_path):
    src = Trainer(make_cfg(tmp_path / "src"))
    src.run(1, 2)
    path = tmp_path / "src" / "run" / "checkpoint"
    t = Trainer(make_cfg(tmp_path, initial_load_path=str(path)), seed=9)
    assert t.ckpt.load() == 0
    assert torch.equal(t.model.output.weight, src.model.output.weight)
    assert not t.opt.state  # model only: optimizer untouched
    cfg = make_cfg(tmp_path / "full", initial_load_path=str(path), initial_load_model_only=False)
    u = Trainer(cfg, seed=9)
    assert u.ckpt.load() == 2 and u.sched.last_epoch == 2 and len(u.opt.state) > 0


def test_blob_round_trip_is_exact():
    obj = {"a": (1, 2.5, None), "b": [b"\x00\xff", {"k": torch.arange(3)}], 3: "int key", "f": 0.1 + 0.2}
    back = from_blob(to_blob(obj))
    assert back["a"] == (1, 2.5, None) and back["b"][0] == b"\x00\xff" and back[3] == "int key"
    assert torch.equal(back["b"][1]["k"], torch.arange(3)) and back["f"] == 0.1 + 0.2


# ---- growth hook with a trivial transform producing LazyExperts ---------------------------------------------
def _register_test_upcycle():
    from titan_aquila.growth import REGISTRY, GrowthMethod, LazyExperts, register

    if "test_copy_upcycle" in REGISTRY:
        return REGISTRY["test_copy_upcycle"].doc
    built: list[int] = []

    def apply(src_args, sd, dst_args, opts):
        out = {k: v for k, v in sd.items() if ".feed_forward." not in k}
        for i in range(dst_args.n_layers):
            ff = f"layers.{i}.feed_forward."
            for w in ("w1", "w2", "w3"):
                dense = sd[ff + w + ".weight"]

                def make(e, dense=dense):
                    built.append(e)
                    return dense.clone()
                out[f"layers.{i}.moe.experts.{w}"] = LazyExperts((dst_args.n_experts, *dense.shape), dense.dtype, make)
            out[f"layers.{i}.moe.router.weight"] = torch.zeros(dst_args.n_experts, dst_args.dim)
            out[f"layers.{i}.moe.expert_bias"] = torch.zeros(dst_args.n_experts)
        return out

    register(GrowthMethod("test_copy_upcycle", ("n_experts", "top_k", "moe_ffn_dim"),
                          plan=lambda a, b, o: b.validate(), apply=apply, doc=built))
    return built


def test_growth_hook_builds_the_grown_model(tmp_path):
    from titan_aquila.checkpoint.manager import resolve_growth

    built = _register_test_upcycle()
    src = Trainer(make_cfg(tmp_path / "src"))
    src.run(1, 2)
    cfg = make_cfg(tmp_path)
    cfg.growth.enable, cfg.growth.methods = True, ["test_copy_upcycle"]
    cfg.growth.source_path = str(tmp_path / "src" / "run" / "checkpoint")
    target = ARGS.replace(n_experts=4, top_k=2)
    plan = resolve_growth(cfg, target)
    assert plan.dst_args.n_experts == 4 and plan.src_args == ARGS
    t = Trainer(cfg, args=plan.dst_args, seed=7)
    built.clear()
    assert t.ckpt.load() == 0
    assert sorted(set(built)) == [0, 1, 2, 3]
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # identical experts + topk_softmax: the MoE equals the dense source exactly
        diff = (t.model(tokens)[0] - src.model(tokens)[0]).abs().max().item()
    assert diff < 1e-5


# ---- bad inputs ---------------------------------------------------------------------------------------------
def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_bad_inputs_one_line_user_errors(tmp_path):
    src = Trainer(make_cfg(tmp_path / "src"))
    src.run(1, 2)
    good = tmp_path / "src" / "run" / "checkpoint" / "step-2"

    def err(cfg, args=ARGS) -> str:
        before = _tree(tmp_path / "run")
        with pytest.raises(UserError) as e:
            Trainer(cfg, args=args).ckpt.load()
        assert _tree(tmp_path / "run") == before  # nothing written
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err(make_cfg(tmp_path, initial_load_path=str(tmp_path / "missing")))
    assert "holds no checkpoint" in err(make_cfg(tmp_path, initial_load_path=str(tmp_path)))
    msg = err(make_cfg(tmp_path, initial_load_path=str(good)), args=ARGS.replace(dim=48, ffn_dim=96))
    assert "dim 32 (checkpoint) vs 48 (config)" in msg and "ffn_dim 64 (checkpoint) vs 96 (config)" in msg
    # Corrupt copies: no .metadata, a missing shard, a truncated shard, no model_args.json.
    for name, damage in [("nometa", lambda d: (d / ".metadata").unlink()),
                         ("noshard", lambda d: (d / "__0_0.distcp").unlink()),
                         ("trunc", lambda d: os.truncate(d / "__0_0.distcp", 100)),
                         ("noargs", lambda d: (d / "model_args.json").unlink())]:
        bad = tmp_path / name / "step-2"
        bad.mkdir(parents=True)
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        damage(bad)
        msg = err(make_cfg(tmp_path, initial_load_path=str(bad)))
        expect = {"nometa": ".metadata is missing", "noshard": "shard __0_0.distcp is missing",
                  "trunc": "truncated", "noargs": "model_args.json is missing"}[name]
        assert expect in msg, msg
    # Growth source without model_args.json.
    cfg = make_cfg(tmp_path)
    cfg.growth.enable, cfg.growth.methods = True, ["test_copy_upcycle"]
    cfg.growth.source_path = str(tmp_path / "noargs")
    _register_test_upcycle()
    from titan_aquila.checkpoint.manager import resolve_growth

    with pytest.raises(UserError, match="model_args.json is missing"):
        resolve_growth(cfg, ARGS.replace(n_experts=4))
