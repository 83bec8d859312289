"""``HubServer``: state, faults and routes (the mixins of this package) behind one threading HTTP server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from tests.helpers.hubserver.api import ApiMixin
from tests.helpers.hubserver.commits import CommitsMixin
from tests.helpers.hubserver.faults import FaultsMixin, Injection
from tests.helpers.hubserver.httpd import Handler, HTTPServer
from tests.helpers.hubserver.resolve import ResolveMixin
from tests.helpers.hubserver.responses import HubError, Response
from tests.helpers.hubserver.store import Repo, StoreMixin


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the server (no credentials are kept, only the resolved user)."""

    method: str
    path: str
    user: str | None
    range: str | None = None


class HubServer(StoreMixin, FaultsMixin, ApiMixin, CommitsMixin, ResolveMixin):
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
        self._repos: dict[tuple[str, str], Repo] = {}
        self._commit_counter = 0
        self._download_cut: int | None = None
        self._break_next: list[int] = []
        self._injections: list[Injection] = []
        self._connections: set[socket.socket] = set()
        self._httpd = HTTPServer((host, port), Handler)
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

    # ------------------------------------------------------------------ dispatch

    def _authenticate(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> Response:
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
