"""Checkpoint folders on disk: layout, atomic commit, integrity checks, JSON side files, tensor-only state.

A checkpoint is one folder written by torch.distributed.checkpoint (DCP) plus three JSON files beside it:

    <dump_folder>/<checkpoint.folder>/step-N/
        .metadata  __0_0.distcp  __1_0.distcp ...   DCP (sharded; readable at any world size)
        model_args.json                              ModelArgs.to_dict()  -> `read_checkpoint_args`
        job_config.json                              JobConfig.to_dict() of the run that wrote it
        metadata.json                                step, world size, dp layout, torch version, model_only,
                                                     checksums {file: "sha256:..."} of the DCP files

Atomicity: every rank writes into `step-N.tmp-<token>` (token: pid + random bits, unique per process); only when
all shards and the JSON files are on disk (fsynced) does rank 0 rename it to `step-N`. A folder is a checkpoint iff
its name is exactly `step-N`, so a save killed half-way is never picked as "latest"; stale `*.tmp-*` folders are
deleted on the next start, which holds the folder's lock (checkpoint/folder.py), so no other run's save is in flight.
Reading goes through checkpoint/dcp_io.py: `.metadata` is unpickled without executing anything, and every file is
checked against its recorded checksum.

Everything stored through DCP is a tensor: non-tensor state (scheduler, dataloader position, optimizer
param_groups) is JSON inside a uint8 tensor (`to_blob`/`from_blob`). DCP would otherwise pickle such objects and
unpickle them on load with `torch.load(weights_only=False)`; with blobs a checkpoint never carries pickled objects.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch

from torch.distributed.checkpoint.api import CheckpointException

from titan_aquila.checkpoint.dcp_io import (DCP_METADATA, ChecksumWriter, SafeReader, load_error_line, load_metadata,
                                            verify_checksums)
from titan_aquila.errors import UserError
from titan_aquila.models.args import RUNTIME_FIELDS, ModelArgs

STEP_RE = re.compile(r"^step-(\d+)$")
TMP_RE = re.compile(r"^step-(\d+)\.tmp-")
MODEL_ARGS, JOB_CONFIG, METADATA = "model_args.json", "job_config.json", "metadata.json"


# ---- layout ------------------------------------------------------------------------------------------------
def step_dirs(folder: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints `step-N` in `folder`, oldest first (tmp folders never match)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(out)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = step_dirs(folder)
    return found[-1][1] if found else None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / DCP_METADATA).is_file() or (path / MODEL_ARGS).is_file()


def resolve_checkpoint_dir(path: str | Path, what: str = "checkpoint") -> Path:
    """A `step-N` folder as given, or the latest `step-N` inside a checkpoint folder. UserError otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} path does not exist: {p}")
    if p.is_dir() and is_checkpoint_dir(p):
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise UserError(f"{what} path {p} holds no checkpoint (expected a step-N folder with {DCP_METADATA}, "
                        f"or a folder of step-N folders)")
    return latest


def check_integrity(step_dir: Path, verify: bool = True) -> None:
    """UserError when the DCP files are missing, truncated or corrupt: the `.metadata` (read without executing
    anything, see dcp_io.py), a shard it names, a shard shorter than the bytes the metadata says it holds, or (with
    `verify`) a file whose checksum differs from the one metadata.json recorded when it was written."""
    if not (step_dir / DCP_METADATA).is_file():
        raise UserError(f"checkpoint {step_dir} is incomplete or corrupt: {DCP_METADATA} is missing")
    md = load_metadata(step_dir / DCP_METADATA)
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = step_dir / name
        if not f.is_file():
            raise UserError(f"checkpoint {step_dir} is incomplete or corrupt: shard {name} is missing")
        if f.stat().st_size < size:
            raise UserError(f"checkpoint {step_dir} is corrupt: shard {name} is truncated "
                            f"({f.stat().st_size} < {size} bytes)")
    if verify and (step_dir / METADATA).is_file():
        sums = read_json(step_dir / METADATA, f"checkpoint {step_dir} metadata").get("checksums")
        if sums:  # absent in checkpoints written before checksums were recorded
            verify_checksums(step_dir, sums)


