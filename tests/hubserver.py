"""An in-memory, Hugging Face Hub-compatible HTTP server for tests.

The real ``huggingface_hub`` client (2.4.0) talks to it through ``HF_ENDPOINT`` (see
``tests/conftest_hub.py`` for what has to be patched besides the environment variable).
Standard library only.

What it serves, modelled on what the 2.4.0 client sends and parses:

* ``GET  /api/whoami-v2``
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``
* ``GET  /api/{models,datasets,spaces}/{ns}/{name}[/revision/{rev}]`` (repo info, ``blobs=true``)
* ``GET  /api/.../tree/{rev}[/{path}]`` (``recursive``), ``POST /api/.../paths-info/{rev}``
* ``GET  /api/.../refs``, ``GET /api/.../commits/{rev}``
* ``POST /api/.../preupload/{rev}``: every file is ``uploadMode: "regular"``, so the content travels
  base64-encoded inside the commit and neither LFS nor Xet is ever used
* ``POST /api/.../commit/{rev}`` (NDJSON: ``header``, ``file``, ``deletedFile``, ``deletedFolder``;
  ``create_pr=1``; ``parentCommit``)
* ``POST/DELETE /api/.../branch/{branch}``
* ``POST /api/validate-yaml`` (always valid)
* ``HEAD/GET /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``
  (git blob sha1, like the Hub for non-LFS files), ``Content-Length`` and ``Range`` support.

Behaviour that mirrors the real Hub on purpose (and may surprise):

* A new repo starts with an ``initial commit`` holding ``.gitattributes`` (pass
  ``initial_gitattributes=False`` to get an empty repo instead).
* Committing to (or pre-uploading for) a branch that does not exist is ``404 RevisionNotFound``
  ("Invalid rev id"), as on the Hub: create it with ``create_branch`` first. Set
  ``auto_create_branches=True`` to have such commits fork the branch from ``main`` instead.
* Unknown or private-and-not-yours repos: ``401`` for anonymous requests, ``404`` for authenticated
  ones, both with ``X-Error-Code: RepoNotFound`` (the client raises ``RepositoryNotFoundError``).
* A token that is not in ``tokens`` gets ``401 Invalid credentials in Authorization header`` on
  every route, public reads included.
* Writes without a token get ``401``; writes by a user who can see the repo but does not own it
  get ``403``.

Not modelled (differences from the real Hub to keep in mind):

* LFS/Xet storage. On the Hub, ``*.safetensors`` (matched by ``.gitattributes``) and large or binary
  files are LFS/Xet files: their ``ETag``/cache blob name is the sha256, they carry ``X-Xet-Hash`` and
  ``lfs`` metadata in tree listings, and ``/resolve`` may redirect to a CDN. Here every file is a plain
  git blob served inline.
* Discussions and pull-request APIs: ``create_pr=True`` works through ``create_commit``/``upload_file``
  (``?create_pr=1`` on the commit route) but not through ``upload_folder``, which with ``hf_xet``
  installed calls ``create_pull_request`` (``POST /api/.../discussions``, answered 404 here).
* Tags, gated repos, pagination (all listings fit in one page), rate limits.

Failure injection: :meth:`HubServer.fail_downloads_after`, :meth:`HubServer.break_next_download`,
:meth:`HubServer.fail_next_requests` and :meth:`HubServer.stop`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "RequestRecord", "git_blob_sha1", "list_files"]

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)

# Abridged version of the `.gitattributes` the Hub puts in the initial commit of a new repo.
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


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    author: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch (or "refs/pr/N") -> commit oid
    n_prs: int = 0


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the server (no credentials are kept, only the resolved user)."""

    method: str
    path: str
    user: str | None
    range: str | None = None


