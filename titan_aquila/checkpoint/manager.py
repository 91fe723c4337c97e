"""DCP checkpoints: periodic atomic saves, exact resume, resharding, initial load, and the growth hook.

    ckpt = CheckpointManager(cfg, model, optimizer, lr_scheduler, dataloader, model_args, parallel_dims)
    start_step = ckpt.load()                 # resume > checkpoint.initial_load_path > growth > fresh (0)
    for step in range(start_step + 1, steps + 1):
        ...train...
        ckpt.maybe_save(step)                # every checkpoint.interval steps
    ckpt.maybe_save(steps, force=True)       # final save (model-only in export_dtype if last_save_model_only)
    ckpt.close()                             # waits for an async save in flight

What a checkpoint holds (flattened DCP keys; see checkpoint_io for the folder layout and atomic commit):
    model.*                    get_model_state_dict: DTensor shards under FSDP2/TP/EP -> resharding on load
    optimizer.state.*          get_optimizer_state_dict(...)["state"], resharded like the model
    optimizer_param_groups     JSON blob (lr, betas, ... are not tensors)
    lr_scheduler               JSON blob of scheduler.state_dict()
    dataloader.rank{r}         JSON blob of rank r's StatefulDataLoader state (rank-local)
    rng.rank{r}.cpu / .cuda    rank r's torch generator states
    step                       int64
Resuming at the same world size and layout is bit-exact: every one of those is restored. At another world size
model and optimizer are resharded by DCP, but data position and RNG are rank-local: when the data-parallel degree
changed the data loader restarts from the beginning of the data (a message says so).

Test hook: env TITAN_AQUILA_TEST_KILL_DURING_SAVE=N[:SIGNAL] makes the process send itself SIGKILL (or SIGNAL)
while saving step N, after the DCP shards are written but before the JSON files and the commit rename: the
half-written step-N.tmp-* must never be loaded (tests/integration/test_resume.py, test_bad_input.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from titan_aquila.checkpoint.dcp_io import ChecksumWriter, quiet_dcp
from titan_aquila.checkpoint.folder import FolderLock, claim_run_folder, save_error
from titan_aquila.checkpoint.storage import (JOB_CONFIG, METADATA, MODEL_ARGS, args_diff, check_integrity, commit,
                                        dcp_keys, dcp_load, from_blob, latest_checkpoint, prune, read_checkpoint_args,
                                        read_json, remove_stale_tmp, resolve_checkpoint_dir, tmp_token, to_blob,
                                        write_json)
from titan_aquila.checkpoint.lineage import copy_files
from titan_aquila.checkpoint.weights import load_model_weights
from titan_aquila.growth.loader import load_grown_weights, resolve_growth  # noqa: F401
from titan_aquila.errors import UserError
from titan_aquila.logging import logger
from titan_aquila.interrupts import deferred_interrupts
from titan_aquila.models.args import ModelArgs

__all__ = ["CheckpointManager", "read_checkpoint_args", "load_model_weights", "resolve_growth"]
KILL_HOOK = "TITAN_AQUILA_TEST_KILL_DURING_SAVE"


class CheckpointManager:
    def __init__(self, cfg, model: torch.nn.Module, optimizer, lr_scheduler, dataloader, model_args: ModelArgs,
                 parallel_dims=None, *, growth_plan=None):
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.lr_scheduler, self.dataloader, self.model_args = lr_scheduler, dataloader, model_args
        self.growth_plan = growth_plan
        self.folder = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        # Which batch slice this rank reads: its data-parallel coordinates (every rank is its own without dims).
        self.dp_rank, self.dp_degree = ((parallel_dims.dp_rank(), parallel_dims.dp_degree) if parallel_dims is not None
                                        else (self.rank, self.world))
        # A gloo group for our own coordination and for async saves: its collectives run beside training's.
        self.pg = dist.new_group(backend="gloo") if self.distributed else None
        self.dp_rank_of_rank = self._all_gather_int(self.dp_rank)
        self.parallel_layout = repr(parallel_dims) if parallel_dims is not None else None
        self._pending = None  # (future, writer, tmp, final, step, model_only) of an async save in flight
        # What an export needs besides weights (checkpoint/lineage.py): set by the trainer after load; the last
        # stage is this run's, completed with the step and tokens at every save.
        self.lineage: dict | None = None
        self.lineage_files: dict[str, Path] = {}
        self._last_saved: int | None = None
        self._lock: FolderLock | None = None

    # ---- small collectives on our gloo group -----------------------------------------------------------------
    def _all_gather_int(self, x: int) -> list[int]:
        if not self.distributed:
            return [x]
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([x], dtype=torch.int64), group=self.pg)
        return [int(t) for t in out]

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)

    def _from_rank0(self, obj):
        box = [obj]
        if self.distributed:
            dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def _prepare_folder(self) -> None:
        """Before step 1: lock the dump folder (one run per folder); the checkpoint folder must be writable, with
        room for one checkpoint (model + AdamW's two moments, fp32)."""
        error = None
        if self.rank == 0:
            try:
                self._lock = claim_run_folder(self.cfg.job.dump_folder, self.folder,
                                              self.model_args.num_params() * 4 * (3 if self.optimizer else 1))
            except UserError as e:
                error = str(e)
        error = self._from_rank0(error)  # every rank stops (only rank 0 prints), none waits in a collective
        if error:
            raise UserError(error)

    def _quiet(self):
        """Without a process group DCP warns that it assumes one process: that is the intent here."""
        return quiet_dcp(not self.distributed)

    def _log(self, msg: str) -> None:
        logger.info(f"[checkpoint] {msg}")

    # ---- load ------------------------------------------------------------------------------------------------
    def load(self) -> int:
        """Restore state and return the last completed step (0 for a fresh start). Order: a complete checkpoint in
        the run folder (resume) > checkpoint.initial_load_path > growth.source_path (+ transform) > nothing."""
        if self.cfg.checkpoint.enable:
            self._prepare_folder()
        try:
            return self._load()
        except UserError:  # bad input: leave no trace (the folders this run created, its lock)
            if self._lock is not None:
                self._lock.release(cleanup=True)
            raise

    def _load(self) -> int:
        ck, g = self.cfg.checkpoint, self.cfg.growth
        if self.rank == 0:
            for p in remove_stale_tmp(self.folder):
                self._log(f"removed unfinished save {p.name}")
        self._barrier()
        latest = latest_checkpoint(self.folder) if ck.enable else None
        if latest is not None:
            return self._load_from(latest, model_only=False, resume=True)
        if ck.initial_load_path:  # never together with growth.enable (config/validate.py)
            src = resolve_checkpoint_dir(ck.initial_load_path, "checkpoint.initial_load_path")
            step = self._load_from(src, model_only=ck.initial_load_model_only, resume=False)
            return 0 if ck.initial_load_model_only else step
        if g.enable:
            load_grown_weights(self.cfg, self.model, self.model_args, self.growth_plan)
            return 0
        return 0

    def _load_from(self, path: Path, model_only: bool, resume: bool) -> int:
        check_integrity(path, self.cfg.checkpoint.verify_checksums)
        if not self.cfg.checkpoint.verify_checksums:
            self._log(f"checksums of {path.name} not verified (checkpoint.verify_checksums = false)")
        saved = read_checkpoint_args(path)
        diff = args_diff(saved, self.model_args)
        if diff:
            raise UserError(f"checkpoint {path} was saved with a different model than the config's: "
                            + ", ".join(f"{k} {a} (checkpoint) vs {b} (config)" for k, a, b in diff)
                            + "; fix [model] or grow it with a [growth] section")
        meta = read_json(path / METADATA, f"checkpoint {path} has no metadata") if (path / METADATA).exists() else {}
        keys = dcp_keys(path)
        if meta.get("model_only") and not model_only:
            if not resume:
                raise UserError(f"checkpoint {path} holds model weights only; set checkpoint.initial_load_model_only"
                                " = true")
            self._log(f"{path.name} is model-only: loading weights; optimizer, scheduler and data restart")
            model_only = True
        state: dict = {"model": get_model_state_dict(self.model)}
        absent = [k for k in state["model"] if f"model.{k}" not in keys]
        if absent:
            raise UserError(f"checkpoint {path} lacks model tensors: {', '.join(absent[:5])}")
        blobs: list[str] = []
        dl_key, rng_keys = None, []
        if not model_only:
            state["step"] = torch.zeros((), dtype=torch.int64)
            fresh_optimizer = "optimizer_param_groups" not in keys and int(meta.get("step", -1)) == 0
            if self.optimizer is not None and not fresh_optimizer:  # a step-0 save holds no optimizer state
                state["optimizer"] = {"state": get_optimizer_state_dict(self.model, self.optimizer)["state"]}
                blobs.append("optimizer_param_groups")
            if self.lr_scheduler is not None:
                blobs.append("lr_scheduler")
            for k in blobs:
                if k not in keys:
                    what = {"optimizer_param_groups": "optimizer", "lr_scheduler": "LR scheduler"}[k]
                    raise UserError(f"checkpoint {path} has no {what} state; load it model-only")
            dl_key = self._dataloader_key(meta, keys)
            if dl_key:
                blobs.append(dl_key)
            rng_keys = self._rng_keys(meta, keys)
        state.update({k: torch.empty(tuple(keys[k].size), dtype=torch.uint8) for k in blobs + rng_keys})
        with self._quiet():
            dcp_load(state, path)  # a shard unreadable despite the checks: one line naming it
        set_model_state_dict(self.model, state["model"])
        step = int(meta.get("step", 0))
        if not model_only:
            step = int(state["step"])
            if "optimizer" in state:
                osd = {"state": state["optimizer"]["state"], "param_groups": from_blob(state["optimizer_param_groups"])}
                set_optimizer_state_dict(self.model, self.optimizer, osd)
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(from_blob(state["lr_scheduler"]))
            if dl_key:
                self.dataloader.load_state_dict(from_blob(state[dl_key]))
            for k in rng_keys:
                (torch.set_rng_state if k.endswith(".cpu") else torch.cuda.set_rng_state)(state[k])
        self._log(f"{'resumed' if resume else 'loaded'} {path} (step {step}{', model only' if model_only else ''})")
        self._last_saved = step if resume else None
        return step

    def _dataloader_key(self, meta: dict, keys) -> str | None:
        if self.dataloader is None:
            return None
        saved_degree, ranks = meta.get("dp_degree"), meta.get("dp_rank_of_rank", [])
        if saved_degree != self.dp_degree:
            self._log(f"data-parallel degree changed ({saved_degree} -> {self.dp_degree}): the data loader position is "
                      "rank-local and cannot carry over; data restarts from the beginning")
            return None
        src = next((r for r, d in enumerate(ranks) if d == self.dp_rank), None)
        key = f"dataloader.rank{src}"
        if src is None or key not in keys:
            self._log("checkpoint has no data loader state for this rank; data restarts from the beginning")
            return None
        return key

    def _rng_keys(self, meta: dict, keys) -> list[str]:
        if meta.get("world_size") != self.world:
            self._log(f"world size changed ({meta.get('world_size')} -> {self.world}): RNG states not restored")
            return []
        out = [f"rng.rank{self.rank}.cpu"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out.append(f"rng.rank{self.rank}.cuda")
        return [k for k in out if k in keys]

    # ---- save ------------------------------------------------------------------------------------------------
    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at every checkpoint.interval steps, or now if `force` or at training.steps (the final save,
        model-only when checkpoint.last_save_model_only, even when it falls on an interval). A step already saved
        is not saved twice."""
        ck = self.cfg.checkpoint
        force = force or step == self.cfg.training.steps
        if not ck.enable or step == self._last_saved or (not force and step % ck.interval):
            return
        self.save(step, model_only=force and ck.last_save_model_only)

    def save(self, step: int, model_only: bool = False) -> None:
        self.wait()
        self._log(f"saving step {step}{' (model only)' if model_only else ''} to {self.folder}")
        tmp = self.folder / f"step-{step}.tmp-{self._from_rank0(tmp_token())}"  # unique to this process
        state = self._state_dict(step, model_only)
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        t0 = time.perf_counter()
        writer = ChecksumWriter(str(tmp))
        try:
            if self.cfg.checkpoint.async_mode == "async" and not model_only:
                with self._quiet():
                    fut = dcp.async_save(state, storage_writer=writer, process_group=self.pg)
                self._pending = (fut, writer, tmp, self.folder / f"step-{step}", step, model_only)
                self._log(f"step {step}: async save started ({time.perf_counter() - t0:.2f}s blocking)")
            else:
                with self._quiet():
                    dcp.save(state, storage_writer=writer)
                self._finish(writer, tmp, self.folder / f"step-{step}", step, model_only, t0)
        except BaseException as e:
            self._abandon(e, writer, tmp, step)
        self._last_saved = step

    def _abandon(self, e: BaseException, writer: ChecksumWriter, tmp: Path, step: int) -> None:
        """A failed or interrupted save: remove its temp folder (the last committed checkpoint stays the latest);
        re-raise an interrupt, anything else becomes one line with the OS reason."""
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(e, writer.errors, f"cannot save checkpoint step-{step} in {self.folder}") from None

    def _state_dict(self, step: int, model_only: bool) -> dict:
        msd = get_model_state_dict(self.model)
        if model_only:
            dtype = getattr(torch, self.cfg.checkpoint.export_dtype)
            return {"model": {k: v.to(dtype) for k, v in msd.items()}, "step": torch.tensor(step, dtype=torch.int64)}
        state = {"model": msd, "step": torch.tensor(step, dtype=torch.int64)}
        # No step yet (training.steps = 0): no optimizer state to save (asking would allocate 3x the weights of zeros)
        if self.optimizer is not None and self.optimizer.state:
            osd = get_optimizer_state_dict(self.model, self.optimizer)
            state["optimizer"] = {"state": osd["state"]}
            state["optimizer_param_groups"] = to_blob(osd["param_groups"])
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = to_blob(self.lr_scheduler.state_dict())
        if self.dataloader is not None:
            state[f"dataloader.rank{self.rank}"] = to_blob(self.dataloader.state_dict())
        state[f"rng.rank{self.rank}.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state[f"rng.rank{self.rank}.cuda"] = torch.cuda.get_rng_state()
        return state

    def _finish(self, writer: ChecksumWriter, tmp: Path, final: Path, step: int, model_only: bool, t0: float) -> None:
        """All shards are written: add the JSON files, then rank 0 commits by renaming (after a barrier)."""
        hook_step, _, hook_signal = os.environ.get(KILL_HOOK, "").partition(":")
        if hook_step == str(step):
            sys.stdout.flush()
            os.kill(os.getpid(), getattr(signal, hook_signal or "SIGKILL"))
        checksums = [writer.checksums] * self.world  # every rank's shard digests, merged on rank 0
        if self.distributed:
            dist.all_gather_object(checksums, writer.checksums, group=self.pg)
        if self.rank == 0:
            if self.lineage is not None:
                run = self.lineage["stages"][-1]
                run.update(end_step=step, tokens=(step - run["start_step"]) * run["tokens_per_step"])
                copy_files(self.lineage_files, tmp)
            write_json(tmp / MODEL_ARGS, self.model_args.to_dict())
            write_json(tmp / JOB_CONFIG, self.cfg.to_dict())
            write_json(tmp / METADATA, {
                "step": step, "world_size": self.world, "dp_degree": self.dp_degree,
                "dp_rank_of_rank": self.dp_rank_of_rank, "parallel_layout": self.parallel_layout,
                "parallelism": self.cfg.to_dict().get("parallelism"), "model_only": model_only,
                "dtype": self.cfg.checkpoint.export_dtype if model_only else None,
                "checksums": {k: v for c in checksums for k, v in c.items()},
                "torch_version": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "lineage": self.lineage})
        self._barrier()
        if self.rank == 0:
            with deferred_interrupts():  # the renames of a commit are never cut in half
                commit(tmp, final)
            for p in prune(self.folder, self.cfg.checkpoint.keep_latest_k):
                self._log(f"removed old checkpoint {p.name}")
            remove_stale_tmp(self.folder)
        self._barrier()
        self._log(f"saved {final} ({time.perf_counter() - t0:.2f}s{', model only' if model_only else ''})")

    def wait(self) -> None:
        """Finish an async save in flight (its rename happens here, on the main thread)."""
        if self._pending is not None:
            fut, writer, tmp, final, step, model_only = self._pending
            self._pending = None
            t0 = time.perf_counter()
            try:
                fut.result()
                self._finish(writer, tmp, final, step, model_only, t0)
            except BaseException as e:
                self._abandon(e, writer, tmp, step)

    def close(self) -> None:
        self.wait()
        if self._lock is not None:
            self._lock.release()
