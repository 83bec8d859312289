"""Upload patches to the Hub with a model card: ``rompatch push`` and ``rompatch.push_patch``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..audit import DEFAULT_AUDIT_TOKENS, attach_audit, audit_patch, saved_audit
from ..errors import HubError
from ..models import load_model
from ..patch import Patch, load_patch
from ..refs import PatchesLike, flatten_patches
from .commit import Upload, commit_patches, require_repo_id
from .pull import pull_patch
from .transfer import PATCH_SUFFIX, is_local_patch_ref


def _upload(item: Any, name: str | None) -> Upload:
    """A ``Patch`` object, a local file or a Hub reference, as the bytes to upload and its name."""
    if isinstance(item, Patch):
        return Upload(name=name or f"patch-{item.short_id}{PATCH_SUFFIX}", patch=item, data=item.to_bytes())
    path = Path(item).expanduser() if is_local_patch_ref(item) else pull_patch(str(item))
    return Upload(name=name or path.name, patch=load_patch(path), data=path.read_bytes())


def _prepare(patches: PatchesLike, filenames: Sequence[str] | None) -> list[Upload]:
    items = flatten_patches(patches)  # none at all: commit_patches says "nothing to push"
    if filenames is not None and len(filenames) != len(items):
        raise HubError(f"{len(filenames)} file names for {len(items)} patches; pass one name per patch")
    return [_upload(item, filenames[i] if filenames is not None else None) for i, item in enumerate(items)]


def _audited(uploads: list[Upload], tokens: int) -> list[Upload]:
    """Each upload carrying an audit of itself: a saved one is kept, a missing one is run on the
    patch's base model (loaded once per base) and attached."""
    models: dict[str, Any] = {}
    out = []
    for u in uploads:
        if saved_audit(u.patch) is None:
            name = u.patch.base["model"]
            if name not in models:
                models[name] = load_model(name)
            model, tok = models[name]
            patch = attach_audit(u.patch, audit_patch(model, tok, u.patch, tokens=tokens))
            u = dataclasses.replace(u, patch=patch, data=patch.to_bytes())
        out.append(u)
    return out


def push_patch(
    patches: PatchesLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    filenames: Sequence[str] | None = None,
    base_model: str | None = None,
    audit: bool = False,
    audit_tokens: int | None = None,
) -> Any:
    """Upload patches and a generated README.md model card to ``repo_id`` in one commit.

    ``patches``: ``Patch`` objects, local files or Hub references, one or a sequence (nested one
    level, see ``rompatch.refs``), uploaded under their file name (or
    ``patch-<short id>.safetensors`` for objects, or ``filenames``). The repo is created if needed
    (``private`` applies then; pushing with ``private=True`` to an existing public repo is refused).
    ``revision`` is the branch to commit to (created from main when missing). Files already in the
    repo are kept; the card describes every patch in the repo after the commit and keeps the text
    its owner wrote outside the generated section. ``token`` defaults to ``HF_TOKEN`` or the
    huggingface_hub login. Returns huggingface_hub's ``CommitInfo`` (a str: the commit URL).

    ``audit``: every patch is uploaded with an audit report attached (``rompatch.audit``): the one
    its file carries, else one run now on its base model (``audit_tokens`` tokens of text); the card
    then has an Audit section. Without it, the card shows the audits the files already carry.
    """
    require_repo_id(repo_id)
    uploads = _prepare(patches, filenames)  # reads and validates everything before any network call
    if audit:
        uploads = _audited(uploads, audit_tokens or DEFAULT_AUDIT_TOKENS)
    return commit_patches(
        repo_id,
        uploads,
        load=load_patch,
        private=private,
        revision=revision,
        message=message,
        token=token,
        base_model=base_model,
    )


__all__ = ["push_patch"]
