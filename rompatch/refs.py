"""Resolve patch references: a ``Patch`` object or a local file path.

(Hub references, ``REPO_ID[/path.safetensors][@REV]``, are resolved by ``rompatch.hub``.)
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PatchFormatError
from .patch import Patch, load_patch


def resolve_patch(ref: Patch | str | os.PathLike, *, revision: str | None = None) -> Patch:
    """Load a patch from a ``Patch``, a local path, or (when rompatch.hub supports it) a Hub reference."""
    if isinstance(ref, Patch):
        return ref
    path = Path(ref)
    if path.exists() or revision is None and str(ref).endswith(".safetensors") and "/" not in str(ref):
        return load_patch(path)
    try:
        from .hub import resolve_hub_patch  # optional until the Hub module exists
    except ImportError:
        raise PatchFormatError(f"{ref}: no such patch file") from None
    return resolve_hub_patch(str(ref), revision=revision)
