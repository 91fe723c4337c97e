"""The output folder of a run: one run at a time (a lock), writable and with room for a checkpoint before step 1.

Lock: `<folder>/.lock`, held with `flock(LOCK_EX | LOCK_NB)` for the life of the process and holding
"<host> <pid>" of the holder. The kernel drops a flock when its process exits in any way (SIGKILL and crashes
included), so a lock left by a dead run is never in force: the next run takes it and rewrites the holder. Two runs
in one folder would otherwise delete each other's saves in progress and overwrite each other's checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

from titan_aquila.errors import UserError

LOCK_NAME = ".lock"


def os_reason(e: BaseException) -> str:
    """'No space left on device' for an OSError (errno name added), the first line of anything else."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def make_folder(folder: Path, what: str) -> list[Path]:
    """mkdir -p with one clear line when a path component is a file or not writable. Returns the folders it
    created, outermost first (so a run that stops on bad input can leave nothing behind: `remove_created`)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a folder")
    created = [p for p in [*reversed(folder.parents), folder] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {folder}: {os_reason(e)}") from None
    return created


def remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        (p / LOCK_NAME).unlink(missing_ok=True)
        try:
            p.rmdir()
        except OSError:  # not empty: something else lives there now
            return


class FolderLock:
    """Exclusive lock on `folder` for this process; `release()` (or process exit) frees it."""

    def __init__(self, folder: str | Path, what: str = "output folder"):
        import fcntl

        self.folder = Path(folder)
        self.created = make_folder(self.folder, what)
        path = self.folder / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{what} {self.folder} is not writable: {os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {what} {self.folder}: {os_reason(e)}") from None
            who = f"host {holder[0]}, pid {holder[1]}" if len(holder) >= 2 else "holder unknown"
            raise UserError(f"{what} {self.folder} is in use by another run ({who}); two runs in one folder "
                            "would destroy each other's checkpoints: wait for it or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self, cleanup: bool = False) -> None:
        """Drop the lock; with `cleanup` also remove the folders the lock created (a run that stopped on bad
        input leaves nothing behind)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
            if cleanup:
                remove_created(self.created)

    def __del__(self) -> None:  # an abandoned manager does not keep its folder locked
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(folder: Path, need_bytes: int = 0, what: str = "checkpoint folder") -> list[Path]:
    """Create `folder`, write and fsync a probe file in it, and compare free space with `need_bytes` (the size of
    one checkpoint): every failure is one line, raised before any training step runs. Returns make_folder's list."""
    created = make_folder(folder, what)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        remove_created(created)
        raise UserError(f"{what} {folder} is not writable: {os_reason(e)}") from None
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        remove_created(created)
        raise UserError(f"no space left for a checkpoint in {what} {folder}: about {need_bytes / 2**30:.2f} GiB "
                        f"needed, {free / 2**30:.2f} GiB free")
    return created


def claim_run_folder(dump_folder: Path, checkpoint_folder: Path, need_bytes: int) -> FolderLock:
    """Lock the dump folder, then check_writable(checkpoint_folder); `.created` lists every folder made."""
    lock = FolderLock(dump_folder, "dump folder (job.dump_folder)")
    try:
        lock.created += check_writable(checkpoint_folder, need_bytes)
    except UserError:
        lock.release(cleanup=True)
        raise
    return lock


def save_error(e: BaseException, write_errors: list[OSError], what: str) -> BaseException:
    """The exception to raise for a failed save `e`: an interrupt or UserError inside DCP's CheckpointException
    as is; any other failure as one UserError line with the OS reason (the writer's own OSError when it saw one:
    torch.save reports a full disk only as "unexpected pos ...")."""
    from titan_aquila.checkpoint.dcp_io import unwrap

    inner = unwrap(e)
    if isinstance(inner, (KeyboardInterrupt, UserError)) or not isinstance(inner, Exception):
        return inner
    return UserError(f"{what}: {os_reason(write_errors[0] if write_errors else inner)}; the unfinished save was "
                     "removed")
