"""Downloads: ``HEAD``/``GET .../resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit`` and ``Range``."""

from __future__ import annotations

import re
from collections.abc import Mapping

from tests.helpers.hubserver.responses import HubError, Response
from tests.helpers.hubserver.store import TYPE_FROM_PLURAL, git_blob_sha1

RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class ResolveMixin:
    """Serves file downloads (cut short where faults.py says so)."""

    def _route_resolve(
        self, method: str, segments: list[str], headers: Mapping[str, str], user: str | None
    ) -> Response:
        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type = TYPE_FROM_PLURAL[segments[0]]
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
            match = RANGE_RE.match(range_header)
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
        truncate_at = self._cut_download(start, end, len(body)) if method == "GET" else None
        return Response(status=status, body=body, headers=resp_headers, truncate_at=truncate_at)
