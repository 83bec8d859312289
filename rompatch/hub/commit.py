"""One commit to a Hub repo: patch files plus the model card that describes every patch in it.

Used by ``rompatch.push_patch`` and by ``Patch.push_to_hub``. It handles patches only through the
objects and bytes it is given and the ``load`` function it is passed, so it does not depend on the
patch format module (which is built on it through ``Patch``'s Hub methods).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import HubError, PatchFormatError
from .modelcard import render_card
from .transfer import (
    CARD_FILE,
    PATCH_SUFFIX,
    download,
    hub_errors,
    is_offline,
    is_repo_id,
    remote_patch_files,
)

if TYPE_CHECKING:
    from ..patch import Patch

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """One patch to upload: its name in the repo, the patch, and the file's bytes."""

    name: str
    patch: Patch
    data: bytes


def require_repo_id(repo_id: object) -> None:
    if not is_repo_id(repo_id):
        raise HubError(f"'{repo_id}' is not a valid Hub repo id; write USER/REPO (or ORG/REPO)")


def check_uploads(uploads: list[Upload]) -> list[Upload]:
    """Names must be relative ``*.safetensors`` paths, one patch per name (duplicates of the same
    patch are merged)."""
    if not uploads:
        raise HubError("nothing to push; pass at least one patch")
    by_name: dict[str, str] = {}
    for u in uploads:
        if not u.name.endswith(PATCH_SUFFIX) or u.name.startswith("/") or ".." in u.name.split("/"):
            raise HubError(
                f"'{u.name}': a patch's name in the repo must be a relative path ending in {PATCH_SUFFIX}"
            )
        if by_name.setdefault(u.name, u.patch.id) != u.patch.id:
            raise HubError(
                f"two different patches would both be uploaded as '{u.name}'; rename one of the files"
            )
    return list({u.name: u for u in uploads}.values())


def default_message(uploads: Sequence[Upload]) -> str:
    if len(uploads) == 1:
        u = uploads[0]
        r = next((d.request for d in u.patch.deltas if d.request is not None), None)
        what = f" ({r.subject}: {r.target_true or '?'} → {r.target_new})" if r is not None else ""
        return f"Add rompatch patch {u.name}{what}"
    return f"Add {len(uploads)} rompatch patches: " + ", ".join(u.name for u in uploads)


def _token(token: str | None, repo_id: str) -> str:
    from huggingface_hub import get_token

    if is_offline():
        raise HubError(
            "cannot push while HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to push, nothing was pushed",
            repo_id=repo_id,
        )
    tok = token or get_token()
    if not tok:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that can write; "
            "nothing was pushed",
            repo_id=repo_id,
        )
    return tok


def _card(
    api: Any,
    repo_id: str,
    parent: str,
    existing: list[str],
    uploads: Sequence[Upload],
    *,
    load: Callable[[Path], Patch],
    token: str,
    revision: str | None,
    base_model: str | None,
) -> str:
    """The model card for the repo after the commit: our patches and every other patch already there."""
    ours = {u.name for u in uploads}
    entries = [(u.name, u.patch) for u in uploads]
    old_card: str | None = None
    if CARD_FILE in existing:
        card_path = download(
            repo_id, CARD_FILE, parent, action=f"read the model card of {repo_id}", token=token
        )
        old_card = card_path.read_text(encoding="utf-8", errors="replace")
    with hub_errors(
        f"read the patches already in {repo_id}", repo_id=repo_id, revision=revision, token=token
    ):
        others = remote_patch_files(api, repo_id, parent, [f for f in existing if f not in ours])
    for f in others:
        try:
            entries.append((f, load(download(repo_id, f, parent, token=token))))
        except PatchFormatError as e:
            log.warning("%s/%s is left out of the model card: %s", repo_id, f, e)
    return render_card(entries, repo_id=repo_id, existing=old_card, base_model=base_model)


def commit_patches(
    repo_id: str,
    uploads: list[Upload],
    *,
    load: Callable[[Path], Patch],
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
) -> Any:
    """Upload ``uploads`` and a regenerated README.md to ``repo_id`` in one commit (see
    ``rompatch.push_patch``). ``load`` reads the patches already in the repo for the card."""
    from huggingface_hub import CommitOperationAdd, HfApi

    require_repo_id(repo_id)
    uploads = check_uploads(uploads)
    tok = _token(token, repo_id)
    api = HfApi(token=tok, library_name="rompatch", library_version=__version__)
    branch = revision if revision not in (None, "main") else None
    with hub_errors(f"push to {repo_id}", repo_id=repo_id, revision=revision, token=tok):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not api.repo_info(repo_id).private:
            raise HubError(
                f"{repo_id} already exists and is public, but --private was asked; make it private on the "
                "Hub first, or push without --private; nothing was pushed",
                repo_id=repo_id,
            )
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        # One consistent snapshot: the card is built from this commit, and the push is refused by
        # the Hub if the branch moved meanwhile (parent_commit), instead of dropping others' patches.
        parent = api.repo_info(repo_id, revision=branch).sha
        existing = api.list_repo_files(repo_id, revision=parent)
    card = _card(
        api,
        repo_id,
        parent,
        existing,
        uploads,
        load=load,
        token=tok,
        revision=revision,
        base_model=base_model,
    )
    ops = [CommitOperationAdd(path_in_repo=u.name, path_or_fileobj=u.data) for u in uploads]
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
    with hub_errors(f"push to {repo_id}", repo_id=repo_id, revision=revision, token=tok):
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=message or default_message(uploads),
            revision=branch,
            parent_commit=parent,
        )
    log.info(
        "pushed %s to %s (%s)", ", ".join(sorted(u.name for u in uploads)), repo_id, getattr(info, "oid", "")
    )
    return info
