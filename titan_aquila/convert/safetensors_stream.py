"""safetensors one tensor at a time: shards written as each tensor is made, tensors read by plain file reads.

A safetensors file is  [u64 little-endian n] [n bytes of JSON header, space-padded to a multiple of 8] [data],
the header mapping each name to {"dtype", "shape", "data_offsets": [begin, end)} relative to the data start,
with the tensors laid end to end. Every shape and dtype is known before any byte is read (from the DCP metadata),
so each file's header is written first and the tensors are then appended in header order as they are made.
Sharding as transformers writes it: model.safetensors, or model-0000i-of-0000n.safetensors + index.json.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from titan_aquila.checkpoint.storage import write_json
from titan_aquila.errors import UserError

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def _nbytes(t: torch.Tensor) -> int:
    return math.prod(t.shape) * t.element_size()


def plan_shards(specs: list[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of (name, meta tensor) of at most max_shard_bytes (a larger tensor gets a file alone)."""
    shards, cur, size = [], [], 0
    for name, t in specs:
        n = _nbytes(t)
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    shards.append(cur)
    return shards


def _header(shard: list[tuple[str, torch.Tensor]]) -> bytes:
    head, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in shard:
        n = _nbytes(t)
        head[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(specs: list[tuple[str, torch.Tensor]], tensors, folder: Path,
                      max_shard_bytes: int = 4 << 30) -> list[str]:
    """`specs`: (HF name, meta tensor) in write order; `tensors`: an iterator of (HF name, tensor) in the same
    order, made lazily. Returns the file names written into `folder`."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    it = iter(tensors)
    for fname, shard in zip(names, shards):
        with open(folder / fname, "wb") as f:
            f.write(_header(shard))
            for name, spec in shard:
                got_name, t = next(it)
                assert got_name == name and tuple(t.shape) == tuple(spec.shape) and t.dtype == spec.dtype, \
                    (name, got_name, tuple(t.shape), tuple(spec.shape))
                if t.numel():
                    f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
                del t
    assert next(it, None) is None, "more tensors than planned"
    if len(shards) > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _ in shard}
        write_json(folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(_nbytes(t) for _, t in specs)}, "weight_map": weight_map})
    return names


ST_DTYPES = {v: k for k, v in ST_NAMES.items()}


class SafetensorsReader:
    """One tensor at a time by plain file reads at the header's offsets. Not safetensors' mmap: the pages of a
    mapped file stay resident (and count in RSS) while the file is open, so reading a whole shard through it would
    hold the shard."""

    def __init__(self):
        self.headers: dict[Path, tuple[int, dict]] = {}

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self.headers:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self.headers[path] = (8 + n, json.loads(f.read(n)))
        return self.headers[path]

    def meta(self, path: Path, name: str) -> torch.Tensor:
        info = self._header(path)[1][name]
        return torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]], device="meta")

    def read(self, path: Path, name: str) -> torch.Tensor:
        start, head = self._header(path)
        info = head[name]
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        buf = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise UserError(f"{path} is truncated: tensor {name} ends past the end of the file")
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])
