"""Download patches from the Hub: ``rompatch pull`` and ``rompatch.pull_patch``."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..atomic import atomic_write
from ..patch import Patch, load_patch
from .transfer import fetch_patch, parse_ref

log = logging.getLogger(__name__)


def pull_patch(
    ref: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
) -> Path:
    """Download a patch into the Hugging Face cache (and copy it into ``local_dir``); return its path.

    ``ref`` is ``REPO_ID[/path.safetensors][@REV]``. The file is validated as a patch before it is
    returned or copied. With ``local_dir`` the copy keeps the path inside the repo and is written
    atomically; on any failure nothing is left there.
    """
    r = parse_ref(ref, revision=revision)
    _, cached, filename = fetch_patch(ref, load_patch, revision=revision)
    if local_dir is None:
        return cached
    dest = Path(local_dir) / filename
    atomic_write(dest, lambda tmp: shutil.copyfile(cached, tmp))
    log.info("pulled %s into %s", r, dest)
    return dest


def resolve_hub_patch(ref: str, revision: str | None = None) -> Patch:
    """Load the patch a Hub reference points to (downloading it into the HF cache if needed)."""
    return fetch_patch(ref, load_patch, revision=revision)[0]


__all__ = ["pull_patch", "resolve_hub_patch"]
