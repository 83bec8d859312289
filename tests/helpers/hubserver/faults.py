"""Failure injection (:meth:`HubServer.fail_downloads_after`, :meth:`HubServer.break_next_download`,
:meth:`HubServer.fail_next_requests`); :meth:`HubServer.stop` is the last kind."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tests.helpers.hubserver.responses import HubError


@dataclass
class Injection:
    status: int
    remaining: int
    method: str | None
    path_contains: str | None
    message: str
    error_code: str | None


class FaultsMixin:
    """Failure injection: downloads cut short, and requests answered with an error."""

    _lock: threading.RLock
    _download_cut: int | None
    _break_next: list[int]
    _injections: list[Injection]

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
                Injection(
                    status, count, method.upper() if method else None, path_contains, message, error_code
                )
            )

    def _check_injections(self, method: str, path: str) -> None:
        self._injections = [inj for inj in self._injections if inj.remaining > 0]
        for inj in self._injections:
            if inj.method is not None and inj.method != method:
                continue
            if inj.path_contains is not None and inj.path_contains not in path:
                continue
            inj.remaining -= 1
            raise HubError(inj.status, inj.message, code=inj.error_code)

    def _cut_download(self, start: int, end: int, n_body: int) -> int | None:
        """Where to cut a file ``GET`` of bytes ``start..end`` (``n_body`` of them), or ``None``."""
        truncate_at = None
        if self._break_next:
            truncate_at = min(self._break_next.pop(0), n_body)
        if self._download_cut is not None and end >= self._download_cut:
            cut = max(self._download_cut - start, 0)
            truncate_at = cut if truncate_at is None else min(truncate_at, cut)
        return truncate_at
