"""Process-group start-up and the gloo-safe exit.

gloo can abort at interpreter shutdown (`terminate called without an active exception`) when a worker thread
frees tensors late (an open upstream bug, seen with torch 2.13 on CPU). Every distributed entry point therefore ends with
`finish(code)`: barrier, destroy the group, flush, and `os._exit` before the interpreter tears anything down.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from datetime import timedelta


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain `python` run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def set_per_rank_inductor_cache() -> None:
    """Give each rank its own inductor cache: `$TORCHINDUCTOR_CACHE_DIR/rank<RANK>` (default base
    `$TMPDIR/torchinductor_<uid>_titan_aquila`). Why: compiled TP kernels hold rank-specific offsets
    but the cache key has no rank, so a shared cache gives silently wrong losses. Must run before torch is
    imported (train.py calls it first); a no-op for a single process or when already applied."""
    rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or os.environ.get("TITAN_AQUILA_RANK_CACHE") == rank:
        return
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"torchinductor_{os.getuid()}_titan_aquila")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"rank{rank}")
    os.environ["TITAN_AQUILA_RANK_CACHE"] = rank  # marks it done (and is inherited by nothing that matters)


def init_distributed():
    """Init the default process group when launched with WORLD_SIZE > 1; returns the device to train on."""
    import torch
    import torch.distributed as dist

    rank, local_rank, world = world_info()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return device


def let_rank0_report() -> None:
    """After a user mistake found before the process group exists (config validation): every rank hits it alike but
    only rank 0 prints it, so the other ranks wait, bounded, instead of exiting at once; an early exit of theirs lets
    torchrun kill rank 0 before its message is out (seen on a loaded box). torchrun stops them when rank 0 exits."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dist = sys.modules.get("torch.distributed")
    if world <= 1 or rank == 0 or (dist is not None and dist.is_available() and dist.is_initialized()):
        return  # one process, rank 0 itself, or finish() waits at a barrier
    with contextlib.suppress(KeyboardInterrupt):  # torchrun's SIGTERM (interrupts.Interrupted): exit as planned
        time.sleep(30)


def finish(code: int = 0) -> None:
    """Exit the process with `code` without letting gloo's threads crash the interpreter's shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone: still exit with our own code
            if code == 0:
                dist.barrier()
            elif code == 2 and dist.get_backend() == "gloo":
                # A user mistake (exit 2) is hit by every rank alike, but only rank 0 prints it: wait for rank 0,
                # else an early exit of another rank lets torchrun kill rank 0 before its message is out.
                # Bounded, in case the mistake was rank-local after all.
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            elif code == 2:
                dist.barrier()
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
