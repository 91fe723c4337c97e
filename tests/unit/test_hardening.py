"""Hardening, in process: a checkpoint never executes code, one run per folder, unwritable output and failed saves
found early and cleaned up, unreadable or corrupt shards one line naming the file, model overrides type-checked,
the tokenizer never crashes on text, options that used to be ignored. One test (at least) per item of the
hardening issue; each failed on the code before it."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from _util import ROOT
from titan_aquila.checkpoint.dcp_io import file_digest, load_metadata
from titan_aquila.checkpoint.folder import FolderLock
from titan_aquila.checkpoint.manager import CheckpointManager
from titan_aquila.checkpoint.storage import latest_checkpoint, read_model_state_dict, tmp_token
from titan_aquila.config import JobConfig
from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

warnings.filterwarnings("ignore", message=".*(set_vital|torch.distributed is disabled).*")
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=32).validate()


def manager(tmp_path: Path, name: str = "run", **ck) -> CheckpointManager:
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path / name)
    cfg.checkpoint.enable, cfg.checkpoint.interval = True, 2
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    model = build_model(ARGS, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return CheckpointManager(cfg, model, opt, None, None, ARGS)


def saved_run(tmp_path: Path, name: str = "src") -> Path:
    """A run folder with a committed step-2 (full state), its lock released."""
    m = manager(tmp_path, name)
    assert m.load() == 0
    m.model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    m.optimizer.step()
    m.save(2)
    m.close()
    return tmp_path / name / "checkpoint" / "step-2"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


class Payload:
    """Unpickling this runs `touch marker` (a pickle REDUCE of os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- 1. no code execution from a checkpoint -----------------------------------------------------------------
def test_malicious_metadata_never_runs_on_resume_initial_load_growth_or_export(tmp_path):
    from titan_aquila.convert.hf import export_hf

    step = saved_run(tmp_path)
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((step / "metadata.json").read_text())
    meta.pop("checksums")  # an attacker rewrites metadata.json too: the unpickler alone must hold
    (step / "metadata.json").write_text(json.dumps(meta))
    attempts = [lambda: manager(tmp_path, "src").load(),  # resume
                lambda: manager(tmp_path, "b", initial_load_path=str(step)).load(),  # initial load
                lambda: read_model_state_dict(step),  # growth source / audit
                lambda: export_hf(step, tmp_path / "hf")]  # convert export-hf
    for attempt in attempts:
        with pytest.raises(UserError) as e:
            attempt()
        assert f"refused to load .metadata: it references {os.system.__module__}.system" in one_line(e)
        assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "hf").exists()


