"""The Hub's state in memory: repos, commits, files, revisions, and who may see and write them."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from tests.helpers.hubserver.responses import HubError

TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HEX40_RE = re.compile(r"^[0-9a-f]{40}$")


DEFAULT_GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)  # fmt: skip


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ``ETag`` and ``oid`` of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file (or symlink to one) under ``root``, relative and sorted: handy to assert what a download left."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        out.extend(os.path.relpath(os.path.join(dirpath, name), root) for name in filenames)
    return sorted(out)


def now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch (or "refs/pr/N") -> commit oid
    n_prs: int = 0


def normalize_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class StoreMixin:
    """The repos in memory: seeding and inspection (public), commits, revisions, access."""

    orgs: dict[str, set[str]]
    initial_gitattributes: bool
    _lock: threading.RLock
    _repos: dict[tuple[str, str], Repo]
    _commit_counter: int
    endpoint: str  # HubServer.endpoint

    # ------------------------------------------------------------------ seeding and inspection

    def seed_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        owner: str | None = None,
        private: bool = False,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Seed commit",
    ) -> str:
        """Create the repo if needed and commit ``files`` to ``branch`` directly; return the commit id."""
        owner = owner or repo_id.split("/")[0]
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._new_repo(repo_type, repo_id, owner, private)
            base = repo.refs.get(branch, repo.refs.get("main"))
            content = dict(repo.commits[base].files) if base else {}
            for path, data in (files or {}).items():
                content[normalize_path(path)] = data.encode() if isinstance(data, str) else bytes(data)
            commit = self._make_commit(repo, base, content, message, "", owner)
            repo.refs[branch] = commit.oid
            return commit.oid

    def repo_files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """Files of ``repo_id`` at ``revision`` (branch or commit id), read straight from memory."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """``branch -> commit id`` (pull-request refs included as ``refs/pr/N``)."""
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].refs)

    def commit_history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit ids reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return [c.oid for c in self._history(repo, self._resolve(repo, revision))]

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repos[(repo_type, repo_id)].private

    # ------------------------------------------------------------------ internals: state

    def _new_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, owner=owner, private=private, created_at=now_iso())
        self._repos[(repo_type, repo_id)] = repo
        if self.initial_gitattributes:
            commit = self._make_commit(
                repo, None, {".gitattributes": DEFAULT_GITATTRIBUTES}, "initial commit", "", owner
            )
            repo.refs["main"] = commit.oid
        return repo

    def _make_commit(
        self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> Commit:
        self._commit_counter += 1
        seed = json.dumps(
            [
                repo.repo_id,
                parent,
                sorted((p, git_blob_sha1(d)) for p, d in files.items()),
                title,
                self._commit_counter,
            ]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, parent, files, title, message, author, now_iso())
        repo.commits[oid] = commit
        return commit

    @staticmethod
    def _history(repo: Repo, oid: str | None) -> list[Commit]:
        out = []
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        rev = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        oid = repo.refs.get(rev)
        if oid is not None:
            return oid
        if HEX40_RE.match(rev.lower()) and rev.lower() in repo.commits:
            return rev.lower()
        if rev in repo.refs or (rev == "main" and not repo.commits):
            raise HubError(404, f"Revision {rev!r} has no commit yet", code="RevisionNotFound")
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _can_write_namespace(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, set())

    def _visible_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (
            repo.private and (user is None or not self._can_write_namespace(user, repo.owner))
        ):
            raise HubError(
                401 if user is None else 404,
                "Repository not found",
                code="RepoNotFound",
            )
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._visible_repo(repo_type, repo_id, user)  # first: do not reveal private repos
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository (no token was sent)")
        if not self._can_write_namespace(user, repo.owner):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
