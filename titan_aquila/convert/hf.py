"""HF safetensors <-> DCP checkpoints: `import_hf` (Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE folders) and
`export_hf` (a folder transformers loads with `AutoModelForCausalLM.from_pretrained`). Key and config maps are in
`convert/hf_map.py`; the command line is `python -m titan_aquila.convert`. Both stream: shapes come from the
safetensors headers / DCP metadata, then one tensor at a time is read, converted and written (peak: one tensor)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from titan_aquila.checkpoint.storage import (check_integrity, check_output_folder, model_tensor_specs,
                                             read_checkpoint_args, read_json, read_model_state_dict,
                                             resolve_checkpoint_dir, write_json, write_model_checkpoint)
from titan_aquila.checkpoint.deferred import Deferred
from titan_aquila.checkpoint.lineage import (check_vocab_fits, checkpoint_tokenizer, read_lineage, resolve_tokenizer,
                                             source_hf_info, tokenizer_files)
from titan_aquila.convert.card import generation_config, model_card, special_ids, write_tokenizer
from titan_aquila.convert.hf_map import (args_from_hf_config, check_expert_bias, export_arch, hf_config,
                                         hf_to_titan_lazy, key_map, titan_to_hf_groups)
from titan_aquila.convert.progress import Progress
from titan_aquila.convert.safetensors_stream import SafetensorsReader, write_safetensors
from titan_aquila.errors import UserError
from titan_aquila.logging import logger
from titan_aquila.models.args import ModelArgs

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    return None if name in (None, "auto") else getattr(torch, name)


# ---- HF -> DCP --------------------------------------------------------------------------------------------
def _safetensors_index(src: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the *.safetensors files of the folder."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index, "safetensors index")["weight_map"]
        files = {f: src / f for f in set(wm.values())}
        for f, p in files.items():
            if not p.is_file():
                raise UserError(f"{index.name} names {f}, which is missing")
        return {k: files[f] for k, f in wm.items()}
    found = sorted(src.glob("*.safetensors"))
    if not found:
        raise UserError(f"{src} has no *.safetensors files")
    out = {}
    for p in found:
        with open_safetensors(p) as f:
            out.update({k: p for k in f.keys()})
    return out


def open_safetensors(p: Path):
    """safe_open, with a truncated or foreign file as one UserError line naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(p), framework="pt")
    except Exception as e:  # SafetensorError: header too large / incomplete / invalid JSON
        raise UserError(f"{p} is not a readable safetensors file ({str(e).strip().splitlines()[0][:200]})") from None


def check_shapes(sd: dict[str, torch.Tensor], args: ModelArgs, arch: str) -> None:
    """Every tensor must have the shape config.json implies (a model built on the meta device); UserError naming
    the HF tensor otherwise (e.g. intermediate_size 400 with 352-wide MLP weights)."""
    from titan_aquila.models.aquila import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(args, device="meta").state_dict().items()}
    hf_name = {ours: theirs if isinstance(theirs, str) else theirs[0].replace("experts.0.", "experts.*.", 1)
               for ours, theirs in key_map(args, arch)}
    for k, t in sd.items():
        if k in expected and tuple(t.shape) != expected[k]:
            name, got, want = hf_name.get(k, k), list(t.shape), list(expected[k])
            if "*" in name:  # stacked experts: compare one expert's shape
                got, want = got[1:], want[1:]
            raise UserError(f"tensor {name} has shape {got}, but config.json implies {want}")


