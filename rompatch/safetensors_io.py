"""Safetensors files on disk, by byte range: parse a header, read or write one tensor's bytes.

Nothing here loads a whole file: :func:`read_header` reads the 8-byte length and the JSON header,
:func:`read_range` and :func:`pwrite_all` move exactly one tensor's bytes, and
:class:`SafetensorsWriter` writes a file whose tensor list is known up front, in any order.

:func:`strict_json` is the one JSON parser for what rompatch reads from files it did not just write
(safetensors headers, patch metadata, checkpoint records): finite numbers only, bounded integers and
nesting, valid UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
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
# Bits per element of every dtype the safetensors format defines (sub-byte ones pack elements).
DTYPE_BITS = {
    **{k: 8 * v for k, v in ITEMSIZE.items()},
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
    "C64": 64,
}

# ------------------------------------------------------------------------------- strict JSON

JSON_MAX_DEPTH = 64  # arrays and objects nested deeper are refused (rompatch's own nest 5 deep)
JSON_MAX_INT_DIGITS = 20  # integers of more digits are refused (2**64 has 20)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class StrictJSONError(ValueError):
    """JSON that :func:`strict_json` refuses. The message is a predicate for the caller to put after
    a name: ``f"metadata key 'deltas' {e}"`` reads "metadata key 'deltas' holds NaN or Infinity ..."."""


def brief(x: Any, n: int = 60) -> str:
    """``repr(x)``, cut to about ``n`` characters: for one-line messages about untrusted values."""
    r = repr(x)
    return r if len(r) <= n else r[: n - 1] + "…"


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"holds NaN or Infinity ({name}), which JSON does not allow")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise StrictJSONError(f"holds a number out of range ({brief(text, 24)})")
    return x


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > JSON_MAX_INT_DIGITS:
        raise StrictJSONError(f"holds an integer of more than {JSON_MAX_INT_DIGITS} digits")
    return int(text)


def _check_text(s: str) -> None:
    """Refuse a string that is not valid Unicode text (an unpaired surrogate cannot be UTF-8)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StrictJSONError(
            f"holds an unpaired surrogate (\\u{ord(s[e.start]):04x}), which is not valid UTF-8"
        ) from None


def _check_tree(value: Any, max_depth: int, strings: bool) -> None:
    """Nesting depth (without recursion) and, when ``strings``, every string and key's text."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    if strings and isinstance(value, str):
        _check_text(value)
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise StrictJSONError(f"is nested deeper than {max_depth} levels")
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            if strings and isinstance(k, str):
                _check_text(k)
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
            elif strings and isinstance(v, str):
                _check_text(v)


def strict_json(text: str | bytes | bytearray | memoryview, *, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """``json.loads(text)``, refusing what Python's parser accepts but a strict reader must not: NaN,
    Infinity and numbers out of float range (1e999), integers of more than ``JSON_MAX_INT_DIGITS``
    digits, nesting deeper than ``max_depth`` (without a RecursionError), bytes that are not UTF-8 and
    unpaired surrogates (``"\\ud800"``). Raises :class:`StrictJSONError` (a ValueError) with a one-line
    message."""
    if not isinstance(text, str):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise StrictJSONError(f"is not UTF-8 ({e.reason} at byte {e.start})") from None
    elif not text.isascii():
        _check_text(text)
    try:
        value = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError:
        raise StrictJSONError(f"is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    strings = _SURROGATE_ESCAPE.search(text) is not None  # else no string can hold a lone surrogate
    if strings or text.count("[") + text.count("{") > max_depth:
        _check_tree(value, max_depth, strings)
    return value


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


def _check_length(n: int, size: int) -> None:
    if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file")
    if n > HEADER_MAX:
        raise ValueError(f"header length {n} is more than the {HEADER_MAX:,} bytes a header may have")


def parse_header(data: bytes | bytearray | memoryview, size: int | None = None) -> tuple[dict[str, Any], int]:
    """``(header JSON object, where the data section starts)`` from a file's first bytes.

    ``data`` holds at least the 8-byte length and the header; ``size`` is the whole file's (default:
    ``len(data)``). Raises ValueError (one line) for anything that is not a safetensors header; the
    header is parsed by :func:`strict_json`.
    """
    size = len(data) if size is None else size
    if len(data) < 8:
        raise ValueError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    _check_length(n, size)
    try:
        header = strict_json(bytes(data[8 : 8 + n]))
    except StrictJSONError as e:
        raise StrictJSONError(f"the header {e}") from None
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
            _check_length(n, size)  # before reading: a corrupt length must not read the whole file
            head += f.read(n)
    header, start = parse_header(head, size)
    return header, start, size


def _metadata(meta: Any) -> dict[str, str] | None:
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its __metadata__ must map strings to strings")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, or None when it is not one (or has none)."""
    try:
        header, _, _ = _read_raw_header(Path(path))
        return _metadata(header.get("__metadata__"))
    except (OSError, ValueError):
        return None


def read_header(path: str | os.PathLike, *, rel: str | None = None) -> tuple[list[TensorEntry], dict | None]:
    """Parse a safetensors header: ``(entries sorted by offset, __metadata__)``. Reads no tensor data.

    Refuses (CheckpointError, one line) a header that is not strict JSON (:func:`strict_json`), a
    tensor entry whose dtype is not a safetensors dtype, whose shape is not a list of integers ≥ 0 or
    whose ``data_offsets`` are not two integers within the file matching its size, tensors that
    overlap, and ``__metadata__`` that does not map strings to strings.
    """
    path = Path(path)
    rel = rel or path.name
    try:
        header, start, size = _read_raw_header(path)
        meta = _metadata(header.pop("__metadata__", None))
        entries = sorted((_entry(key, info, rel, start, size) for key, info in header.items()), key=_span)
        for a, b in zip(entries, entries[1:]):
            if b.offset < a.offset + a.nbytes:
                raise ValueError(f"tensors {brief(a.key)} and {brief(b.key)} overlap")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); the file is truncated or corrupt, re-download or "
            "re-save it"
        ) from None
    return entries, meta


def _span(t: TensorEntry) -> tuple[int, int]:
    return t.offset, t.nbytes


def _is_count(x: Any) -> bool:
    """An integer ≥ 0 (JSON true and false are not numbers)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(key: str, info: Any, rel: str, start: int, size: int) -> TensorEntry:
    name = brief(key)
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name} must be an object with dtype, shape and data_offsets")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPE_BITS:
        raise ValueError(f"tensor {name} has unknown dtype {brief(code)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise ValueError(f"tensor {name} shape must be a list of integers ≥ 0, got {brief(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise ValueError(f"tensor {name} data_offsets must be two integers ≥ 0, got {brief(offsets)}")
    b, e = offsets
    if b > e or start + e > size:
        raise ValueError(f"tensor {name} lies outside the file (truncated?)")
    if math.prod(shape) * DTYPE_BITS[code] != 8 * (e - b):
        raise ValueError(f"tensor {name} has {e - b} bytes for shape {brief(shape)} {code}")
    return TensorEntry(key, rel, code, tuple(shape), start + b, e - b)


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
