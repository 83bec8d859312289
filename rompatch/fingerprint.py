"""sha256 fingerprints of tensors, equal to the sha256 of their bytes inside a safetensors file."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's raw little-endian bytes in its own dtype (as safetensors stores them)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    b = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(b)).hexdigest()


class TensorMemo:
    """Results computed from a tensor, memoised per tensor *version* (in-place changes invalidate).

    Keyed by identity, storage, version counter, shape, dtype and device, plus any ``extra`` key;
    holds at most ``size`` entries (cleared when full: these are large, rarely-changing values).

    Each entry holds a weak reference to its tensor, is served only to that same object, and is
    dropped when the tensor is freed. The key alone is not enough: once a tensor is freed, CPython
    gives its id to the next object and the allocator its memory to the next tensor, so a new
    tensor of the same shape (another layer's statistics) would be served the freed tensor's result
    (its LU factors). A strong reference would also prevent that, but would keep freed tensors
    alive (gigabytes of weights on a GPU); keying by content would hash the whole tensor on every
    call, the cost these memos exist to remove. A weak reference costs one object per entry.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: dict[tuple, tuple[weakref.ref, Any]] = {}

    def get(self, t: torch.Tensor, compute: Callable[[], Any], *extra: Any) -> Any:
        key = (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device, *extra)
        entry = self._d.get(key)
        if entry is not None and entry[0]() is t:
            return entry[1]
        value = compute()
        if len(self._d) >= self.size:
            self._d.clear()
        self._d[key] = (weakref.ref(t, partial(self._drop, key)), value)
        return value

    def _drop(self, key: tuple, ref: weakref.ref) -> None:
        """The tensor of ``key``'s entry was freed: drop its result (unless the key was reused)."""
        entry = self._d.get(key)
        if entry is not None and entry[0] is ref:
            del self._d[key]