def import_hf(src: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """HF Llama / Qwen2 / Mistral (/ Mixtral / Qwen2-MoE) folder -> DCP checkpoint OUT/step-0."""
    src = Path(src)
    check_output_folder(Path(out), overwrite)
    if not src.is_dir():
        raise UserError(f"HF model folder does not exist: {src}")
    cfg = read_json(src / "config.json", f"{src} is not an HF model folder (config.json)")
    arch, args = args_from_hf_config(cfg)
    tok, files = _source_tokenizer(src, args)
    where = _safetensors_index(src)
    reader = SafetensorsReader()
    shards = sorted(set(where.values()))
    progress = Progress(f"import-hf {src.name}", len(where))

    def get(name: str) -> torch.Tensor:  # reads the tensor's bytes
        t = reader.read(where[name], name)
        progress.step(note=f"shard {shards.index(where[name]) + 1}/{len(shards)}")
        return t.to(_dtype(dtype)) if _dtype(dtype) else t

    def get_meta(name: str) -> torch.Tensor:  # the header's shape and dtype only
        t = reader.meta(where[name], name)
        return t.to(_dtype(dtype)) if _dtype(dtype) else t

    # Streaming: DCP plans the checkpoint from the headers, then each of our tensors is read (and its experts
    # stacked) only when its bytes are written, so the peak is one tensor, not the model.
    shapes = hf_to_titan_lazy(get_meta, set(where), args, arch)
    check_shapes({k: f() for k, f in shapes.items()}, args, arch)  # before any byte is written
    makers = hf_to_titan_lazy(get, set(where), args, arch)
    sd = {k: Deferred(f().to("meta"), makers[k]) for k, f in shapes.items()}
    source = f"hf:{arch}:{src.resolve()}"
    lineage = {**source_hf_info(src), "tokenizer": tok.fingerprint if tok else None,
               "stages": [{"kind": "import", "source": source, "model_name": cfg.get("_name_or_path") or src.name,
                           "arch": arch, "parameters": args.num_params()}]}
    path = write_model_checkpoint(Path(out), sd, args, {"source": source, "lineage": lineage}, overwrite, files)
    logger.info(f"imported {arch} ({args.num_params():,} parameters{', tokenizer ' + tok.path.name if tok else ''}) in "
        f"{progress.elapsed():.1f}s -> {path}")
    return path


def _source_tokenizer(src: Path, args):
    """(Tokenizer, files to copy into the checkpoint) of an HF folder's tokenizer.json, or (None, {}) with a note
    when it has none or one we cannot tokenize with (the weights still import; a run then needs
    model.tokenizer_path). A tokenizer whose ids do not fit the model's vocabulary is an error."""
    from titan_aquila.data.tokenizer import Tokenizer

    if not (src / "tokenizer.json").is_file():
        logger.info(f"note: {src} has no tokenizer.json; training on this checkpoint needs model.tokenizer_path")
        return None, {}
    try:
        tok = Tokenizer(src / "tokenizer.json")
    except UserError as e:
        logger.info(f"note: tokenizer not copied ({e}); training on this checkpoint needs model.tokenizer_path")
        return None, {}
    check_vocab_fits(tok, args.vocab_size, f"{src / 'config.json'}")
    return tok, tokenizer_files(tok)


# ---- DCP -> HF --------------------------------------------------------------------------------------------
def _prepare_out(out: Path, overwrite: bool, check_only: bool = False) -> Path | None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    holds_model = out.is_dir() and (any(out.glob("*.safetensors")) or (out / "config.json").exists())
    if holds_model and not overwrite:
        raise UserError(f"output folder {out} already holds a model; pass --overwrite to replace it")
    if check_only:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid():x}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(out.name + ".old-" + f"{os.getpid():x}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_hf(ckpt: str | Path, out: str | Path, arch: str | None = None, dtype: str = "bfloat16",
              overwrite: bool = False, drop_expert_bias: bool = False, max_shard_bytes: int = 4 << 30,
              tokenizer: str | None = None) -> Path:
    """Any checkpoint (step-N folder or a folder of them) -> HF folder: config.json (with bos/eos/pad ids),
    generation_config.json, safetensors, the tokenizer files (the checkpoint's, or `tokenizer`) and README.md."""
    step_dir = resolve_checkpoint_dir(ckpt)
    args = read_checkpoint_args(step_dir)
    arch = export_arch(args, arch)
    out = Path(out)
    _prepare_out(out, overwrite, check_only=True)
    lineage = read_lineage(step_dir)
    try:
        tok = resolve_tokenizer(tokenizer, step_dir, "--tokenizer")
    except UserError as e:
        if tokenizer:
            raise
        logger.info(f"note: {e}; no tokenizer files written")
        tok = None
    if tok is not None and (tokenizer or checkpoint_tokenizer(step_dir)):
        check_vocab_fits(tok, args.vocab_size, f"checkpoint {step_dir}")
    elif tok is not None and tok.vocab_size > args.vocab_size:  # no tokenizer of its own (e.g. a toy model)
        logger.info(f"note: {step_dir} names no tokenizer and the shipped one does not fit its vocab_size "
            f"{args.vocab_size}: no tokenizer files written (pass --tokenizer)")
        tok = None
    ids = special_ids(tok, lineage) if tok is not None else dict(lineage.get("hf_ids") or {})
    # Streaming: every HF name, shape and dtype comes from the DCP metadata; then one of our tensors at a time is
    # read, split (experts) and appended to its safetensors file, so the peak is one tensor, not the model.
    check_integrity(step_dir)
    ours = model_tensor_specs(step_dir)
    to = _dtype(dtype)

    def read(name: str) -> torch.Tensor:
        t = read_model_state_dict(step_dir, keys=[name], check=False)[name]
        return t.to(to) if to else t

    check_expert_bias(lambda k: read(k) if k in ours else None, args, drop_expert_bias)
    groups = titan_to_hf_groups(set(ours), args, arch, to or torch.float32)
    specs = [item for name, f in groups for item in f(ours[name].to(to) if name and to else ours.get(name))]
    progress = Progress(f"export-hf {out.name}", len(specs))

    def tensors():
        for name, f in groups:
            for item in f(read(name) if name else None):
                progress.step()
                yield item

    tmp = _prepare_out(out, overwrite)
    try:
        files = write_safetensors(specs, tensors(), tmp, max_shard_bytes)
        write_json(tmp / "config.json", {**hf_config(args, arch, dtype), **ids})
        write_json(tmp / "generation_config.json", generation_config(lineage, ids))
        if tok is not None:
            write_tokenizer(tok, tmp, args.max_seq_len, ids)
        (tmp / "README.md").write_text(model_card(step_dir, args, arch, dtype, tok, lineage))
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"exported {step_dir} as {arch} ({len(files)} safetensors file(s), {dtype}, tokenizer "
        f"{tok.path.name if tok else 'none'}) "
        f"-> {out}")
    return out