class HubError(Exception):
    """Turned into an HTTP error response; ``code`` becomes the ``X-Error-Code`` header."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body) if body is not None else {"error": message}


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None  # send only this many body bytes, then drop the connection


@dataclass
class _Injection:
    status: int
    remaining: int
    method: str | None
    path_contains: str | None
    message: str
    error_code: str | None


def _json_response(data: Any, status: int = 200) -> _Response:
    return _Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


def _normalize_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubServer:
    """In-memory Hub look-alike. Start it with :meth:`start`, point ``HF_ENDPOINT`` at :attr:`endpoint`.

    Args:
        tokens: mapping ``token -> username``. The mapping is live: :attr:`tokens` can be edited.
        orgs: mapping ``organization -> usernames`` whose members may write under the organization.
        host, port: where to listen (port 0: pick a free one).
        auto_create_branches: commit to a missing branch forks it from ``main`` instead of a 404.
        initial_gitattributes: new repos start with an initial commit holding ``.gitattributes``.
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        orgs: Mapping[str, Iterable[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        auto_create_branches: bool = False,
        initial_gitattributes: bool = True,
    ) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.orgs: dict[str, set[str]] = {org: set(members) for org, members in (orgs or {}).items()}
        self.auto_create_branches = auto_create_branches
        self.initial_gitattributes = initial_gitattributes
        self.requests: list[RequestRecord] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._commit_counter = 0
        self._download_cut: int | None = None
        self._break_next: list[int] = []
        self._injections: list[_Injection] = []
        self._connections: set[socket.socket] = set()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (clients then get connection errors)."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ failure injection

    def fail_downloads_after(self, n_bytes: int | None) -> None:
        """Make every file ``GET`` on ``/resolve`` die at byte offset ``n_bytes`` of the file.

        The full ``Content-Length`` is announced, the bytes before the offset are sent, then the
        connection is closed. Retries never get past the offset (a ``Range: bytes=n-`` resume gets its
        headers and no byte), so ``hf_hub_download`` gives up after its 5 retries and raises
        ``httpx2.RemoteProtocolError``. Those retries sleep 1 s each: patch
        ``huggingface_hub.file_download.time`` in the test to skip them. ``None`` turns the failure off.
        """
        with self._lock:
            self._download_cut = n_bytes

    def break_next_download(self, after_bytes: int = 0) -> None:
        """Cut the next file ``GET`` on ``/resolve`` after ``after_bytes`` bytes of its body, once.

        Later requests are served normally, so the client's retry succeeds (with ``Range`` from the last
        chunk it received; with the default 10 MB ``constants.DOWNLOAD_CHUNK_SIZE`` a small file is
        fetched again from byte 0). Calls stack: two calls break the next two downloads.
        """
        with self._lock:
            self._break_next.append(after_bytes)

    def fail_next_requests(
        self,
        status: int = 500,
        *,
        count: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        message: str = "Injected failure",
        error_code: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` (and ``X-Error-Message``).

        Note: the client retries some calls on 5xx/429 with sleeps of 1 s and more.
        """
        with self._lock:
            self._injections.append(
                _Injection(
                    status, count, method.upper() if method else None, path_contains, message, error_code
                )
            )

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
                content[_normalize_path(path)] = data.encode() if isinstance(data, str) else bytes(data)
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

    def _new_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> _Repo:
        repo = _Repo(
            repo_type=repo_type, repo_id=repo_id, owner=owner, private=private, created_at=_now_iso()
        )
        self._repos[(repo_type, repo_id)] = repo
        if self.initial_gitattributes:
            commit = self._make_commit(
                repo, None, {".gitattributes": DEFAULT_GITATTRIBUTES}, "initial commit", "", owner
            )
            repo.refs["main"] = commit.oid
        return repo

    def _make_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> _Commit:
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
        commit = _Commit(oid, parent, files, title, message, author, _now_iso())
        repo.commits[oid] = commit
        return commit

    @staticmethod
    def _history(repo: _Repo, oid: str | None) -> list[_Commit]:
        out = []
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        rev = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        oid = repo.refs.get(rev)
        if oid is not None:
            return oid
        if _HEX40_RE.match(rev.lower()) and rev.lower() in repo.commits:
            return rev.lower()
        if rev in repo.refs or (rev == "main" and not repo.commits):
            raise HubError(404, f"Revision {rev!r} has no commit yet", code="RevisionNotFound")
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _can_write_namespace(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, set())

    def _visible_repo(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
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

    def _writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        repo = self._visible_repo(repo_type, repo_id, user)  # first: do not reveal private repos
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository (no token was sent)")
        if not self._can_write_namespace(user, repo.owner):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo

    def _authenticate(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------ internals: dispatch

    def _handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> _Response:
        split = urlsplit(raw_path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        with self._lock:
            user: str | None = None
            try:
                user = self._authenticate(headers.get("Authorization"))
            finally:
                self.requests.append(RequestRecord(method, split.path, user, headers.get("Range")))
            self._check_injections(method, split.path)
            if segments and segments[0] == "api":
                return self._route_api(method, segments[1:], query, headers, body, user)
            if "resolve" in segments and method in ("GET", "HEAD"):
                return self._route_resolve(method, segments, headers, user)
            raise HubError(404, f"test hub server: no route for {method} {split.path}")

    def _check_injections(self, method: str, path: str) -> None:
        self._injections = [inj for inj in self._injections if inj.remaining > 0]
        for inj in self._injections:
            if inj.method is not None and inj.method != method:
                continue
            if inj.path_contains is not None and inj.path_contains not in path:
                continue
            inj.remaining -= 1
            raise HubError(inj.status, inj.message, code=inj.error_code)

    def _route_api(
        self,
        method: str,
        seg: list[str],
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
        user: str | None,
    ) -> _Response:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami(user)
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(_load_json(body), user)
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(_load_json(body), user)
        if seg == ["validate-yaml"] and method == "POST":
            return _json_response({"errors": [], "warnings": []})
        if len(seg) >= 3 and seg[0] in _TYPE_FROM_PLURAL:
            repo_type = _TYPE_FROM_PLURAL[seg[0]]
            repo_id = f"{seg[1]}/{seg[2]}"
            action, rest = (seg[3], seg[4:]) if len(seg) > 3 else (None, [])
            if action is None and method == "GET":
                return self._repo_info(repo_type, repo_id, None, query, user)
            if action == "revision" and method == "GET" and rest:
                return self._repo_info(repo_type, repo_id, "/".join(rest), query, user)
            if action == "tree" and method == "GET" and rest:
                return self._tree(repo_type, repo_id, rest[0], "/".join(rest[1:]), query, user)
            if action == "paths-info" and method == "POST" and rest:
                return self._paths_info(repo_type, repo_id, "/".join(rest), body, headers, user)
            if action == "refs" and method == "GET" and not rest:
                return self._refs(repo_type, repo_id, query, user)
            if action == "commits" and method == "GET" and rest:
                return self._commits(repo_type, repo_id, "/".join(rest), user)
            if action == "preupload" and method == "POST" and rest:
                return self._preupload(repo_type, repo_id, "/".join(rest), query, _load_json(body), user)
            if action == "commit" and method == "POST" and rest:
                return self._commit(repo_type, repo_id, "/".join(rest), query, body, user)
            if action == "branch" and rest and method in ("POST", "DELETE"):
                branch = "/".join(rest)
                if method == "POST":
                    return self._create_branch(repo_type, repo_id, branch, _load_json(body), user)
                return self._delete_branch(repo_type, repo_id, branch, user)
        raise HubError(404, f"test hub server: no route for {method} /api/{'/'.join(seg)}")

    # ------------------------------------------------------------------ API handlers

    def _whoami(self, user: str | None) -> _Response:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": "write"}
            for org, members in sorted(self.orgs.items())
            if user in members
        ]
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict, user: str | None) -> _Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository (no token was sent)")
        name = payload.get("name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not self._can_write_namespace(user, namespace):
            raise HubError(
                403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}"
            )
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            msg = f"You already created this {repo_type} repo"
            raise HubError(409, msg, body={"error": msg, "url": self._repo_url(existing)})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self._new_repo(repo_type, repo_id, namespace, private)
        return _json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict, user: str | None) -> _Response:
        namespace = payload.get("organization") or user or ""
        repo_type = payload.get("type") or "model"
        repo = self._writable_repo(repo_type, f"{namespace}/{payload.get('name')}", user)
        del self._repos[(repo.repo_type, repo.repo_id)]
        return _json_response({})

    def _repo_info(
        self, repo_type: str, repo_id: str, revision: str | None, query: dict[str, str], user: str | None
    ) -> _Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        oid = self._resolve(repo, revision or "main") if (revision or repo.commits) else None
        commit = repo.commits[oid] if oid else None
        files = commit.files if commit else {}
        with_blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(files[path]), blobId=git_blob_sha1(files[path]))
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.owner,
            "sha": oid,
            "lastModified": commit.date if commit else repo.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            info["spaces"] = []
        return _json_response(info)

    def _entries(self, files: Mapping[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
        base = f"{prefix}/" if prefix else ""
        folders: dict[str, list[str]] = {}
        out: list[dict[str, Any]] = []
        for path in sorted(files):
            if not path.startswith(base):
                continue
            rel = path[len(base) :]
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                folders.setdefault(folder, []).append(path)
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                out.append(self._file_entry(path, files[path]))
        for folder, members in folders.items():
            tree_id = hashlib.sha1(
                "\n".join(f"{m} {git_blob_sha1(files[m])}" for m in sorted(members)).encode()
            ).hexdigest()
            out.append({"type": "directory", "oid": tree_id, "size": 0, "path": folder})
        out.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        return out

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict[str, Any]:
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}

    def _tree(
        self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, str], user: str | None
    ) -> _Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        prefix = path.strip("/")
        entries = self._entries(files, prefix, query.get("recursive", "").lower() in ("1", "true"))
        if prefix and not entries:
            raise HubError(
                404, f"Entry not found: {prefix}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        return _json_response(entries)

    def _paths_info(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        body: bytes,
        headers: Mapping[str, str],
        user: str | None,
    ) -> _Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        if "json" in headers.get("Content-Type", ""):
            paths = _load_json(body).get("paths", [])
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        out = []
        for path in paths if isinstance(paths, list) else [paths]:
            path = str(path).strip("/")
            if path in files:
                out.append(self._file_entry(path, files[path]))
            elif path and any(p.startswith(path + "/") for p in files):
                members = sorted(p for p in files if p.startswith(path + "/"))
                tree_id = hashlib.sha1("\n".join(members).encode()).hexdigest()
                out.append({"type": "directory", "oid": tree_id, "size": 0, "path": path})
        return _json_response(out)

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, str], user: str | None) -> _Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.refs.items())
            if not name.startswith("refs/")
        ]
        data: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs"):
            data["pullRequests"] = [
                {"name": name, "ref": name, "targetCommit": oid}
                for name, oid in sorted(repo.refs.items())
                if name.startswith("refs/pr/")
            ]
        return _json_response(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str, user: str | None) -> _Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        history = self._history(repo, self._resolve(repo, revision))
        return _json_response(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": c.date,
                }
                for c in history
            ]
        )

    def _target_branch(self, repo: _Repo, revision: str, *, create_pr: bool) -> str:
        """The branch a preupload/commit for ``revision`` writes to; raises like the Hub if invalid."""
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if branch in repo.refs or (branch == "main" and not repo.refs):
            return branch
        if (
            create_pr
            or _HEX40_RE.match(branch)
            or branch.startswith("refs/")
            or not self.auto_create_branches
        ):
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return branch

    def _preupload(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, str],
        payload: dict,
        user: str | None,
    ) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        branch = self._target_branch(repo, revision, create_pr=bool(query.get("create_pr")))
        head = repo.refs.get(branch) or repo.refs.get("main")  # a branch to be auto-created forks main
        files = repo.commits[head].files if head else {}
        out = []
        for item in payload.get("files", []):
            path = _normalize_path(item.get("path"))
            entry: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in files:
                entry["oid"] = git_blob_sha1(files[path])
            out.append(entry)
        return _json_response({"files": out, "commitOid": head})

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, str],
        body: bytes,
        user: str | None,
    ) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        create_pr = bool(query.get("create_pr"))
        branch = self._target_branch(repo, revision, create_pr=create_pr)
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = lines[0].get("value") or {}
        base = repo.refs.get(branch) or repo.refs.get("main")
        parent_commit = header.get("parentCommit")
        if parent_commit and not (base or "").startswith(str(parent_commit).lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[base].files) if base else {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                path = _normalize_path(value.get("path"))
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        files[path] = base64.b64decode(content, validate=True)
                    except ValueError:
                        raise HubError(400, f"Invalid base64 content for {path!r}") from None
                else:
                    files[path] = str(content).encode()
            elif key == "deletedFile":
                path = _normalize_path(value.get("path"))
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                folder = _normalize_path(str(value.get("path", "")).rstrip("/"))
                doomed = [p for p in files if p.startswith(folder + "/")]
                if not doomed:
                    raise HubError(
                        404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound"
                    )
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(
                    400, "LFS files are not supported by the test Hub server (preupload says regular)"
                )
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary is required")
        pr_url = None
        if create_pr:
            repo.n_prs += 1
            branch = f"refs/pr/{repo.n_prs}"
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.n_prs}"
        commit = self._make_commit(repo, base, files, summary, header.get("description") or "", user or "")
        repo.refs[branch] = commit.oid
        data: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if pr_url is not None:
            data["pullRequestUrl"] = pr_url
        return _json_response(data)

    def _create_branch(
        self, repo_type: str, repo_id: str, branch: str, payload: dict, user: str | None
    ) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        if not branch or branch.startswith("refs/") or ".." in branch or _HEX40_RE.match(branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = payload.get("startingPoint") or "main"
        repo.refs[branch] = self._resolve(repo, starting_point)
        return _json_response({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str, user: str | None) -> _Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        if branch not in repo.refs:
            raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.refs[branch]
        return _json_response({})

    # ------------------------------------------------------------------ downloads

    def _route_resolve(
        self, method: str, segments: list[str], headers: Mapping[str, str], user: str | None
    ) -> _Response:
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type = _TYPE_FROM_PLURAL[segments[0]]
            segments = segments[1:]
        idx = segments.index("resolve") if "resolve" in segments else -1
        if idx != 2 or len(segments) < 5:
            raise HubError(404, "Not found")
        repo_id = f"{segments[0]}/{segments[1]}"
        revision, path = segments[3], "/".join(segments[4:])
        repo = self._visible_repo(repo_type, repo_id, user)
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        if path not in files:
            raise HubError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        data = files[path]
        size = len(data)
        resp_headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        start, end, status = 0, size - 1, 200
        range_header = headers.get("Range")
        if range_header and method == "GET":
            match = _RANGE_RE.match(range_header)
            if match is None or (not match.group(1) and not match.group(2)):
                raise HubError(
                    416, f"Invalid range: {range_header}", headers={"Content-Range": f"bytes */{size}"}
                )
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(
                    416,
                    f"Range not satisfiable: {range_header}",
                    headers={"Content-Range": f"bytes */{size}"},
                )
            status = 206
            resp_headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start : end + 1]
        truncate_at = None
        if method == "GET":
            if self._break_next:
                truncate_at = min(self._break_next.pop(0), len(body))
            if self._download_cut is not None and end >= self._download_cut:
                cut = max(self._download_cut - start, 0)
                truncate_at = cut if truncate_at is None else min(truncate_at, cut)
        return _Response(status=status, body=body, headers=resp_headers, truncate_at=truncate_at)


def _header_safe(text: str) -> str:
    return " ".join(text.split()).encode("ascii", "replace").decode("ascii")


def _load_json(body: bytes) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HubError(400, f"Invalid JSON body: {err}") from None
    if not isinstance(data, dict):
        raise HubError(400, "JSON body must be an object")
    return data


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # snapshot_download opens up to 8 connections at once
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rompatch-test-hub/1"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    wbufsize = 1 << 16  # headers and body leave in one write (no Nagle/delayed-ACK stalls of ~40 ms)
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.hub._lock:
                self.server.hub._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        method = self.command
        body = self._read_body()
        try:
            # `self.headers` is an email.message.Message: `.get` is case-insensitive.
            response = self.server.hub._handle(method, self.path, self.headers, body)
        except HubError as err:
            response = _json_response(err.body, status=err.status)
            response.headers.update(err.headers)
            response.headers["X-Error-Message"] = _header_safe(err.message)
            if err.code:
                response.headers["X-Error-Code"] = err.code
        except Exception as err:  # a bug in the fake: report it (501: the client does not retry it)
            response = _json_response({"error": f"test hub server error: {err!r}"}, status=501)
            response.headers["X-Error-Message"] = _header_safe(f"test hub server error: {err!r}")
        self._send(method, response)

    def _send(self, method: str, response: _Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method == "HEAD":
            return
        if response.truncate_at is None:
            self.wfile.write(response.body)
            return
        self.wfile.write(response.body[: response.truncate_at])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
