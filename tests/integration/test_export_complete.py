"""Complete exports: import-hf copies the tokenizer and special ids, export-hf writes them back with
generation_config.json and a model card, and the folder works with transformers' AutoTokenizer and
pipeline("text-generation"); a .tiktoken vocabulary is exported as an equivalent tokenizer.json."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from titan_aquila.checkpoint.lineage import resolve_tokenizer
from titan_aquila.checkpoint.storage import write_model_checkpoint
from titan_aquila.convert.hf import export_hf, import_hf
from titan_aquila.data.tokenizer import Tokenizer
from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs
from titan_aquila.models.aquila import build_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
FIXTURE = sorted((ROOT / "assets" / "text").rglob("*.txt"))
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")


def _lines() -> list[str]:
    return [ln for f in FIXTURE for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()][::7]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny HF Llama (vocab 600) with a Llama-3-style byte-level BPE trained on the fixture, bos 1, eos 2."""
    from tokenizers import Regex, Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = tmp_path_factory.mktemp("src")
    hf = HF(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train([str(f) for f in FIXTURE], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    cfg = LlamaConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], do_sample=False).save_pretrained(str(src))
    return src


def test_import_export_keeps_tokenizer_ids_and_works_in_a_pipeline(hf_source, tmp_path):
    from transformers import AutoTokenizer, pipeline

    ck = import_hf(hf_source, tmp_path / "ck")
    assert (ck / "tokenizer" / "tokenizer.json").read_bytes() == (hf_source / "tokenizer.json").read_bytes()
    tok = resolve_tokenizer("", ck)  # a run on the checkpoint uses its tokenizer unless told otherwise
    assert tok.path == ck / "tokenizer" / "tokenizer.json" and tok.eos_id == 0 and tok.bos_id == 1
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["dtype"]) == (1, 2, "bfloat16")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    card = (out / "README.md").read_text()
    assert "**Source model**" in card and "llama" in card and tok.fingerprint in card
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for line in _lines():
        assert hf_tok(line, add_special_tokens=False)["input_ids"] == tok.encode(line)
    gen = pipeline("text-generation", model=str(out), tokenizer=str(out))
    text = gen("It is a truth universally", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("It is a truth universally") and len(text) > len("It is a truth universally")


def test_tiktoken_vocabulary_is_exported_as_an_equal_tokenizer_json(tmp_path):
    from transformers import AutoTokenizer

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=49152, max_seq_len=64,
                     tie_embeddings=True).validate()
    sd = {k: v.detach().clone() for k, v in build_model(args, seed=1).state_dict().items()}
    write_model_checkpoint(tmp_path / "ck", sd, args, {})  # no tokenizer recorded: the shipped SmolLM2 one
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    ours, theirs = Tokenizer(), AutoTokenizer.from_pretrained(str(out))
    assert Tokenizer(out).fingerprint == ours.fingerprint
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)  # the Instruct GGUF's
    for line in _lines() + ["In 1813, 23 people  \n\n x 🎉 naïve"]:
        assert theirs(line, add_special_tokens=False)["input_ids"] == ours.encode(line)


def test_tokenizer_mismatches_are_clear_errors(hf_source, tmp_path, capsys):
    import_hf(hf_source, tmp_path / "ck")
    with pytest.raises(UserError, match="different tokenizer .* leave --tokenizer empty"):
        export_hf(tmp_path / "ck", tmp_path / "hf", tokenizer=str(ROOT / "assets/tokenizer/smollm2.tiktoken"))
    assert not (tmp_path / "hf").exists()
    bad = tmp_path / "src"  # a source whose tokenizer has ids beyond the model's vocabulary
    shutil.copytree(hf_source, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 500}))
    with pytest.raises(UserError, match="ids up to 599 but .* vocab_size 500"):
        import_hf(bad, tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "tokenizer.json").unlink()  # no usable tokenizer: imported, but no run silently uses SmolLM2's ids
    capsys.readouterr()
    ck3 = import_hf(bad, tmp_path / "ck3")
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    assert "has no tokenizer.json" in notes[0] and not (ck3 / "tokenizer").exists()
    with pytest.raises(UserError, match="carries no tokenizer .* set model.tokenizer_path"):
        resolve_tokenizer("", ck3)
    assert resolve_tokenizer(str(hf_source), ck3).vocab_size == 600  # told which one: fine


