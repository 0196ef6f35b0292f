"""A small blocking HTTP/1.1 client for the HTTP sinks (Elasticsearch ``_bulk``, OTLP/HTTP).

Stdlib only (``http.client``): a sink runs in its own runner thread, one request at a time, on
one kept-alive connection that is reopened after any failure. TLS verifies the server against the
system store or a given CA file.
"""

from __future__ import annotations

import email.utils
import http.client
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from vllm_audit.errors import ConfigError


class TransientError(Exception):
    """A delivery that may succeed later (the runner retries the batch from the cursor).

    ``retry_after`` is the server's ``Retry-After`` in seconds when it sent one: the runner waits
    at least that long (capped by ``[ship] backoff_max_s``) before the next try.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Response:
    """Status, headers (lower-case names) and body of one answer."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def text(self, limit: int = 500) -> str:
        return self.body[:limit].decode("utf-8", "replace")


class HttpClient:
    """One kept-alive connection to ``base_url``'s host; ``post`` raises :class:`TransientError` on I/O failure."""

    def __init__(self, base_url: str, *, timeout_s: float, ca_file: str = "", where: str = "url") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: {base_url!r} is not an http:// or https:// URL.")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{where}: {base_url!r} has an invalid port.") from None
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._ctx: ssl.SSLContext | None = None
        if self.https:
            try:
                self._ctx = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{where}: cannot load CA file {ca_file!r}: {exc}.") from None
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._ctx is not None:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout_s, context=self._ctx
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]) -> Response:
        """Send one request on the kept-alive connection (reopened once if the server had closed it)."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self.path + path, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 0:
                    continue  # a kept-alive connection the server had closed: one fresh try
                raise TransientError(f"{self.host}:{self.port}: {type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransientError(f"{self.host}:{self.port}: {type(exc).__name__}: {exc}") from None
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self.close()
            return Response(resp.status, hdrs, data)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