def test_metadata_with_a_pickled_entry_is_refused(tmp_path):
    """DCP reads a BytesStorageMetadata entry with torch.load(weights_only=False): refused before any read."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step = saved_run(tmp_path)
    md = load_metadata(step / ".metadata")
    md.state_dict_metadata["step"] = BytesStorageMetadata()
    (step / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UserError) as e:
        load_metadata(step / ".metadata")
    assert "it references torch.distributed.checkpoint.metadata.BytesStorageMetadata" in one_line(e)


# ---- 2. one run per folder, unique temp names ---------------------------------------------------------------
def test_folder_lock_names_the_holder_and_is_free_after_a_crash(tmp_path):
    code = ("import sys, time; from titan_aquila.checkpoint.folder import FolderLock; "
            "lock = FolderLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            manager(tmp_path).load()  # a second run in the same dump folder
        assert f"is in use by another run (host {os.uname().nodename}, pid {p.pid})" in one_line(e)
        assert not (tmp_path / "run" / "checkpoint").exists()  # nothing touched
    finally:
        p.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        p.wait()
    m = manager(tmp_path)
    assert m.load() == 0
    m.close()


def test_two_locks_in_one_process_conflict_and_release_frees(tmp_path):
    a = FolderLock(tmp_path / "x")
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path / "x")
    a.release()
    FolderLock(tmp_path / "x").release()


def test_temp_names_are_unique_and_do_not_depend_on_the_seed():
    torch.manual_seed(0)
    a = tmp_token()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    b = tmp_token()
    assert a != b and a.startswith(f"{os.getpid():x}-")
    assert torch.equal(state, torch.get_rng_state())  # training's RNG stream is not consumed


# ---- 3. unwritable output found before step 1; a failed save removes its temp folder ------------------------
def test_dump_folder_that_is_a_file_fails_before_step_1(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(UserError) as e:
        manager(tmp_path).load()
    assert "exists and is not a folder" in one_line(e)


def test_checkpoint_folder_without_room_fails_before_step_1(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserError) as e:
        manager(tmp_path).load()
    assert "no space left for a checkpoint" in one_line(e) and "0.00 GiB free" in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_disk_full_during_save_removes_the_temp_folder_and_says_why(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from torch.distributed.checkpoint.filesystem import FileSystem

    m = manager(tmp_path)
    m.load()
    m.save(2)

    class Full:
        """A file that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = FileSystem.create_stream

    @contextmanager
    def full_disk(self, path, mode):
        with real(self, path, mode) as f:
            yield Full(f) if "w" in mode else f

    monkeypatch.setattr(FileSystem, "create_stream", full_disk)
    with pytest.raises(UserError) as e:
        m.save(4)
    assert "cannot save checkpoint step-4" in one_line(e) and "No space left on device (ENOSPC)" in str(e.value)
    folder = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]  # no half-written temp folder
    m.close()


