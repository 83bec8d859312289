"""sha256 fingerprints of tensors, equal to the sha256 of their bytes inside a safetensors file."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: dict[tuple, Any] = {}

    def get(self, t: torch.Tensor, compute: Callable[[], Any], *extra: Any) -> Any:
        key = (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device, *extra)
        if key not in self._d:
            if len(self._d) >= self.size:
                self._d.clear()
            self._d[key] = compute()
        return self._d[key]
