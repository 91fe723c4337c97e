"""train.py on prepared data: a two-source mixture SIGKILLed mid-run resumes bit-exactly (losses, token counts per
source), its shares equal the weights, each source has its own validation loss in TensorBoard; a prepared set
made with another tokenizer and bad `prepare` inputs are one `error:` line."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _util import ROOT, losses, read_tensorboard, run_script, run_train, tensorboard_runs, tiny_config

from titan_aquila.data.prepare import prepare
from titan_aquila.data.tokenizer import DEFAULT_TOKENIZER

TOKENS_LINE = re.compile(r"^step\s+(\d+)\s+tokens by source: en ([\d,]+) \(([\d.]+)%\)\s+zh ([\d,]+)", re.M)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The shipped fixture as two prepared sources (English, Chinese), each with a prepared validation set."""
    d = tmp_path_factory.mktemp("prepared")
    text = ROOT / "assets" / "text"
    for split in ("train", "val"):
        prepare(sorted((text / split).glob("austen*")), d / f"en_{split}", DEFAULT_TOKENIZER, workers=1,
                stream=io.StringIO())
        prepare(sorted((text / split).glob("tang*")), d / f"zh_{split}", DEFAULT_TOKENIZER, workers=1,
                stream=io.StringIO())
    return d


def _mixture_config(tmp: Path, prepared: Path, name: str) -> Path:
    datasets = {s: {"path": str(prepared / f"{s}_train"), "weight": w, "validation_path": str(prepared / f"{s}_val")}
                for s, w in (("en", 0.7), ("zh", 0.3))}
    # 8 sequences per step: after every 2nd step a whole number of 16-sequence schedule blocks
    return tiny_config(tmp, name, training={"datasets": datasets, "local_batch_size": 8, "seq_len": 16,
                                            "steps": 12},
                       validation={"enable": True, "freq": 6, "steps": 2},
                       checkpoint={"enable": True, "interval": 2, "keep_latest_k": 0},
                       metrics={"log_freq": 1, "enable_tensorboard": True})


def _popen_train(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--job.config_file", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_mixture_resumes_bit_exactly_after_sigkill(tmp_path, prepared):
    ref = run_train(_mixture_config(tmp_path, prepared, "ref"))
    assert ref.rc == 0, ref.err[-3000:]
    ref_tokens = {int(s): (en, zh) for s, en, _, zh in TOKENS_LINE.findall(ref.out)}
    assert sorted(ref_tokens) == list(range(1, 13))
    en, zh = (int(x.replace(",", "")) for x in ref_tokens[12])
    assert en + zh == 12 * 8 * 16 and abs(en / (en + zh) - 0.7) <= 0.01  # 96 sequences = 6 blocks: exact +- 1

    config = _mixture_config(tmp_path, prepared, "run")
    ck = tmp_path / "run" / "checkpoint"
    p = _popen_train(config)  # SIGKILL as soon as step 6 is committed; training goes on meanwhile
    deadline = time.time() + 600
    while not (ck / "step-6").is_dir() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    run = run_train(config)
    assert run.rc == 0, run.err[-3000:]
    assert "step     7  loss" in run.out and "step     1  loss" not in run.out  # resumed, did not restart
    got = losses(run.out)
    assert got and all(got[s] == losses(ref.out)[s] for s in got)  # bit-identical (printed) losses
    assert {int(s): (a, b) for s, a, _, b in TOKENS_LINE.findall(run.out)} == \
        {s: v for s, v in ref_tokens.items() if s > 6}  # token counts continue, not restart

    (tb_run,) = tensorboard_runs(tmp_path / "ref" / "tb")
    ea = read_tensorboard(tb_run)
    tags = set(ea.Tags()["scalars"])
    assert {"validation_metrics/en/loss", "validation_metrics/zh/loss", "validation_metrics/loss", "data/tokens/en",
            "data/share/zh"} <= tags
    val = {k: ea.Scalars(f"validation_metrics/{k}/loss")[-1].value for k in ("en", "zh")}
    mean = ea.Scalars("validation_metrics/loss")[-1].value
    assert mean == pytest.approx(0.7 * val["en"] + 0.3 * val["zh"], rel=1e-6) and val["en"] != val["zh"]


def test_prepared_set_of_another_tokenizer_is_refused(tmp_path, prepared):
    lines = DEFAULT_TOKENIZER.read_text().splitlines()
    (a_tok, a_rank), (b_tok, b_rank) = lines[100].split(), lines[200].split()
    lines[100], lines[200] = f"{a_tok} {b_rank}", f"{b_tok} {a_rank}"
    (tmp_path / "other.tiktoken").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tmp_path, training={"dataset_path": [str(prepared / "en_train")]},
                      model={"tokenizer_path": str(tmp_path / "other.tiktoken")})
    run = run_train(cfg)
    assert run.rc == 2 and len(run.errors) == 1 and "Traceback" not in run.err, run.err[-2000:]
    assert "was tokenized with another tokenizer" in run.errors[0] and "prepare it again" in run.errors[0]


def test_prepare_command_line(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.jsonl").write_text('{"text": "  "}\n')
    bad = run_script(["-m", "titan_aquila.data", "prepare", str(tmp_path / "blank"), "--out", str(tmp_path / "o")])
    assert bad.rc == 2 and bad.err.strip().splitlines() == [
        "error: no text in 1 input file(s): every document is blank"], bad.err
    assert not (tmp_path / "o").exists()
    good = run_script(["-m", "titan_aquila.data", "prepare", str(ROOT / "assets" / "text" / "val"), "--out",
                       str(tmp_path / "o"), "--workers", "2", "--unit-mb", "0.01"])
    assert good.rc == 0, good.err
    assert re.search(r"prepared 2 documents, [\d,]+ tokens \(uint16, 2 shards\)", good.out), good.out
    assert "prepare: 0.0/0.0 MB (100%)" in good.err or "(100%)" in good.err, good.err