def _train_config(tmp: Path, ck: Path, grow: bool = False, **sections) -> Path:
    """Train 2 steps on the imported checkpoint `ck` (step-0), or on it grown by one zero-initialised layer."""
    from _util import tiny_config

    saved = json.loads((ck / "model_args.json").read_text())
    from titan_aquila.models.args import RUNTIME_FIELDS

    overrides = {k: v for k, v in saved.items() if k not in RUNTIME_FIELDS and v is not None}
    start = {"checkpoint": {"enable": True, "interval": 2, "initial_load_path": str(ck),
                            "initial_load_model_only": True}}
    if grow:
        overrides["n_layers"] += 1
        start = {"checkpoint": {"enable": True, "interval": 2},
                 "growth": {"enable": True, "source_path": str(ck), "methods": ["zero"], "seed": 5, "audit": False}}
    return tiny_config(tmp, overrides=overrides, training={"steps": 2, "seq_len": 32, "local_batch_size": 2},
                       validation={"enable": True, "freq": 2, "steps": 1}, **start, **sections)


def _one_line_error(run, needle: str) -> None:
    lines = [ln for ln in run.err.strip().splitlines() if ln.strip()]
    assert run.rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.err
    assert "step 1" not in run.out  # refused before training


def test_training_on_an_imported_checkpoint_uses_and_records_its_tokenizer(hf_source, tmp_path):
    from _util import run_train

    ck = import_hf(hf_source, tmp_path / "ck")
    cfg = _train_config(tmp_path, ck)
    run = run_train(cfg, timeout=300)
    assert run.rc == 0, run.err
    step = tmp_path / "run" / "checkpoint" / "step-2"
    assert (step / "tokenizer" / "tokenizer.json").read_bytes() == (hf_source / "tokenizer.json").read_bytes()
    lineage = json.loads((step / "metadata.json").read_text())["lineage"]
    assert [s["kind"] for s in lineage["stages"]] == ["import", "train"]
    train = lineage["stages"][1]
    assert (train["end_step"], train["tokens"]) == (2, 2 * 2 * 32)
    assert train["validation_loss"] == pytest.approx(run.val_losses[2], abs=1e-4)
    out = export_hf(tmp_path / "run" / "checkpoint", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1  # the source's, kept
    assert "**Training**: 2 steps" in (out / "README.md").read_text()
    # the shipped SmolLM2 tokenizer is not the checkpoint's: refused before training
    _one_line_error(run_train(_train_config(tmp_path, ck, name="run2"), "--model.tokenizer_path",
                              "assets/tokenizer/smollm2.tiktoken", timeout=300), "is a different tokenizer")


def test_growth_at_load_is_recorded_and_exported(hf_source, tmp_path):
    from _util import run_train

    ck = import_hf(hf_source, tmp_path / "ck")
    run = run_train(_train_config(tmp_path, ck, grow=True), timeout=300)
    assert run.rc == 0, run.err
    step = tmp_path / "run" / "checkpoint" / "step-2"
    stages = json.loads((step / "metadata.json").read_text())["lineage"]["stages"]
    assert [s["kind"] for s in stages] == ["import", "growth", "train"]
    assert (stages[1]["methods"], stages[1]["seed"], stages[1]["source"]) == (["zero"], 5, str(ck.resolve()))
    assert (step / "tokenizer" / "tokenizer.json").is_file()
    card = (export_hf(step, tmp_path / "hf") / "README.md").read_text()
    assert "**Growth**: zero" in card and "seed 5" in card


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path):
    from _util import run_train, tiny_config

    run = run_train(tiny_config(tmp_path, overrides={"vocab_size": 640}), timeout=300)
    _one_line_error(run, "ids up to 49151 but the model has vocab_size 640")


def test_a_resumed_run_keeps_one_training_stage(tmp_path):
    from titan_aquila.checkpoint.lineage import carry_forward

    tok = Tokenizer()
    step = tmp_path / "run" / "checkpoint" / "step-4"
    step.mkdir(parents=True)
    first = {"kind": "train", "run": "/r", "start_step": 0, "tokens_per_step": 8, "validation_loss": 3.0}
    lineage, _ = carry_forward(None, tok, {"kind": "import", "source": "s"}, first)
    (step / "metadata.json").write_text(json.dumps({"lineage": lineage}))
    again = {"kind": "train", "run": "/r", "start_step": 4, "tokens_per_step": 8}
    lineage, files = carry_forward(step, tok, again)
    assert [s["kind"] for s in lineage["stages"]] == ["import", "train"]
    assert lineage["stages"][-1] is again and again["start_step"] == 0 and again["validation_loss"] == 3.0
    assert list(files) == ["tokenizer/smollm2.tiktoken"] and lineage["tokenizer"] == tok.fingerprint
