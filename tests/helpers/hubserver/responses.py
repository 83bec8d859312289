"""What a handler answers: an HTTP error (``HubError``) or a ``Response``, and JSON in and out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None  # send only this many body bytes, then drop the connection


def json_response(data: Any, status: int = 200) -> Response:
    return Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


def load_json(body: bytes) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HubError(400, f"Invalid JSON body: {err}") from None
    if not isinstance(data, dict):
        raise HubError(400, "JSON body must be an object")
    return data


def header_safe(text: str) -> str:
    return " ".join(text.split()).encode("ascii", "replace").decode("ascii")