def dcp_keys(step_dir: Path) -> dict:
    """Flattened DCP key -> storage metadata (has `.size` and `.properties.dtype` for tensors)."""
    return load_metadata(step_dir / DCP_METADATA).state_dict_metadata


def dcp_load(state: dict, step_dir: Path, **kw) -> None:
    """`dcp.load` through SafeReader; any failure (DCP raises CheckpointException, a BaseException) becomes one
    UserError line naming the checkpoint and, where known, the shard."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=SafeReader(str(step_dir)), **kw)
    except (Exception, CheckpointException) as e:
        raise UserError(f"cannot load checkpoint {step_dir}: {load_error_line(e)}") from None


# ---- JSON side files ---------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """Write and fsync, so a later rename of the folder commits complete files."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_checkpoint_args(path: str | Path) -> ModelArgs:
    """The ModelArgs a checkpoint was saved with, from its model_args.json (no torch.load). `path` is a step-N
    folder or a folder of them (the latest is read)."""
    step_dir = resolve_checkpoint_dir(path)
    d = read_json(step_dir / MODEL_ARGS, f"checkpoint {step_dir} has no model arguments")
    try:
        return ModelArgs.from_dict(d)
    except (TypeError, UserError) as e:
        raise UserError(f"{step_dir / MODEL_ARGS}: {e}") from None


def args_diff(a: ModelArgs, b: ModelArgs, ignore=RUNTIME_FIELDS) -> list[tuple[str, object, object]]:
    da, db = a.to_dict(), b.to_dict()
    return [(k, da[k], db.get(k)) for k in da if k not in ignore and da[k] != db.get(k)]


