"""The Hub's side of sharing: references, the environment, errors, the cache, finding and fetching files.

``pull.py``, ``push.py`` and ``Patch``'s Hub methods (``mixin.py``) are built on this module; it
knows nothing of the patch format beyond "a safetensors file whose metadata says rompatch", so every
module of the package can use it.

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

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._version import __version__
from ..errors import HubConnectionError, HubError, PatchFormatError, RompatchError
from ..safetensors_io import read_metadata

log = logging.getLogger(__name__)
T = TypeVar("T")

PATCH_SUFFIX = ".safetensors"
CARD_FILE = "README.md"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TRUE = {"1", "ON", "YES", "TRUE"}


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


def is_repo_id(repo_id: object) -> bool:
    """Whether ``repo_id`` is a valid ``USER/REPO`` (or ``ORG/REPO``) Hub repo id."""
    return (
        isinstance(repo_id, str)
        and bool(_REPO_ID.match(repo_id))
        and "--" not in repo_id
        and ".." not in repo_id
    )


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
    if not is_repo_id(repo_id):
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


# ------------------------------------------------------------------------------- local or Hub


def is_local_path(ref: str | os.PathLike) -> bool:
    """True when ``ref`` can only mean a local path, never a Hub reference or id: an ``os.PathLike``,
    or a string that starts with ``/``, ``./``, ``../`` or ``~`` (or is ``.``/``..``, or uses the
    platform's own separator where that is not ``/``)."""
    if isinstance(ref, os.PathLike):
        return True
    return (
        ref in (".", "..")
        or ref.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.sep != "/"
        and os.sep in ref
    )


def is_local_patch_ref(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a local patch file rather than a Hub reference.

    Local: an existing path, anything :func:`is_local_path` accepts, and a ``*.safetensors`` name
    with at most one ``/`` (``edit.safetensors``, ``patches/edit.safetensors``): a Hub reference to
    a file is ``USER/REPO/FILE.safetensors``.
    """
    if is_local_path(ref) or os.path.exists(ref):
        return True
    return ref.endswith(PATCH_SUFFIX) and ref.count("/") <= 1


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
    r = _probe(repo_id, repo_type, timeout)
    if isinstance(r, Exception):
        return f"the Hub at {endpoint()} did not answer ({type(r).__name__})"
    if r.status_code >= 400:
        return f"the Hub at {endpoint()} has no readable {repo_type} {repo_id} (HTTP {r.status_code})"
    return None


def _probe(repo_id: str, repo_type: str, timeout: float) -> Any:
    """One HEAD request on ``repo_id``'s API page (no retries): the response, or the exception that
    stopped it (connection refused, DNS, timeout, proxy: the Hub is not reachable)."""
    from huggingface_hub import get_session

    try:
        return get_session().head(f"{endpoint().rstrip('/')}/api/{repo_type}s/{repo_id}", timeout=timeout)
    except Exception as e:
        return e


def _endpoint_unreachable(repo_id: str, timeout: float = 3.0) -> bool:
    """Whether one request to the Hub for ``repo_id`` fails to connect at all. An HTTP answer of any
    status counts as reachable: a private repo answers 401 to a request without token."""
    return isinstance(_probe(repo_id, "model", timeout), Exception)


def endpoint() -> str:
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


@dataclass(frozen=True)
class _Attempt:
    """What was being done when huggingface_hub failed: the words of the one-line error."""

    action: str
    repo_id: str
    filename: str | None
    revision: str | None
    offline_fix: str

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def where(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id


def _not_cached(a: _Attempt) -> str:
    if is_offline():
        return (
            f"{a.where}@{a.rev} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"{a.offline_fix}"
        )
    return (
        f"{endpoint()} is unreachable and {a.where}@{a.rev} is not in the Hugging Face cache; "
        "check the network connection or HF_ENDPOINT"
    )


def _http_refusal(e: Exception, a: _Attempt) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return (
            "the Hub refused the credentials (401 Unauthorized); set a valid HF_TOKEN or run `hf auth login`"
        )
    if status in (409, 412) and "push" in a.action:
        return f"{a.repo_id}@{a.rev} changed while pushing (someone else pushed); push again, nothing was written"
    if status == 403:
        return (
            f"this token may not write to {a.repo_id} (403 Forbidden); use a token "
            "with write access to that namespace, or push to your own namespace"
        )
    server = getattr(e, "server_message", None) or _first_line(e)
    return f"the Hub answered {status} for {a.where} ({server.splitlines()[0]})"


def _explain(e: Exception, a: _Attempt) -> str | None:
    """What went wrong and what to do, for a huggingface_hub failure; None for anything else."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.HFValidationError):
        return (
            f"'{a.repo_id}' is neither an existing local folder nor a valid Hub repo id; "
            "pass a local folder or USER/REPO"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return f"revision '{a.rev}' does not exist in {a.repo_id} on {endpoint()}; check the branch, tag or commit name"
    if isinstance(e, hf.GatedRepoError):
        return (
            f"{a.repo_id} is gated; request access on its Hub page and use a token "
            "that has it (HF_TOKEN or `hf auth login`)"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return (
            f"repository {a.repo_id} not found on {endpoint()} (or it is private and "
            "your token cannot see it); check the name, or log in with a token that has access "
            "(HF_TOKEN or `hf auth login`)"
        )
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return _not_cached(a)
    if isinstance(e, hf.EntryNotFoundError):
        return (
            f"{a.filename or 'the file'} does not exist in {a.repo_id} at revision '{a.rev}'; "
            f"check the path (list the repo's files on {endpoint()}/{a.repo_id}/tree/{a.rev})"
        )
    if isinstance(e, hf.HfHubHTTPError):
        return _http_refusal(e, a)
    return None


@contextmanager
def hub_errors(
    action: str,
    *,
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    offline_fix: str = "run `rompatch pull` once with network access, or unset HF_HUB_OFFLINE",
) -> Iterator[None]:
    """Turn huggingface_hub/network exceptions into one-line HubErrors without the token.

    The one mapping of Hub failures in rompatch (patches, model cards and checkpoints alike).
    ``offline_fix`` is what to do when the file is not cached and HF_HUB_OFFLINE forbids fetching it.
    A failed connection is a ``HubConnectionError``; anything unexpected is re-raised as it is.
    """
    import httpx2

    try:
        yield
    except RompatchError:
        raise
    except Exception as e:
        why = _explain(e, _Attempt(action, repo_id, filename, revision, offline_fix))
        if why is not None:
            raise HubError(_scrub(f"cannot {action}: {why}", token), repo_id=repo_id) from None
        if isinstance(e, (httpx2.HTTPError, ConnectionError, TimeoutError, OSError)):
            msg = (
                f"cannot {action}: the connection to {endpoint()} failed ({type(e).__name__}: "
                f"{_first_line(e)}); check the network connection or HF_ENDPOINT and try again"
            )
            raise HubConnectionError(_scrub(msg, token), repo_id=repo_id) from None
        raise


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


def _is_patch_meta(meta: dict | None) -> bool:
    return bool(meta) and meta.get("format") == "rompatch"


# ---------------------------------------------------------------------------------- discovery


def remote_patch_files(api: Any, repo_id: str, revision: str | None, files: Sequence[str]) -> list[str]:
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
        if _is_patch_meta(read_metadata(p)):
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


def find_patch_file(ref: HubRef) -> str:
    if is_offline():
        return _choose(
            ref.repo_id, ref.revision, _cached_patch_files(ref.repo_id, ref.revision), cached_only=True
        )
    from huggingface_hub import HfApi

    api = HfApi(library_name="rompatch", library_version=__version__)
    try:
        with hub_errors(f"list the files of {ref.repo_id}", repo_id=ref.repo_id, revision=ref.revision):
            files = api.list_repo_files(ref.repo_id, revision=ref.revision)
            found = remote_patch_files(api, ref.repo_id, ref.revision, files)
    except HubConnectionError as e:
        cached = _cached_patch_files(ref.repo_id, ref.revision)
        if len(cached) != 1:
            raise
        log.warning("%s; using the patch cached for %s: %s", e, ref, cached[0])
        return cached[0]
    return _choose(ref.repo_id, ref.revision, found, cached_only=False)


# ------------------------------------------------------------------------------------ pulling


def download(
    repo_id: str, filename: str, revision: str | None, *, action: str = "download", token: str | None = None
) -> Path:
    from huggingface_hub import hf_hub_download

    guard = _CacheGuard(repo_id)
    # One quick probe first: where the Hub cannot be reached, the cache alone answers (as offline)
    # instead of huggingface_hub's retries, which take about 25 s and print a warning each.
    cache_only = is_offline() or _endpoint_unreachable(repo_id)
    try:
        with hub_errors(action, repo_id=repo_id, filename=filename, revision=revision, token=token):
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                local_files_only=cache_only,
                library_name="rompatch",
                library_version=__version__,
            )
    except BaseException:
        guard.rollback()
        raise
    return Path(path)


# ----------------------------------------------------------------------------------- fetching


def snapshot(repo_id: str, patterns: Sequence[str], *, revision: str | None, action: str) -> Path:
    """The files of ``repo_id`` matching ``patterns`` at ``revision``, in the Hugging Face cache
    (``snapshot_download``; from the cache alone under HF_HUB_OFFLINE). Returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    with hub_errors(
        action,
        repo_id=repo_id,
        revision=revision,
        offline_fix="fetch it once with network access (HF_HUB_OFFLINE unset), or pass a local folder",
    ):
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(patterns),
                local_files_only=is_offline(),
                library_name="rompatch",
                library_version=__version__,
            )
        )


def fetch_patch(ref: str, load: Callable[[Path], T], *, revision: str | None = None) -> tuple[T, Path, str]:
    """Download the patch file ``ref`` names into the Hugging Face cache and ``load`` it; returns
    what ``load`` gave, the cached file and its path inside the repo.

    ``load`` (``rompatch.patch.load_patch`` or ``Patch.load``) validates it; a file that is not a
    valid patch is a ``PatchFormatError`` naming the repo, file and revision.
    """
    r = parse_ref(ref, revision=revision)
    filename = r.path or find_patch_file(r)
    if filename.startswith("/") or any(part in ("", ".", "..") for part in filename.split("/")):
        raise HubError(
            f"{r.repo_id} lists an unsafe file path {filename!r}; refusing to download it", repo_id=r.repo_id
        )
    cached = download(r.repo_id, filename, r.revision, action=f"download {r.repo_id}/{filename}")
    try:
        return load(cached), cached, filename
    except PatchFormatError as e:
        raise PatchFormatError(
            f"{r.repo_id}/{filename}@{r.revision or 'main'} is not a valid rompatch patch "
            f"({str(e).split(': ', 1)[-1]})"
        ) from None


def single_local_patch(folder: Path) -> Path:
    """The one patch file in a local folder (searched recursively); an error when there are none or several."""
    found = [p for p in sorted(folder.rglob(f"*{PATCH_SUFFIX}")) if _is_patch_meta(read_metadata(p))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PatchFormatError(
            f"{folder}: no rompatch patch (*.safetensors with rompatch metadata) in this folder"
        )
    raise PatchFormatError(
        f"{folder} holds {len(found)} patches ({', '.join(p.name for p in found[:10])}); pass one file"
    )


__all__ = [
    "HubRef",
    "endpoint",
    "fetch_patch",
    "hub_errors",
    "hub_unavailable",
    "is_local_patch_ref",
    "is_local_path",
    "is_repo_id",
    "is_offline",
    "parse_ref",
    "single_local_patch",
    "snapshot",
]