# ---- 4. unreadable shard: one line naming the file ----------------------------------------------------------
def test_garbage_shard_header_is_one_line_naming_the_file(tmp_path):
    step = saved_run(tmp_path)
    with open(step / "__0_0.distcp", "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 16)
    for attempt in (lambda: manager(tmp_path, "src", verify_checksums=False).load(),
                    lambda: read_model_state_dict(step, verify=False)):
        with pytest.raises(UserError) as e:
            attempt()
        assert "cannot load checkpoint" in one_line(e) and "shard __0_0.distcp is unreadable" in str(e.value)


# ---- 5. silent corruption: checksums recorded while writing, verified on load -------------------------------
def test_checksums_match_the_files_and_catch_a_zeroed_block(tmp_path):
    step = saved_run(tmp_path)
    sums = json.loads((step / "metadata.json").read_text())["checksums"]
    assert set(sums) == {".metadata", "__0_0.distcp"}
    assert all(sums[f] == file_digest(step / f) for f in sums)  # hashed while writing = the bytes on disk
    info = max(load_metadata(step / ".metadata").storage_data.values(), key=lambda i: i.length)
    with open(step / "__0_0.distcp", "r+b") as f:  # zeros inside the largest tensor: sizes and headers stay valid
        f.seek(info.offset + info.length // 2)
        f.write(bytes(256))
    with pytest.raises(UserError) as e:
        manager(tmp_path, "src").load()
    assert "__0_0.distcp does not match the checksum recorded when it was saved" in one_line(e)
    m = manager(tmp_path, "src", verify_checksums=False)  # the documented way out for huge checkpoints
    assert m.load() == 2  # ... which then loads the damaged weights without a word
    m.close()
    assert (read_model_state_dict(step, verify=False)["tok_embeddings.weight"] == 0).sum() >= 64
    assert latest_checkpoint(tmp_path / "src" / "checkpoint") == step


# ---- 6. import-hf checks config.json and every tensor's shape ----------------------------------------------
def _hf_folder(tmp_path: Path, name: str = "hf") -> Path:
    """A Llama folder made by our own exporter from a tiny model (no transformers needed)."""
    from safetensors.torch import save_file

    from titan_aquila.convert.hf_map import hf_config, titan_to_hf

    args = ARGS.replace(ffn_dim=48)
    folder = tmp_path / name
    folder.mkdir()
    hf = titan_to_hf(build_model(args, seed=0).state_dict(), args, "llama")
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(args, "llama")))
    return folder


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 56}, "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32], but config.json "
                                "implies [56, 32]"),
    ({"hidden_size": None}, "config.json lacks 'hidden_size'"),
    ({"num_attention_heads": "4"}, "config.json: 'num_attention_heads' is \"4\", expected an integer >= 1"),
    ({"rms_norm_eps": "1e-6"}, "config.json: 'rms_norm_eps' is \"1e-6\", expected a number > 0"),
    ({"tie_word_embeddings": "false"}, "config.json: 'tie_word_embeddings' is \"false\", expected true or false"),
    ({"truncate": True}, "model.safetensors is not a readable safetensors file"),
], ids=["shape", "missing key", "string int", "string float", "string bool", "truncated"])
def test_import_hf_checks_config_and_shapes(tmp_path, change, message):
    from titan_aquila.convert.hf import import_hf

    src = _hf_folder(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    if change.pop("truncate", False):
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    for k, v in change.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        import_hf(src, tmp_path / "out")
    assert message in one_line(e)
    assert not (tmp_path / "out").exists()


def test_import_hf_of_a_good_folder_still_works(tmp_path):
    from titan_aquila.convert.hf import import_hf

    step = import_hf(_hf_folder(tmp_path), tmp_path / "out")
    assert read_model_state_dict(step)["layers.0.feed_forward.w1.weight"].shape == (48, 32)


# ---- 7. [model.overrides] type- and range-checked (through train.py: tests/integration/test_bad_input.py) ----
def test_overrides_that_used_to_build_another_model_are_refused():
    from titan_aquila.models.args import build_model_args

    for bad, msg in [({"qkv_bias": "no"}, "model.qkv_bias must be true or false"),
                     ({"tie_embeddings": "false"}, "model.tie_embeddings must be true or false"),
                     ({"head_dim": 0}, "model.head_dim must be >= 1, got 0"),
                     ({"n_experts": 4, "moe_layer_step": 5}, "moe_layer_step 5 > n_layers 4")]:
        with pytest.raises(UserError, match=re.escape(msg)):
            build_model_args("debugmodel", bad)
    args = build_model_args("debugmodel", {"norm_eps": 1, "n_kv_heads": None})  # int for float; None where allowed
    assert args.norm_eps == 1.0 and isinstance(args.norm_eps, float) and args.n_kv_heads == args.n_heads


# ---- 8. the tokenizer never crashes on text -----------------------------------------------------------------
def test_tokenizer_replaces_what_the_vocabulary_lacks():
    from titan_aquila.data.tokenizer import Tokenizer

    tok = Tokenizer()
    text = "a\U00040000b\U000bffffc\x04d\U0003ffff\U000c0000"  # the last two are representable
    clean, n = tok.sanitize(text)
    assert (clean, n) == ("a\ufffdb\ufffdcd\U0003ffff\U000c0000", 3)  # U+FFFD: the documented substitute
    assert tok.decode(tok.encode(text)) == clean
    every = "".join(map(chr, range(0x110000))).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    ids = tok.encode(every)  # every code point: no panic
    assert tok.decode(ids) == tok.sanitize(every)[0]


# ---- 9. options that were ignored or misreported ------------------------------------------------------------
def test_final_save_on_an_interval_step_is_still_model_only(tmp_path):
    m = manager(tmp_path, last_save_model_only=True, export_dtype="bfloat16")
    m.cfg.training.steps = 4
    m.load()
    for step in range(1, 5):
        m.maybe_save(step)  # step 4 is both an interval step and the last one
    m.maybe_save(4, force=True)
    m.close()
    meta = json.loads((tmp_path / "run" / "checkpoint" / "step-4" / "metadata.json").read_text())
    assert meta["model_only"] is True and meta["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "run" / "checkpoint" / "step-2" / "metadata.json").read_text())["model_only"] is False


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    from titan_aquila.data.dataset import read_documents

    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    assert read_documents([tmp_path / "a.jsonl"]) == ["hello"]
