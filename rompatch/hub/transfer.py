"""Share patches through the Hugging Face Hub: references, push, pull (``Patch``'s Hub methods call these).

A Hub reference is ``REPO_ID[/path/in/repo.safetensors][@REVISION]``:

- ``alice/eiffel-rome``: the repo's one patch (a ``*.safetensors`` with rompatch metadata); a repo
  holding several is an error that lists them;
- ``alice/eiffel-rome/edits/eiffel.safetensors``: that file;
- ``alice/eiffel-rome@v1`` or ``revision="v1"``: a branch, tag or commit (giving two different ones is an error).

Everything goes through ``huggingface_hub``: its endpoint (``HF_ENDPOINT``), token (``HF_TOKEN`` or
``hf auth login``) and cache. With ``HF_HUB_OFFLINE=1`` nothing touches the network and references
resolve from the cache; a miss is a one-line ``HubError``. Every failure is a one-line ``HubError``
that never contains the token, and leaves nothing behind: a download is complete in the cache and
copied atomically into ``local_dir``, or there is no file at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_write
from ..errors import HubConnectionError, HubError, PatchFormatError, RompatchError
from ..patch import Patch, _validate, load_patch, to_metadata, to_tensors
from ..refs import PatchesLike, flatten_patches, is_local_patch_ref
from .modelcard import render_card

log = logging.getLogger(__name__)

PATCH_SUFFIX = ".safetensors"
CARD_FILE = "README.md"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HEADER_MAX = 100_000_000  # a safetensors header larger than this is not a patch


# ----------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub reference: repo, optional file inside it, optional revision."""

    repo_id: str
    path: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        s = self.repo_id + (f"/{self.path}" if self.path else "")
        return s + (f"@{self.revision}" if self.revision else "")


def parse_ref(ref: str, *, revision: str | None = None) -> HubRef:
    """Parse ``user/repo[/path/in/repo.safetensors][@rev]``. ``revision`` fills in a missing ``@rev``."""
    if not isinstance(ref, str) or not ref.strip():
        raise HubError("empty Hub reference; pass USER/REPO[/file.safetensors][@REVISION]")
    text = ref.strip()
    rev: str | None = None
    if "@" in text:
        text, rev = text.split("@", 1)
        if not rev:
            raise HubError(f"'{ref}': nothing after '@'; write REPO_ID@REVISION (a branch, tag or commit)")
    if revision is not None and rev is not None and revision != rev:
        raise HubError(
            f"'{ref}' names revision '{rev}' but revision '{revision}' was also given; pass only one"
        )
    rev = rev if rev is not None else revision
    parts = text.strip("/").split("/")
    if len(parts) < 2:
        raise HubError(
            f"'{ref}' is neither an existing patch file nor a Hub reference; "
            "write a local path or USER/REPO[/file.safetensors][@REVISION]"
        )
    repo_id = "/".join(parts[:2])
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(
            f"'{repo_id}' is not a valid Hub repo id; use letters, digits, '-', '_' and '.' as in USER/REPO"
        )
    path = "/".join(parts[2:]) or None
    if path is not None:
        if any(p in ("", ".", "..") for p in parts[2:]):
            raise HubError(f"'{ref}': the path inside the repo, '{path}', has empty or '.'/'..' parts")
        if not path.endswith(PATCH_SUFFIX):
            raise HubError(
                f"'{ref}': '{path}' is not a patch file; a path inside the repo must end in {PATCH_SUFFIX}"
            )
    return HubRef(repo_id=repo_id, path=path, revision=rev)


# ------------------------------------------------------------------------------- environment


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as huggingface_hub read it at import or as set now."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in _TRUE


