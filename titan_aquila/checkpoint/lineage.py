"""What a checkpoint carries besides weights so that an export is complete: its tokenizer and its history.

    step-N/tokenizer/            the tokenizer files the model was trained with (tokenizer.json, tokenizer_config.json,
                                 special_tokens_map.json, chat_template.jinja as the source had them; or a .tiktoken)
    step-N/metadata.json         "lineage": {"tokenizer": fingerprint, "hf_ids": {bos/eos/pad_token_id from the source
                                 config.json}, "generation_config": the source's, "stages": [import, growth, train ...]}

`import-hf` writes both from the source folder; growth (offline or at load) and training copy them forward and
append a stage, so `export-hf` of any later checkpoint writes the source's tokenizer, ids and the growth history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from titan_aquila.checkpoint.storage import METADATA, latest_checkpoint, read_json, resolve_checkpoint_dir
from titan_aquila.errors import UserError

TOKENIZER_DIR = "tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "vocab.json", "merges.txt")


def tokenizer_files(tok) -> dict[str, Path]:
    """{name inside the checkpoint: source file} for a loaded Tokenizer (its file and the HF files beside it)."""
    if tok.path.suffix != ".json":
        return {f"{TOKENIZER_DIR}/{tok.path.name}": tok.path}
    return {f"{TOKENIZER_DIR}/{n}": tok.path.with_name(n) for n in HF_TOKENIZER_FILES
            if tok.path.with_name(n).is_file()}


def read_lineage(step_dir: Path | None) -> dict:
    """The "lineage" of a checkpoint's metadata.json ({} when it has none)."""
    if step_dir is None or not (step_dir / METADATA).is_file():
        return {}
    return dict(read_json(step_dir / METADATA, f"checkpoint {step_dir} metadata").get("lineage") or {})


def checkpoint_tokenizer(step_dir: Path | None) -> Path | None:
    """The tokenizer folder a checkpoint carries, or None."""
    return step_dir / TOKENIZER_DIR if step_dir is not None and (step_dir / TOKENIZER_DIR).is_dir() else None


def start_checkpoint(cfg) -> Path | None:
    """The checkpoint a training run starts from, in CheckpointManager.load's order: the run's latest > initial
    load > growth source (None for a fresh model)."""
    ck, g = cfg.checkpoint, cfg.growth
    latest = latest_checkpoint(Path(cfg.job.dump_folder) / ck.folder) if ck.enable else None
    if latest is not None:
        return latest
    if ck.initial_load_path:
        return resolve_checkpoint_dir(ck.initial_load_path, "checkpoint.initial_load_path")
    if g.enable and g.source_path:
        return resolve_checkpoint_dir(g.source_path, "growth.source_path")
    return None


def resolve_tokenizer(given: str | None, step_dir: Path | None, what: str = "model.tokenizer_path"):
    """The Tokenizer a run on `step_dir` uses: `given` if set, else the checkpoint's, else (a checkpoint with no
    recorded history: fresh, GGUF import, older runs) the shipped SmolLM2 vocabulary. UserError when `given` and the
    checkpoint's differ (by fingerprint: what decides the ids), or when an imported checkpoint has none."""
    from titan_aquila.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

    own = checkpoint_tokenizer(step_dir)
    if not given and own is None and read_lineage(step_dir).get("stages"):
        # imported from a folder without a tokenizer we can use: the shipped SmolLM2 ids would be wrong for it
        raise UserError(f"checkpoint {step_dir} carries no tokenizer (its source had no byte-level BPE "
                        f"tokenizer.json); set {what} to the model's tokenizer")
    tok = Tokenizer(given) if given else Tokenizer(own if own is not None else DEFAULT_TOKENIZER)
    if given and own is not None:
        theirs = Tokenizer(own)
        if theirs.fingerprint != tok.fingerprint:
            raise UserError(f"{what} {given} is a different tokenizer (fingerprint {tok.fingerprint}) from the one "
                            f"checkpoint {step_dir} was made with ({theirs.path}, fingerprint {theirs.fingerprint}); "
                            f"leave {what} empty to use the checkpoint's")
    return tok


def check_vocab_fits(tok, vocab_size: int, where: str) -> None:
    """Every id the tokenizer emits must index the model's embedding."""
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer {tok.path} has ids up to {tok.vocab_size - 1} but {where} has vocab_size "
                        f"{vocab_size}: the ids do not fit the model's embedding (use the model's own tokenizer)")


def carry_forward(src_dir: Path | None, tok, *stages: dict) -> tuple[dict, dict[str, Path]]:
    """(lineage for a checkpoint made from `src_dir` by `stages`, tokenizer files to copy into it). A resumed
    run's stage replaces the one its own earlier checkpoint recorded (same kind and run folder)."""
    lineage = read_lineage(src_dir)
    old = list(lineage.get("stages", []))
    for st in stages:
        if old and st.get("run") and old[-1].get("kind") == st["kind"] and old[-1].get("run") == st["run"]:
            prev = old.pop()  # in place: the caller keeps updating `st` (steps, validation loss)
            st["start_step"] = prev.get("start_step", st.get("start_step"))
            for k, v in prev.items():
                st.setdefault(k, v)
        old.append(st)
    lineage["stages"] = old
    lineage["tokenizer"] = tok.fingerprint if tok is not None else None
    return lineage, (tokenizer_files(tok) if tok is not None else {})


def copy_files(files: dict[str, Path], dst: Path) -> None:
    """Copy {relative name: source} into `dst` (called on a checkpoint's tmp folder, before its commit)."""
    for name, src in files.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / name)


def source_hf_info(src: Path) -> dict:
    """bos/eos/pad ids of an HF folder's config.json and its generation_config.json, for the lineage."""
    cfg = json.loads((src / "config.json").read_text())
    out = {"hf_ids": {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}}
    gen = src / "generation_config.json"
    if gen.is_file():
        out["generation_config"] = read_json(gen, f"{src} generation_config.json")
    return out
