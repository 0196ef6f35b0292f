"""A lean HTTP/1.1 client for the gateway's upstream: keep-alive pool, streaming, httptools parser.

The gateway relays one request per client request to one configured upstream; a general-purpose
client (aiohttp's was half of the gateway's CPU per request in a profile, see
docs/performance.md) does far more than that needs. This one writes the request head and body
with one ``transport.write``, parses the response with ``httptools`` (the same C parser uvicorn
uses), hands body bytes over as they arrive (chunked encoding decoded by the parser), pauses
reading when the consumer is slow, and keeps idle connections for reuse.

Failures are typed for the proxy to map: :class:`ConnectFailed` (refused, unreachable, DNS: 502),
:class:`ReadTimeout` (no byte within the read timeout: 504 before the response starts),
:class:`UpstreamClosed` (the connection broke mid-response). A request on a reused keep-alive
connection that the server had already closed (no byte of a response received) is retried once
on a new connection, as every HTTP client does.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_mod
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]

#: Buffered body bytes beyond which reading from the upstream pauses until the consumer catches up.
_HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """Base of the client's failures."""


class ConnectFailed(UpstreamError):
    """The upstream could not be reached (refused, unreachable, name not resolved, TLS failed)."""


class ReadTimeout(UpstreamError, TimeoutError):
    """No byte from the upstream within the read timeout."""


class UpstreamClosed(UpstreamError):
    """The upstream closed or broke the connection before the response was complete."""


class _Conn(asyncio.Protocol):
    """One connection: a response parser and a buffer of body chunks for one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: Headers = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.closed = False
        self.error: Exception | None = None
        self.got_bytes = False
        self.keep_alive = True
        self.paused = False
        self.at_boundary = True  # the parser is between messages (can take the next response)
        self._head: asyncio.Future[None] | None = None
        self._wake: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - no upgrades are requested
            self._fail(UpstreamClosed("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"malformed response from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamClosed("the upstream closed the connection"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._set(self._head)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._set(self._wake)

    def on_message_complete(self) -> None:
        self.complete = True
        self.at_boundary = True
        self._set(self._head)
        self._set(self._wake)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _set(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        for fut in (self._head, self._wake):
            self._set(fut)
        if self.transport is not None and not self.closed:
            self.transport.close()

    def reset(self) -> None:
        """Ready for the next request. The parser is kept when it ended the last response itself
        (a response to HEAD is ended by us: its parser still expects a body, so it is replaced)."""
        if not self.at_boundary:
            self.parser = httptools.HttpResponseParser(self)
        self.at_boundary = False
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.got_bytes = False
        self.keep_alive = True

    async def _wait(self, attr: str, timeout: float) -> None:
        fut = self.loop.create_future()
        setattr(self, attr, fut)
        timer = self.loop.call_later(timeout, self._set, fut)
        try:
            await fut
        finally:
            timer.cancel()
            setattr(self, attr, None)

    async def wait_head(self, timeout: float) -> None:
        if self.status or self.error is not None:
            return
        await self._wait("_head", timeout)
        if self.error is not None:
            raise self.error
        if not self.status:
            self._fail(ReadTimeout("the upstream sent no response in time"))
            raise ReadTimeout("the upstream sent no response in time")

    async def next_chunk(self, timeout: float) -> bytes | None:
        """The next body bytes (all buffered ones joined), or None at the end of the body."""
        if not self.chunks and not self.complete and self.error is None:
            await self._wait("_wake", timeout)
            if not self.chunks and not self.complete and self.error is None:
                self._fail(ReadTimeout("the upstream went silent"))
        return self.take()

    def take(self) -> bytes | None:
        """The body bytes received so far (joined), None at the end of the body; raises a failure."""
        if self.chunks:
            data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
            self.chunks.clear()
            self.buffered = 0
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            return data
        if self.error is not None:
            raise self.error
        return None


class Response:
    """A response being received: status and headers now, the body as it comes."""

    def __init__(self, pool: UpstreamPool, conn: _Conn) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def content_length(self) -> int | None:
        v = self.header(b"content-length")
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            data = await self._conn.next_chunk(self._pool.read_timeout)
            if data is None:
                self.release()
                return
            yield data

    async def read(self) -> bytes:
        conn = self._conn
        if conn.complete and conn.error is None:  # the whole body came with the head: no waiting
            data = conn.take()
            self.release()
            return data or b""
        parts = [c async for c in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back (complete, keep-alive) or close it."""
        if self._done:
            return
        self._done = True
        self._pool._release(self._conn)

    def abort(self) -> None:
        self._done = True
        self._conn._fail(UpstreamClosed("the request was abandoned"))


class UpstreamPool:
    """Keep-alive connections to one upstream origin (``http://host:port`` or ``https://``)."""

    def __init__(
        self, base_url: str, *, connect_timeout: float = 10.0, read_timeout: float = 600.0, max_connections: int = 1000
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl_mod.SSLContext | None = ssl_mod.create_default_context() if parts.scheme == "https" else None
        default = (parts.scheme == "https" and self.port == 443) or (parts.scheme == "http" and self.port == 80)
        self.host_header = (self.host if default else f"{self.host}:{self.port}").encode("idna")
        self.prefix = parts.path.rstrip("/").encode()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._idle: list[_Conn] = []
        self._slots: asyncio.Semaphore | None = None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Conn(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {self.host}:{self.port} timed out") from None
        except (OSError, ssl_mod.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        if conn.transport is None:  # pragma: no cover - connection_made always ran by now
            conn.transport = transport
        return conn

    async def request(self, method: str, target: bytes, headers: Headers, body: bytes) -> Response:
        """Send one request and return once the response head arrived."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        head = [b"%s %s%s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), self.prefix, target, self.host_header)]
        for k, v in headers:
            head.append(b"%s: %s\r\n" % (k, v))
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head) + body
        await self._slots.acquire()
        try:
            for attempt in (0, 1):
                conn, reused = await self._get()
                conn.reset()
                assert conn.transport is not None
                conn.transport.write(data)
                try:
                    await conn.wait_head(self.read_timeout)
                except UpstreamClosed:
                    if reused and not conn.got_bytes and attempt == 0:
                        continue  # a stale keep-alive connection: once more on a new one
                    raise
                except BaseException:
                    conn._fail(UpstreamClosed("abandoned"))
                    raise
                if method == "HEAD":  # no body follows, whatever the headers say
                    conn.complete = True
                return _SlotResponse(self, conn)
            raise UpstreamClosed("the upstream closed the connection")  # pragma: no cover
        except BaseException:
            self._slots.release()
            raise

    async def _get(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.error is None:
                return conn, True
        return await self._connect(), False

    def _release(self, conn: _Conn) -> None:
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._idle.append(conn)
        elif conn.transport is not None and not conn.closed:
            conn.transport.close()

    async def aclose(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


class _SlotResponse(Response):
    """A response holding one of the pool's connection slots until released."""

    def release(self) -> None:
        if self._done:
            return
        super().release()
        assert self._pool._slots is not None
        self._pool._slots.release()

    def abort(self) -> None:
        if self._done:
            return
        super().abort()
        assert self._pool._slots is not None
        self._pool._slots.release()