def hub_unavailable(repo_id: str, *, repo_type: str = "model", timeout: float = 3.0) -> str | None:
    """Why ``repo_id`` cannot be read from the Hub now, or None when it can.

    One probe (a HEAD request on the repo's API page, no retries, ``timeout`` seconds), so that a
    machine without the Hub learns it in seconds instead of minutes of retry warnings.
    ``HF_HUB_OFFLINE`` answers without a request.
    """
    if is_offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import get_session

    url = f"{_endpoint().rstrip('/')}/api/{repo_type}s/{repo_id}"
    try:
        r = get_session().head(url, timeout=timeout)
    except Exception as e:  # connection refused, DNS, timeout, proxy: all mean "not reachable"
        return f"the Hub at {_endpoint()} did not answer ({type(e).__name__})"
    if r.status_code >= 400:
        return f"the Hub at {_endpoint()} has no readable {repo_type} {repo_id} (HTTP {r.status_code})"
    return None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _scrub(msg: str, token: str | None = None) -> str:
    if token:
        msg = msg.replace(token, "***")
    msg = _TOKEN_LIKE.sub("hf_***", msg)
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", msg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


@contextmanager
def _hub_errors(
    action: str,
    *,
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Iterator[None]:
    """Turn huggingface_hub/network exceptions into one-line HubErrors without the token."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    where = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except RompatchError:
        raise
    except Exception as e:  # mapped below; anything unexpected is re-raised as is
        if isinstance(e, RevisionNotFoundError):
            msg = (
                f"cannot {action}: revision '{rev}' does not exist in {repo_id} on {_endpoint()}; "
                "check the branch, tag or commit name"
            )
        elif isinstance(e, GatedRepoError):
            msg = (
                f"cannot {action}: {repo_id} is gated; request access on its Hub page and use a token "
                "that has it (HF_TOKEN or `hf auth login`)"
            )
        elif isinstance(e, RepositoryNotFoundError):
            msg = (
                f"cannot {action}: repository {repo_id} not found on {_endpoint()} (or it is private and "
                "your token cannot see it); check the name, or log in with a token that has access "
                "(HF_TOKEN or `hf auth login`)"
            )
        elif isinstance(e, LocalEntryNotFoundError) or isinstance(e, OfflineModeIsEnabled):
            if is_offline():
                msg = (
                    f"cannot {action}: {where}@{rev} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
                    "forbids downloading it; run `rompatch pull` once with network access, or unset HF_HUB_OFFLINE"
                )
            else:
                msg = (
                    f"cannot {action}: {_endpoint()} is unreachable and {where}@{rev} is not in the "
                    "Hugging Face cache; check the network connection or HF_ENDPOINT"
                )
        elif isinstance(e, EntryNotFoundError):
            msg = (
                f"cannot {action}: {filename or 'the file'} does not exist in {repo_id} at revision '{rev}'; "
                f"check the path (list the repo's files on {_endpoint()}/{repo_id}/tree/{rev})"
            )
        elif isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401:
                msg = (
                    f"cannot {action}: the Hub refused the credentials (401 Unauthorized); set a valid "
                    "HF_TOKEN or run `hf auth login`"
                )
            elif status in (409, 412) and "push" in action:
                msg = (
                    f"cannot {action}: {repo_id}@{rev} changed while pushing (someone else pushed); "
                    "push again, nothing was written"
                )
            elif status == 403:
                msg = (
                    f"cannot {action}: this token may not write to {repo_id} (403 Forbidden); use a token "
                    "with write access to that namespace, or push to your own namespace"
                )
            else:
                server = getattr(e, "server_message", None) or _first_line(e)
                msg = f"cannot {action}: the Hub answered {status} for {where} ({server.splitlines()[0]})"
        elif isinstance(e, (httpx2.HTTPError, ConnectionError, TimeoutError, OSError)):
            msg = (
                f"cannot {action}: the connection to {_endpoint()} failed ({type(e).__name__}: "
                f"{_first_line(e)}); check the network connection or HF_ENDPOINT and try again"
            )
            raise HubConnectionError(_scrub(msg, token), repo_id=repo_id) from None
        else:
            raise
        raise HubError(_scrub(msg, token), repo_id=repo_id) from None


# ------------------------------------------------------------------------------------ the cache


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _lock_dir(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / ".locks" / repo_folder_name(repo_id=repo_id, repo_type="model")


def _listing(root: Path) -> set[str]:
    if not root.exists():
        return set()
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


class _CacheGuard:
    """Remove what a failed download created in the cache: partial blobs, 404 markers, new folders."""

    def __init__(self, repo_id: str) -> None:
        self.roots = [_storage(repo_id), _lock_dir(repo_id)]
        self.before = {r: (r.exists(), _listing(r)) for r in self.roots}

    def rollback(self) -> None:
        """Delete only debris: partial blobs, lock files, 404 markers, refs without any snapshot, and
        the folders left empty. Complete files (maybe from a concurrent download) are never touched."""
        for root, (existed, before) in self.before.items():
            try:
                new = _listing(root) - before
                has_snapshots = any(p.startswith("snapshots" + os.sep) for p in _listing(root))
                for rel in sorted(new, key=lambda p: -p.count(os.sep)):
                    p = root / rel
                    if p.is_symlink() or p.is_file():
                        debris = p.name.endswith((".incomplete", ".lock")) or rel.startswith(".no_exist")
                        if debris or (rel.startswith("refs" + os.sep) and not has_snapshots):
                            p.unlink(missing_ok=True)
                    elif p.is_dir() and not any(p.iterdir()):
                        p.rmdir()
                if not existed and root.is_dir() and not any(root.iterdir()):
                    root.rmdir()
            except OSError as e:  # cleaning up must never hide the real error
                log.debug("could not clean %s: %s", root, e)


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    ref = _storage(repo_id) / "refs" / rev
    return ref.read_text().strip() if ref.is_file() else None


def _read_header_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a local safetensors file, or None when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_MAX:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _is_patch_meta(meta: dict | None) -> bool:
    return bool(meta) and meta.get("format") == "rompatch"


# ---------------------------------------------------------------------------------- discovery


def _remote_patch_files(api: Any, repo_id: str, revision: str | None, files: Sequence[str]) -> list[str]:
    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    found = []
    for f in files:
        if not f.endswith(PATCH_SUFFIX):
            continue
        try:
            meta = api.parse_safetensors_file_metadata(repo_id, f, revision=revision).metadata
        except (SafetensorsParsingError, NotASafetensorsRepoError):
            continue
        if _is_patch_meta(meta):
            found.append(f)
    return found


def _cached_patch_files(repo_id: str, revision: str | None) -> list[str]:
    commit = _cached_commit(repo_id, revision)
    if commit is None:
        return []
    snap = _storage(repo_id) / "snapshots" / commit
    if not snap.is_dir():
        return []
    out = []
    for p in sorted(snap.rglob(f"*{PATCH_SUFFIX}")):
        if _is_patch_meta(_read_header_metadata(p)):
            out.append(p.relative_to(snap).as_posix())
    return out


def _choose(repo_id: str, revision: str | None, found: list[str], *, cached_only: bool) -> str:
    rev = revision or "main"
    if len(found) == 1:
        return found[0]
    if not found:
        if cached_only:
            raise HubError(
                f"no patch of {repo_id}@{rev} is in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                "downloading; run `rompatch pull` once with network access, or unset HF_HUB_OFFLINE",
                repo_id=repo_id,
            )
        raise HubError(
            f"{repo_id}@{rev} holds no rompatch patch (a .safetensors file with rompatch metadata); "
            "check the repo id and revision",
            repo_id=repo_id,
        )
    names = ", ".join(found[:10]) + (f", ... ({len(found) - 10} more)" if len(found) > 10 else "")
    raise HubError(
        f"{repo_id}@{rev} holds {len(found)} patches{' in the cache' if cached_only else ''} ({names}); "
        f"name one, e.g. {repo_id}/{found[0]}",
        repo_id=repo_id,
    )


def _find_patch_file(ref: HubRef) -> str:
    if is_offline():
        return _choose(
            ref.repo_id, ref.revision, _cached_patch_files(ref.repo_id, ref.revision), cached_only=True
        )
    from huggingface_hub import HfApi

    api = HfApi(library_name="rompatch", library_version=__version__)
    try:
        with _hub_errors(f"list the files of {ref.repo_id}", repo_id=ref.repo_id, revision=ref.revision):
            files = api.list_repo_files(ref.repo_id, revision=ref.revision)
            found = _remote_patch_files(api, ref.repo_id, ref.revision, files)
    except HubConnectionError as e:
        cached = _cached_patch_files(ref.repo_id, ref.revision)
        if len(cached) != 1:
            raise
        log.warning("%s; using the patch cached for %s: %s", e, ref, cached[0])
        return cached[0]
    return _choose(ref.repo_id, ref.revision, found, cached_only=False)


# ------------------------------------------------------------------------------------ pulling


def _download(
    repo_id: str, filename: str, revision: str | None, *, action: str = "download", token: str | None = None
) -> Path:
    from huggingface_hub import hf_hub_download

    guard = _CacheGuard(repo_id)
    try:
        with _hub_errors(action, repo_id=repo_id, filename=filename, revision=revision, token=token):
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                local_files_only=is_offline(),
                library_name="rompatch",
                library_version=__version__,
            )
    except BaseException:
        guard.rollback()
        raise
    return Path(path)


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
    filename = r.path or _find_patch_file(r)
    if filename.startswith("/") or any(part in ("", ".", "..") for part in filename.split("/")):
        raise HubError(
            f"{r.repo_id} lists an unsafe file path {filename!r}; refusing to download it", repo_id=r.repo_id
        )
    cached = _download(r.repo_id, filename, r.revision, action=f"download {r.repo_id}/{filename}")
    try:
        load_patch(cached)
    except PatchFormatError as e:
        raise PatchFormatError(
            f"{r.repo_id}/{filename}@{r.revision or 'main'} is not a valid rompatch patch "
            f"({str(e).split(': ', 1)[-1]})"
        ) from None
    if local_dir is None:
        return cached
    dest = Path(local_dir) / filename
    atomic_write(dest, lambda tmp: shutil.copyfile(cached, tmp))
    log.info("pulled %s into %s", r, dest)
    return dest


def resolve_hub_patch(ref: str, revision: str | None = None) -> Patch:
    """Load the patch a Hub reference points to (downloading it into the HF cache if needed)."""
    return load_patch(pull_patch(ref, revision=revision))


# ------------------------------------------------------------------------------------- pushing


@dataclass
class _Upload:
    name: str
    patch: Patch
    data: bytes


def _serialize(patch: Patch) -> tuple[Patch, bytes]:
    from safetensors.torch import save

    _validate(patch)
    meta = to_metadata(patch)
    data = save(to_tensors(patch), metadata=meta)
    return dataclasses.replace(patch, created_at=meta["created_at"]), data


def _prepare(patches: PatchesLike, filenames: Sequence[str] | None) -> list[_Upload]:
    items = flatten_patches(patches)
    if not items:
        raise HubError("nothing to push; pass at least one patch")
    if filenames is not None and len(filenames) != len(items):
        raise HubError(f"{len(filenames)} file names for {len(items)} patches; pass one name per patch")
    uploads: list[_Upload] = []
    for i, item in enumerate(items):
        name = filenames[i] if filenames is not None else None
        if isinstance(item, Patch):
            patch, data = _serialize(item)
            name = name or f"patch-{patch.short_id}{PATCH_SUFFIX}"
        elif is_local_patch_ref(item):
            patch = load_patch(Path(item).expanduser())
            data = Path(item).expanduser().read_bytes()
            name = name or Path(item).name
        else:
            path = pull_patch(str(item))
            patch = load_patch(path)
            data = path.read_bytes()
            name = name or path.name
        if not name.endswith(PATCH_SUFFIX) or name.startswith("/") or ".." in name.split("/"):
            raise HubError(
                f"'{name}': a patch's name in the repo must be a relative path ending in {PATCH_SUFFIX}"
            )
        uploads.append(_Upload(name=name, patch=patch, data=data))
    by_name: dict[str, str] = {}
    for u in uploads:
        if by_name.setdefault(u.name, u.patch.id) != u.patch.id:
            raise HubError(
                f"two different patches would both be uploaded as '{u.name}'; rename one of the files"
            )
    unique: dict[str, _Upload] = {u.name: u for u in uploads}
    return list(unique.values())


def _default_message(uploads: Sequence[_Upload]) -> str:
    if len(uploads) == 1:
        u = uploads[0]
        r = next((d.request for d in u.patch.deltas if d.request is not None), None)
        what = f" ({r.subject}: {r.target_true or '?'} → {r.target_new})" if r is not None else ""
        return f"Add rompatch patch {u.name}{what}"
    return f"Add {len(uploads)} rompatch patches: " + ", ".join(u.name for u in uploads)


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
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(f"'{repo_id}' is not a valid Hub repo id; write USER/REPO (or ORG/REPO)")
    uploads = _prepare(patches, filenames)  # reads and validates everything before any network call
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
    api = HfApi(token=tok, library_name="rompatch", library_version=__version__)
    branch = revision if revision not in (None, "main") else None
    with _hub_errors(f"push to {repo_id}", repo_id=repo_id, revision=revision, token=tok):
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
    ours = {u.name for u in uploads}
    entries = [(u.name, u.patch) for u in uploads]
    old_card: str | None = None
    if CARD_FILE in existing:
        card_path = _download(
            repo_id, CARD_FILE, parent, action=f"read the model card of {repo_id}", token=tok
        )
        old_card = card_path.read_text(encoding="utf-8", errors="replace")
    with _hub_errors(f"read the patches already in {repo_id}", repo_id=repo_id, revision=revision, token=tok):
        others = _remote_patch_files(api, repo_id, parent, [f for f in existing if f not in ours])
    for f in others:
        try:
            entries.append((f, load_patch(_download(repo_id, f, parent, token=tok))))
        except PatchFormatError as e:
            log.warning("%s/%s is left out of the model card: %s", repo_id, f, e)
    card = render_card(entries, repo_id=repo_id, existing=old_card, base_model=base_model)
    ops = [CommitOperationAdd(path_in_repo=u.name, path_or_fileobj=u.data) for u in uploads]
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
    with _hub_errors(f"push to {repo_id}", repo_id=repo_id, revision=revision, token=tok):
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=message or _default_message(uploads),
            revision=branch,
            parent_commit=parent,
        )
    log.info("pushed %s to %s (%s)", ", ".join(sorted(ours)), repo_id, getattr(info, "oid", ""))
    return info


# ------------------------------------------------------------------- behind Patch.from_pretrained


def _single_local_patch(folder: Path) -> Path:
    found = [p for p in sorted(folder.rglob(f"*{PATCH_SUFFIX}")) if _is_patch_meta(_read_header_metadata(p))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PatchFormatError(
            f"{folder}: no rompatch patch (*.safetensors with rompatch metadata) in this folder"
        )
    raise PatchFormatError(
        f"{folder} holds {len(found)} patches ({', '.join(p.name for p in found[:10])}); pass one file"
    )


def from_pretrained(ref: str | os.PathLike, revision: str | None = None) -> Patch:
    """Load a patch from a local file, a local folder holding one patch, or a Hub reference
    (what ``Patch.from_pretrained`` does)."""
    if is_local_patch_ref(ref):  # never sent to the Hub, so a missing file is reported as one
        path = Path(ref).expanduser()
        return load_patch(_single_local_patch(path) if path.is_dir() else path)
    return resolve_hub_patch(str(ref), revision=revision)


__all__ = [
    "HubRef",
    "parse_ref",
    "pull_patch",
    "push_patch",
    "resolve_hub_patch",
    "is_offline",
    "from_pretrained",
]
