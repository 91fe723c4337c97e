"""Bad input and faults through the real entry points (train.py, python -m titan_aquila.convert): one clear line,
the documented exit status, nothing half-written. Companion of tests/unit/test_hardening.py; the README's
bad-input table lists these cases with their messages."""

from __future__ import annotations

import json
import random
import re

import pytest

from _util import run_script, run_train, tiny_config

FILL = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want. "


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# Checked before torch is imported: each answers in well under a second.
OVERRIDES = [
    ("qkv_bias string", {"qkv_bias": "no"}, "model.qkv_bias must be true or false, got 'no' (str)"),
    ("tie_embeddings string", {"tie_embeddings": "false"}, "model.tie_embeddings must be true or false"),
    ("dim string", {"dim": "256"}, "model.dim must be an integer, got '256' (str)"),
    ("n_layers float", {"n_layers": 2.5}, "model.n_layers must be an integer, got 2.5 (float)"),
    ("init_std negative", {"init_std": -1.0}, "model.init_std must be > 0, got -1.0"),
    ("rope_theta zero", {"rope_theta": 0}, "model.rope_theta must be > 0"),
    ("head_dim zero", {"head_dim": 0}, "model.head_dim must be >= 1, got 0"),
    ("moe_layer_step > layers", {"n_experts": 4, "moe_layer_step": 3}, "moe_layer_step 3 > n_layers 2: no layer"),
]


@pytest.mark.parametrize("name,overrides,message", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_model_overrides_are_type_and_range_checked(tmp_path, name, overrides, message):
    run = run_train(tiny_config(tmp_path, overrides=overrides), timeout=60)
    assert run.rc == 2 and message in one_error_line(run.err), run.err
    assert not (tmp_path / "run").exists()


def test_text_the_vocabulary_lacks_warns_once_per_file_and_last_save_is_model_only(tmp_path):
    """U+40000-U+BFFFF text, a binary file and a .jsonl with a byte-order mark train; each file that needed
    replacing gets one warning with its count. training.steps is a multiple of checkpoint.interval, and the final
    save is still model-only in export_dtype. warmup_steps > steps is said, not silently clamped."""
    data = tmp_path / "data"
    data.mkdir()
    lines = "\n".join(json.dumps({"text": FILL * 4}) for _ in range(3))
    (data / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())  # a byte-order mark first
    rare = "".join(chr(0x40000 + 997 * i) for i in range(7))  # 7 characters from U+40000-U+BFFFF
    (data / "b.txt").write_text(FILL * 4 + rare + FILL + "\x04")
    blob = random.Random(0).randbytes(6000)
    (data / "c.txt").write_bytes(blob)
    # Independent count for the binary file: decode as the reader does, count what the vocabulary lacks.
    text = blob.decode("utf-8-sig", errors="replace")
    expect_c = len(re.findall("[\x04\x06\x13\x14\x16\x1d\U00040000-\U000BFFFF]", text))
    cfg = tiny_config(tmp_path, training={"dataset_path": [str(data)], "steps": 2},
                      lr_scheduler={"warmup_steps": 5},
                      checkpoint={"enable": True, "interval": 1, "last_save_model_only": True,
                                  "export_dtype": "bfloat16"})
    run = run_train(cfg, timeout=240)
    assert run.rc == 0, run.err
    warnings = [ln for ln in run.err.splitlines() if ln.startswith("warning: ") and "cannot represent" in ln]
    assert warnings == [f"warning: {data / 'b.txt'}: 8 character(s) the tokenizer cannot represent were dropped "
                        "or replaced by U+FFFD (see data/tokenizer.py)"] + \
        ([f"warning: {data / 'c.txt'}: {expect_c} character(s) the tokenizer cannot represent were dropped or "
          "replaced by U+FFFD (see data/tokenizer.py)"] if expect_c else []), run.err
    assert "warning: lr_scheduler.warmup_steps 5 > training.steps 2: the warmup is clamped to 2 steps" in run.err
    meta = json.loads((tmp_path / "run" / "checkpoint" / "step-2" / "metadata.json").read_text())
    assert meta["model_only"] is True and meta["dtype"] == "bfloat16"


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_during_a_save_abandons_it_and_names_the_last_checkpoint(tmp_path, sig, code):
    cfg = tiny_config(tmp_path, training={"steps": 6}, checkpoint={"enable": True, "interval": 2})
    run = run_train(cfg, timeout=240, env={"TITAN_AQUILA_TEST_KILL_DURING_SAVE": f"4:{sig}"})
    folder = tmp_path / "run" / "checkpoint"
    assert run.rc == code, run.err
    assert one_error_line(run.err) == f"error: interrupted ({sig}); last complete checkpoint: {folder / 'step-2'}"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]  # the step-4 save left nothing behind


def test_full_disk_during_a_save_is_one_line_and_leaves_no_temp_folder(tmp_path):
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse writes past 1 MiB (EFBIG), as a full disk
    refuses them with ENOSPC; the shards of the tiny model are larger."""
    cfg = tiny_config(tmp_path, training={"steps": 2}, checkpoint={"enable": True, "interval": 2})
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); sys.argv = sys.argv[1:]; "
            "runpy.run_path('train.py', run_name='__main__')")
    run = run_script(["-c", code, "train.py", "--job.config_file", str(cfg)], timeout=240)
    folder = tmp_path / "run" / "checkpoint"
    assert run.rc == 2, run.err
    assert one_error_line(run.err) == (f"error: cannot save checkpoint step-2 in {folder}: File too large (EFBIG); "
                                       "the unfinished save was removed")
    assert list(folder.iterdir()) == []