# ---- atomic commit -----------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def commit(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final` in one rename (an existing `final` is first moved aside, then deleted)."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + ".tmp-replaced")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_stale_tmp(folder: Path, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete leftovers of killed saves (`step-N.tmp-*`), except the folders in `keep` (a save in flight)."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if TMP_RE.match(p.name) and p not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(folder: Path, keep_latest_k: int) -> list[Path]:
    """Keep the newest `keep_latest_k` committed checkpoints (0 = keep all)."""
    found = step_dirs(folder)
    if keep_latest_k <= 0 or len(found) <= keep_latest_k:
        return []
    doomed = [p for _, p in found[:-keep_latest_k]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ---- non-tensor state as JSON in a uint8 tensor ------------------------------------------------------------
def _encode(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        items = [_encode(v) for v in x]
        return items if isinstance(x, list) else {"__tuple__": items}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and "__tuple__" not in x and "__tensor__" not in x:
            return {k: _encode(v) for k, v in x.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in x.items()]}
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return {"__tensor__": t.flatten().tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint as JSON (state must be plain data)")


def _decode(x):
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {_decode(k): _decode(v) for k, v in x["__items__"]}
        if "__bytes__" in x:
            return base64.b64decode(x["__bytes__"])
        if "__tensor__" in x:
            return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"])).reshape(x["shape"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def to_blob(obj) -> torch.Tensor:
    """Plain data (dicts, lists, tuples, numbers, strings, bytes, small tensors) -> uint8 tensor of JSON."""
    data = json.dumps(_encode(obj), allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def from_blob(t: torch.Tensor):
    return _decode(json.loads(bytes(t.cpu().numpy().tobytes()).decode()))


# ---- whole-model reads (single process, no process group needed) ------------------------------------------
def model_tensor_specs(step_dir: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """name -> a meta tensor of each stored tensor's shape and dtype under `prefix` (no tensor data is read)."""
    return {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta")
            for k, m in dcp_keys(step_dir).items() if k.startswith(prefix) and hasattr(m, "size")}


def read_model_state_dict(path: str | Path, prefix: str = "model.", keys=None, check: bool = True,
                          verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` (or only the names in `keys`, without the prefix) as a full plain tensor, on
    CPU, in its stored dtype (for growth sources and conversion). DCP reads only the bytes of the tensors asked
    for. Works with or without an initialised process group and at any world size. `check` runs the integrity
    check first (`verify`: with the per-file checksums); a caller that reads a checkpoint piece by piece checks it
    once itself and passes check=False."""
    step_dir = resolve_checkpoint_dir(path)
    if check:
        check_integrity(step_dir, verify)
    specs = model_tensor_specs(step_dir, prefix)
    if keys is not None:
        unknown = sorted(set(keys) - set(specs))
        if unknown:
            raise UserError(f"checkpoint {step_dir} has no tensor {prefix}{unknown[0]}")
        specs = {k: specs[k] for k in keys}
    sd = {prefix + k: torch.empty(m.shape, dtype=m.dtype) for k, m in specs.items()}
    if not sd and keys is not None:
        return {}
    if not sd:
        raise UserError(f"checkpoint {step_dir} holds no model weights (no '{prefix}*' tensors)")
    with warnings.catch_warnings():  # "torch.distributed ... uninitialized, assuming ... a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(sd, step_dir, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """UserError if `out_dir` is a file, or already holds a checkpoint and not `overwrite` (checked before any work)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and (step_dirs(out_dir) or is_checkpoint_dir(out_dir)) and not overwrite:
        raise UserError(f"output folder {out_dir} already holds a checkpoint; pass --overwrite to replace it")


def write_model_checkpoint(out_dir: Path, sd: dict[str, torch.Tensor], args: ModelArgs, meta: dict,
                           overwrite: bool = False, files: dict[str, Path] | None = None) -> Path:
    """Write a model-only checkpoint `out_dir/step-0` (the training layout) from one process, atomically: into
    `out_dir/step-0.tmp-<pid>`, then renamed. UserError if `out_dir` already holds a checkpoint and not overwrite.
    `files` ({relative name: source file}, e.g. the tokenizer) are copied in before the rename.
    Values may be `Deferred` (checkpoint/deferred.py): each is made only when its bytes are written."""
    import torch.distributed.checkpoint as dcp

    from titan_aquila.checkpoint.deferred import DeferredSavePlanner, split_deferred
    from titan_aquila.checkpoint.folder import FolderLock, save_error

    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    with FolderLock(out_dir, "output folder"):  # no second writer can be in here: its temp folders are stale
        remove_stale_tmp(out_dir)
        tmp = out_dir / f"step-0.tmp-{tmp_token()}"
        plain, makers = split_deferred(sd, prefix="model.")
        # DCP's file writer keeps a reference to every tensor of a file until the file is closed, so made tensors go
        # one per file (else the whole model would be alive at the end of the single file).
        writer = ChecksumWriter(str(tmp), single_file_per_rank=not makers)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.save({"model": plain, "step": torch.tensor(0, dtype=torch.int64)}, storage_writer=writer,
                         no_dist=True, planner=DeferredSavePlanner(makers))
            write_json(tmp / MODEL_ARGS, args.to_dict())
            write_json(tmp / METADATA, {"step": 0, "world_size": 1, "model_only": True, "checksums": writer.checksums,
                                        "torch_version": torch.__version__, **meta})
            for name, src in (files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
            if overwrite:
                for _, p in step_dirs(out_dir):
                    shutil.rmtree(p)
            commit(tmp, out_dir / "step-0")
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise save_error(e, writer.errors, f"cannot write checkpoint {out_dir / 'step-0'}") from None
    return out_dir / "step-0"


def tmp_token() -> str:
    """A temp-folder suffix no other process picks: pid and 32 random bits (never from torch's seeded RNG)."""
    return f"{os.getpid():x}-{secrets.token_hex(4)}"
