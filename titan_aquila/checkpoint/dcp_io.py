"""DCP storage reader and writer that never execute checkpoint content and checksum every file they write.

Reading. torch's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`: a downloaded
checkpoint whose `.metadata` holds a pickle program (`os.system` via REDUCE) would run it. `SafeReader` unpickles
with `find_class` restricted to what DCP metadata consists of (its dataclasses, `torch.Size`, dtypes, the layout
and memory-format decoders, `pathlib` paths); any other global stops the load before anything is called.
`BytesStorageMetadata` is not on the list: DCP would read such an entry with `torch.load(weights_only=False)`, and
our checkpoints store only tensors (non-tensor state is JSON in a uint8 tensor, see storage.py).

Writing. `ChecksumWriter` hashes each file as DCP streams it to disk: digest(file) = sha256 over the bytes written,
in order, so the file needs no second read. The digests of every rank's files go into `metadata.json`; `verify`
recomputes them on load, which turns a silently corrupted shard into one clear line naming it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from titan_aquila.errors import UserError

DCP_METADATA = ".metadata"
HASH = "sha256"
_META = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS = {
    (_META, name) for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                               "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which DCP metadata never contains")


def load_metadata(path: Path):
    """The DCP `Metadata` in file `path`, through the restricted unpickler. UserError (one line) otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {path.parent}: refused to load {path.name}: {e} (nothing was executed)") from None
    except Exception as e:  # truncated or not a pickle at all
        raise UserError(f"checkpoint {path.parent} is corrupt: cannot read {path.name} ({type(e).__name__})") from None
    if not isinstance(md, Metadata):
        raise UserError(f"checkpoint {path.parent}: {path.name} holds a {type(md).__name__}, not DCP metadata")
    return md


class SafeReader(FileSystemReader):
    """FileSystemReader with the restricted `.metadata` unpickler, and shard read errors that name the file."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        md = load_metadata(Path(self._get_metadata_path(rank)))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def _slice_file(self, file, sinfo):
        self.reading = sinfo.relative_path  # the shard a failure below belongs to
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        self.reading = None
        try:
            return super().read_data(plan, planner)
        except Exception as e:
            where = f"shard {self.reading}" if self.reading else "a shard"
            raise RuntimeError(f"{where} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def unwrap(e: BaseException) -> BaseException:
    """The first rank's own exception out of DCP's CheckpointException (a BaseException whose text is a
    multi-line traceback per rank); `e` itself otherwise."""
    failures = getattr(e, "failures", None)
    return next(iter(failures.values()))[0] if failures else e


def load_error_line(e: BaseException) -> str:
    """One line for an exception out of `dcp.load` (re-raises a UserError or an interrupt found inside)."""
    inner = unwrap(e)
    if isinstance(inner, (UserError, KeyboardInterrupt)):
        raise inner
    return _first_line(inner)


# ---- writing with checksums ---------------------------------------------------------------------------------
class _HashingStream(io.RawIOBase):
    """Forwards to the file, hashing every byte written."""

    def __init__(self, raw, errors: list):
        super().__init__()
        self.raw, self.digest, self.errors = raw, hashlib.new(HASH), errors

    def write(self, b) -> int:
        try:
            n = self.raw.write(b)
        except OSError as e:  # torch.save reports it as "unexpected pos ..."; keep the OS reason
            self.errors.append(e)
            raise
        self.digest.update(memoryview(b)[:n] if n is not None else b)
        return n

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        """Nothing to do: the underlying file is closed by its own context manager."""


class _HashingFileSystem(FileSystem):
    def __init__(self, sink: dict[str, str], errors: list):
        super().__init__()
        self.sink, self.errors = sink, errors

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            s = _HashingStream(raw, self.errors)
            yield s
            self.sink[Path(path).name] = f"{HASH}:{s.digest.hexdigest()}"

    def rename(self, path, new_path) -> None:  # `.metadata.tmp` -> `.metadata`
        super().rename(path, new_path)
        if Path(path).name in self.sink:
            self.sink[Path(new_path).name] = self.sink.pop(Path(path).name)


class ChecksumWriter(FileSystemWriter):
    """FileSystemWriter that records `file name -> "sha256:<hex>"` in `self.checksums` as it writes, and the
    OSErrors of failed writes in `self.errors`."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.checksums: dict[str, str] = {}
        self.errors: list[OSError] = []
        self.fs = _HashingFileSystem(self.checksums, self.errors)


@contextmanager
def quiet_dcp(active: bool = True):
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        if active:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{HASH}:{h.hexdigest()}"


def verify_checksums(step_dir: Path, checksums: dict[str, str]) -> None:
    """UserError naming the first file whose digest differs from the one recorded when it was written."""
    for name, want in sorted(checksums.items()):
        f = step_dir / name
        if not f.is_file():
            kind = "shard " if name.endswith(".distcp") else ""
            raise UserError(f"checkpoint {step_dir} is incomplete or corrupt: {kind}{name} is missing")
        if file_digest(f) != want:
            raise UserError(f"checkpoint {step_dir} is corrupt: {name} does not match the checksum recorded when it "
                            "was saved (checkpoint.verify_checksums = false skips this check)")
