"""The threading HTTP server and its request handler, which hands every request to the HubServer."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from tests.helpers.hubserver.responses import HubError, Response, header_safe, json_response

if TYPE_CHECKING:
    from tests.helpers.hubserver.server import HubServer


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # snapshot_download opens up to 8 connections at once
    hub: HubServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rompatch-test-hub/1"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    wbufsize = 1 << 16  # headers and body leave in one write (no Nagle/delayed-ACK stalls of ~40 ms)
    server: HTTPServer

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
            response = json_response(err.body, status=err.status)
            response.headers.update(err.headers)
            response.headers["X-Error-Message"] = header_safe(err.message)
            if err.code:
                response.headers["X-Error-Code"] = err.code
        except Exception as err:  # a bug in the fake: report it (501: the client does not retry it)
            response = json_response({"error": f"test hub server error: {err!r}"}, status=501)
            response.headers["X-Error-Message"] = header_safe(f"test hub server error: {err!r}")
        self._send(method, response)

    def _send(self, method: str, response: Response) -> None:
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
