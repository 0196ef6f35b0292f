"""The gateway's inner app: a streaming reverse proxy to an OpenAI-compatible server.

Bytes are relayed as they arrive; nothing is parsed here. The audit middleware around this app
sees every message. Upstream failures become OpenAI-shaped errors: refused or unreachable
upstream -> 502, no answer in time -> 504; a stream that breaks half-way is aborted (the
client sees an incomplete response, not a falsely complete one) and recorded.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_audit._asgi import lifespan, send_bytes, until_disconnect
from vllm_audit.capture import TIMEOUT, UPSTREAM_ERROR
from vllm_audit.config import GatewayConfig
from vllm_audit.types import Receive, Scope, Send
from vllm_audit.upstream import ConnectFailed, ReadTimeout, Response, UpstreamError, UpstreamPool

log = logging.getLogger("vllm_audit.proxy")

#: Hop-by-hop headers (RFC 9110 7.6.1): never forwarded, in either direction.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
#: ... plus what the client sets itself; no compression, so the audit sees plain bytes.
_DROP_REQUEST = _HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
#: ... plus what uvicorn sets itself.
_DROP_RESPONSE = _HOP_BY_HOP | {b"content-length", b"date", b"server"}
#: Responses up to this size that announce a content-length are relayed in one message.
_WHOLE_BODY_MAX = 8 * 1024 * 1024
#: Seconds a request runs before a task starts watching for the client's disconnect (which then
#: stops the upstream request): a faster request costs no watcher task, and a client that left
#: within this time is seen when the watcher starts.
WATCH_AFTER_S = 0.2


class UpstreamAborted(Exception):
    """The upstream failed after the response had started; the client connection is aborted."""


class Proxy:
    """ASGI app forwarding every request to ``upstream``."""

    def __init__(self, upstream: str, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.base = upstream.rstrip("/")
        self.pool = UpstreamPool(
            self.base,
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            max_connections=self.config.max_connections,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, self.aclose)
            return
        if scope["type"] != "http":  # pragma: no cover - websockets are not proxied
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        headers = [(n, v) for n, v in scope["headers"] if n not in _DROP_REQUEST]
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", client[0].encode("latin-1")))
        target = scope.get("raw_path") or scope["path"].encode()
        qs = scope.get("query_string", b"")
        if qs:
            target += b"?" + qs
        ex = scope.get("vllm_audit.exchange")

        # A client that goes away stops the upstream request; the middleware records "cancelled".
        await until_disconnect(self._forward(scope, send, target, body, headers, ex), receive, WATCH_AFTER_S)

    async def _forward(
        self, scope: Scope, send: Send, target: bytes, body: bytes, headers: list[tuple[bytes, bytes]], ex: Any
    ) -> None:
        started = False
        resp: Response | None = None
        try:
            resp = await self.pool.request(scope["method"], target, headers, body)
            out_headers = [(k, v) for k, v in resp.headers if k not in _DROP_RESPONSE]
            ctype = resp.header(b"content-type") or b""
            length = resp.content_length
            if length is not None and length <= _WHOLE_BODY_MAX and b"text/event-stream" not in ctype:
                data = await resp.read()
                # a response to HEAD announces the length of the body a GET would get
                out_headers.append((b"content-length", b"%d" % (length if scope["method"] == "HEAD" else len(data))))
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                started = True
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            started = True
            async for chunk in resp.iter_chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ReadTimeout as exc:
            await self._fail(
                send, ex, started, 504, TIMEOUT, "upstream_timeout", "The upstream did not answer in time.", exc
            )
        except ConnectFailed as exc:
            await self._fail(
                send,
                ex,
                started,
                502,
                UPSTREAM_ERROR,
                "upstream_unreachable",
                "The upstream server is unreachable.",
                exc,
            )
        except (UpstreamError, ConnectionError) as exc:
            await self._fail(
                send, ex, started, 502, UPSTREAM_ERROR, "upstream_error", "The upstream connection failed.", exc
            )
        finally:
            if resp is not None and not resp._done:
                resp.abort()  # the client went away or the relay failed: this connection is not reusable

    async def _fail(
        self, send: Send, ex: Any, started: bool, status: int, outcome: str, code: str, message: str, exc: Exception
    ) -> None:
        log.warning("upstream %s: %s (%s)", self.base, code, type(exc).__name__)
        if ex is not None:
            ex.outcome = outcome
            ex.error_type = code
            ex.error_message = message
        if started:
            raise UpstreamAborted(message) from None
        from vllm_audit.middleware import error_body

        await send_bytes(send, status, error_body(message, "upstream_error", code))
