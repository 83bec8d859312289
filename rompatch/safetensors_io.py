"""Safetensors files on disk, by byte range: parse a header, read or write one tensor's bytes.

Nothing here loads a whole file: :func:`read_header` reads the 8-byte length and the JSON header,
:func:`read_range` and :func:`pwrite_all` move exactly one tensor's bytes, and
:class:`SafetensorsWriter` writes a file whose tensor list is known up front, in any order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .fingerprint import dtype_name

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: file (relative to the checkpoint folder) and absolute offset."""

    key: str
    file: str
    dtype: str  # safetensors dtype code: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return ST_DTYPES[self.dtype]
        except KeyError:
            raise CheckpointError(
                f"tensor '{self.key}' in {self.file} is stored as {self.dtype}; rompatch edits float32, "
                "float16 and bfloat16 weights only (de-quantise the checkpoint first)"
            ) from None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.torch_dtype) if self.dtype in ST_DTYPES else self.dtype


HEADER_MAX = 100_000_000  # a larger header is refused (not a safetensors file, or a corrupt one)


def parse_header(data: bytes | bytearray | memoryview, size: int | None = None) -> tuple[dict[str, Any], int]:
    """``(header JSON object, where the data section starts)`` from a file's first bytes.

    ``data`` holds at least the 8-byte length and the header; ``size`` is the whole file's (default:
    ``len(data)``). Raises ValueError for anything that is not a safetensors header.
    """
    size = len(data) if size is None else size
    if len(data) < 8:
        raise ValueError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > size - 8 or n > HEADER_MAX:
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(bytes(data[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def frame_header(raw: bytes) -> bytes:
    """The 8-byte length and the header JSON ``raw``, padded with spaces to a multiple of 8 bytes."""
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _read_raw_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """``(header, data start, file size)``; raises OSError or ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, HEADER_MAX + 1, max(size - 8, 0)))
    header, start = parse_header(head, size)
    return header, start, size


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, or None when it is not one (or has none)."""
    try:
        header, _, _ = _read_raw_header(Path(path))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else None


def read_header(path: str | os.PathLike, *, rel: str | None = None) -> tuple[list[TensorEntry], dict | None]:
    """Parse a safetensors header: ``(entries sorted by offset, __metadata__)``. Reads no tensor data."""
    path = Path(path)
    rel = rel or path.name
    try:
        header, start, size = _read_raw_header(path)
        meta = header.pop("__metadata__", None)
        entries = [_entry(key, info, rel, start, size) for key, info in header.items()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); the file is truncated or corrupt, re-download or "
            "re-save it"
        ) from None
    entries.sort(key=lambda t: t.offset)
    return entries, meta


def _entry(key: str, info: dict[str, Any], rel: str, start: int, size: int) -> TensorEntry:
    b, e = (int(x) for x in info["data_offsets"])
    shape = tuple(int(s) for s in info["shape"])
    code = str(info["dtype"])
    if not 0 <= b <= e or start + e > size:
        raise ValueError(f"tensor '{key}' lies outside the file (truncated?)")
    if code in ITEMSIZE and math.prod(shape) * ITEMSIZE[code] != e - b:
        raise ValueError(f"tensor '{key}' has {e - b} bytes for shape {list(shape)} {code}")
    return TensorEntry(key, rel, code, shape, start + b, e - b)


def read_range(path: str | os.PathLike, offset: int, nbytes: int) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` (looping: one read(2) returns at most ~2 GiB)."""
    buf = bytearray(nbytes)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < nbytes:
            k = f.readinto(mv[got:])
            if not k:
                raise CheckpointError(
                    f"{path}: unexpected end of file; the file is truncated, re-download it"
                )
            got += k
    return buf


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def to_tensor(buf: bytearray, entry: TensorEntry) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=entry.torch_dtype).reshape(entry.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes (what safetensors stores)."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def sha256_range(path: Path, offset: int, nbytes: int, chunk: int = 64 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = nbytes
        buf = bytearray(min(chunk, max(nbytes, 1)))
        mv = memoryview(buf)
        while left:
            k = f.readinto(mv[: min(left, len(buf))])
            if not k:
                raise CheckpointError(
                    f"{path}: unexpected end of file; the file is truncated, re-download it"
                )
            h.update(mv[:k])
            left -= k
    return h.hexdigest()


def sha256_bytes(b: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(b).hexdigest()


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front; data may arrive in any order."""

    def __init__(
        self, path: Path, specs: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
    ):
        header: dict[str, Any] = {"__metadata__": metadata}
        self.slots: dict[str, tuple[int, int]] = {}
        off = 0
        for name, code, shape in specs:
            n = math.prod(shape) * ITEMSIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
            self.slots[name] = (off, n)
            off += n
        framed = frame_header(json.dumps(header, separators=(",", ":")).encode())
        self.start = len(framed)
        self.size = self.start + off
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pwrite_all(self.fd, memoryview(framed), 0)
        os.ftruncate(self.fd, self.size)
        self.pending = set(self.slots)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        off, n = self.slots[name]
        data = memoryview(data).cast("B")
        if len(data) != n:
            raise AssertionError(f"{name}: {len(data)} bytes for a {n}-byte slot")
        pwrite_all(self.fd, data, self.start + off)
        self.pending.discard(name)

    def close(self) -> int:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.pending and sys.exc_info()[0] is None:
            raise AssertionError(f"tensors never written: {sorted(self.pending)}")
        return self.size
