"""What makes an exported HF folder usable beyond its weights: special-token ids, generation_config.json, the
tokenizer files, and a README.md model card with the growth history (the checkpoint's lineage,
checkpoint/lineage.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from titan_aquila.checkpoint.lineage import HF_TOKENIZER_FILES
from titan_aquila.checkpoint.storage import write_json


def special_ids(tok, lineage: dict) -> dict:
    """bos/eos/pad_token_id for config.json: the source model's (kept through import -> grow -> export), else the
    tokenizer's bos, eos and pad tokens (eos: the document separator when tokenizer_config names none)."""
    if lineage.get("hf_ids"):
        return dict(lineage["hf_ids"])
    eos = tok.token_id(tok.eos_token)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": eos if eos is not None else tok.eos_id,
           "pad_token_id": tok.token_id(tok.pad_token)}
    return {k: v for k, v in ids.items() if v is not None}


def generation_config(lineage: dict, ids: dict) -> dict:
    """The source's generation_config.json, else one from the ids (greedy unless the caller samples)."""
    gen = dict(lineage.get("generation_config") or {})
    for k, v in ids.items():
        gen.setdefault(k, v)
    gen.pop("transformers_version", None)
    return gen


def write_tokenizer(tok, folder: Path, max_len: int, ids: dict) -> None:
    """Copy an HF tokenizer's files; a .tiktoken vocabulary becomes tokenizer.json + tokenizer_config.json."""
    if tok.path.suffix == ".json":
        for name in HF_TOKENIZER_FILES:
            if tok.path.with_name(name).is_file():
                shutil.copyfile(tok.path.with_name(name), folder / name)
        if (folder / "tokenizer_config.json").is_file():
            return
    else:
        from titan_aquila.data.hf_tokenizer import tokenizer_json

        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False))
    by_id = {i: t for t, i in tok.special_tokens.items()}
    names = {k.replace("_token_id", "_token"): by_id.get(ids.get(k)) for k in ("bos_token_id", "eos_token_id",
                                                                              "pad_token_id")}
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, **{k: v for k, v in names.items() if v is not None}})


def _stage_lines(st: dict) -> list[str]:
    kind = st.get("kind")
    if kind == "import":
        return [f"- **Source model**: `{st.get('model_name')}` ({st.get('arch')}, {st.get('parameters', 0):,} "
                f"parameters), imported from `{st.get('source')}`"]
    if kind == "growth":
        src, dst = st.get("parameters", [0, 0])
        opts = ", ".join(f"{k}={v}" for k, v in sorted((st.get("options") or {}).items()))
        return [f"- **Growth**: {st.get('growth')} (methods {st.get('methods')}), {src:,} -> {dst:,} parameters, "
                f"seed {st.get('seed')}, from `{st.get('source')}`", f"  - options: {opts}"]
    if kind == "train":
        steps = st.get("end_step", st.get("start_step", 0)) - st.get("start_step", 0)
        val = st.get("validation_loss")
        return [f"- **Training**: {steps:,} steps ({st.get('start_step', 0)} -> {st.get('end_step', '?')}), "
                f"{st.get('tokens', 0):,} tokens, seed {st.get('seed')}, data "
                f"`{st.get('dataset') or 'assets/text (the fixture)'}`"
                + (f", validation loss {val:.4f} at step {st.get('validation_step')}" if val is not None else
                   ", no validation loss recorded")]
    return [f"- {kind}: {json.dumps(st)}"]


def model_card(step_dir: Path, args, arch: str, dtype: str, tok, lineage: dict) -> str:
    """README.md: architecture, size, tokenizer and every recorded stage (import, growth, training)."""
    stages = lineage.get("stages") or []
    moe = f", {args.n_experts} experts top-{args.top_k}" if args.is_moe else ""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
             f"# {step_dir.parent.name}/{step_dir.name}", "",
             f"{arch} model ({args.num_params():,} parameters, {args.num_params(active=True):,} active; "
             f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} heads{moe}), exported by titan_aquila from "
             f"`{step_dir}` in {dtype}. " + (f"Tokenizer: `{tok.path.name}` (fingerprint {tok.fingerprint}, "
             f"{tok.vocab_size:,} ids)." if tok is not None else "No tokenizer."), "", "## Provenance", ""]
    lines += [ln for st in stages for ln in _stage_lines(st)] or ["- no history recorded in the checkpoint"]
    return "\n".join(lines) + "\n"
