"""``/api/...``: routing, and the handlers for users, repos, listings, refs and history (writes: commits.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from tests.helpers.hubserver.responses import HubError, Response, json_response, load_json
from tests.helpers.hubserver.store import NAME_RE, TYPE_FROM_PLURAL, URL_PREFIX, git_blob_sha1


class ApiMixin:
    """Routes ``/api/...`` and answers the reads and repo management."""

    orgs: dict[str, set[str]]
    _repos: dict

    def _route_api(
        self,
        method: str,
        seg: list[str],
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
        user: str | None,
    ) -> Response:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami(user)
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(load_json(body), user)
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(load_json(body), user)
        if seg == ["validate-yaml"] and method == "POST":
            return json_response({"errors": [], "warnings": []})
        if len(seg) >= 3 and seg[0] in TYPE_FROM_PLURAL:
            repo_type = TYPE_FROM_PLURAL[seg[0]]
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
                return self._preupload(repo_type, repo_id, "/".join(rest), query, load_json(body), user)
            if action == "commit" and method == "POST" and rest:
                return self._commit(repo_type, repo_id, "/".join(rest), query, body, user)
            if action == "branch" and rest and method in ("POST", "DELETE"):
                branch = "/".join(rest)
                if method == "POST":
                    return self._create_branch(repo_type, repo_id, branch, load_json(body), user)
                return self._delete_branch(repo_type, repo_id, branch, user)
        raise HubError(404, f"test hub server: no route for {method} /api/{'/'.join(seg)}")

    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": "write"}
            for org, members in sorted(self.orgs.items())
            if user in members
        ]
        return json_response(
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

    def _create_repo(self, payload: dict, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository (no token was sent)")
        name = payload.get("name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        if not isinstance(name, str) or not NAME_RE.match(name) or "--" in name or ".." in name:
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
        return json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict, user: str | None) -> Response:
        namespace = payload.get("organization") or user or ""
        repo_type = payload.get("type") or "model"
        repo = self._writable_repo(repo_type, f"{namespace}/{payload.get('name')}", user)
        del self._repos[(repo.repo_type, repo.repo_id)]
        return json_response({})

    def _repo_info(
        self, repo_type: str, repo_id: str, revision: str | None, query: dict[str, str], user: str | None
    ) -> Response:
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
        return json_response(info)

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
    ) -> Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        prefix = path.strip("/")
        entries = self._entries(files, prefix, query.get("recursive", "").lower() in ("1", "true"))
        if prefix and not entries:
            raise HubError(
                404, f"Entry not found: {prefix}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        return json_response(entries)

    def _paths_info(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        body: bytes,
        headers: Mapping[str, str],
        user: str | None,
    ) -> Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        if "json" in headers.get("Content-Type", ""):
            paths = load_json(body).get("paths", [])
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
        return json_response(out)

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, str], user: str | None) -> Response:
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
        return json_response(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str, user: str | None) -> Response:
        repo = self._visible_repo(repo_type, repo_id, user)
        history = self._history(repo, self._resolve(repo, revision))
        return json_response(
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
