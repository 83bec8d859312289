"""Cache entries: one safetensors file per computed result, trusted only for the identity it records.

Statistics (``stats``) and sampled text (``sampled``) are cached this way under ``$ROMPATCH_CACHE``:
the file name holds a hash of the identity, and the identity itself is stored in the metadata and
compared on every read, so a hash collision or a stale or corrupt file is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_write

log = logging.getLogger(__name__)


def identity_key(identity: dict[str, Any], n: int) -> str:
    """The first ``n`` hex digits of the sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:n]


def read_cached(
    path: Path, identity: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of the entry at ``path`` if it was written for ``identity``, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("identity", "{}")) != identity:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # a corrupt cache entry is recomputed, never trusted
        log.warning("ignoring unreadable cache entry %s (%s)", path, e)
        return None


def write_cached(
    path: Path, identity: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> Path:
    """Write the entry for ``identity`` atomically (``meta``: more metadata to keep with it)."""
    full = {**(meta or {}), "identity": json.dumps(identity, sort_keys=True)}
    data = {k: t.contiguous() for k, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=full))
