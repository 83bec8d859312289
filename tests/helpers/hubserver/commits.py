"""Writes under ``/api/...``: preupload, the NDJSON commit, and branches."""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.helpers.hubserver.responses import HubError, Response, json_response
from tests.helpers.hubserver.store import HEX40_RE, Repo, git_blob_sha1, normalize_path


class CommitsMixin:
    """Preupload, commit (``create_pr``, ``parentCommit``) and branch routes."""

    auto_create_branches: bool

    def _target_branch(self, repo: Repo, revision: str, *, create_pr: bool) -> str:
        """The branch a preupload/commit for ``revision`` writes to; raises like the Hub if invalid."""
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if branch in repo.refs or (branch == "main" and not repo.refs):
            return branch
        if create_pr or HEX40_RE.match(branch) or branch.startswith("refs/") or not self.auto_create_branches:
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
    ) -> Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        branch = self._target_branch(repo, revision, create_pr=bool(query.get("create_pr")))
        head = repo.refs.get(branch) or repo.refs.get("main")  # a branch to be auto-created forks main
        files = repo.commits[head].files if head else {}
        out = []
        for item in payload.get("files", []):
            path = normalize_path(item.get("path"))
            entry: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in files:
                entry["oid"] = git_blob_sha1(files[path])
            out.append(entry)
        return json_response({"files": out, "commitOid": head})

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, str],
        body: bytes,
        user: str | None,
    ) -> Response:
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
                path = normalize_path(value.get("path"))
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        files[path] = base64.b64decode(content, validate=True)
                    except ValueError:
                        raise HubError(400, f"Invalid base64 content for {path!r}") from None
                else:
                    files[path] = str(content).encode()
            elif key == "deletedFile":
                path = normalize_path(value.get("path"))
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                folder = normalize_path(str(value.get("path", "")).rstrip("/"))
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
        return json_response(data)

    def _create_branch(
        self, repo_type: str, repo_id: str, branch: str, payload: dict, user: str | None
    ) -> Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        if not branch or branch.startswith("refs/") or ".." in branch or HEX40_RE.match(branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = payload.get("startingPoint") or "main"
        repo.refs[branch] = self._resolve(repo, starting_point)
        return json_response({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str, user: str | None) -> Response:
        repo = self._writable_repo(repo_type, repo_id, user)
        if branch not in repo.refs:
            raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.refs[branch]
        return json_response({})
