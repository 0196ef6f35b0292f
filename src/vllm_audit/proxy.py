"""The gateway's inner app: a streaming reverse proxy to an OpenAI-compatible server (aiohttp).

Bytes are relayed as they arrive; nothing is parsed here. The audit middleware around this app
sees every message. Upstream failures become OpenAI-shaped errors: refused or unreachable
upstream -> 502, no answer in time -> 504; a stream that breaks half-way is aborted (the
client sees an incomplete response, not a falsely complete one) and recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from vllm_audit._asgi import lifespan, send_bytes, until_disconnect
from vllm_audit.capture import TIMEOUT, UPSTREAM_ERROR
from vllm_audit.config import GatewayConfig
from vllm_audit.types import Receive, Scope, Send

log = logging.getLogger("vllm_audit.proxy")

#: Hop-by-hop headers (RFC 9110 7.6.1): never forwarded, in either direction.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
#: ... plus what the client (aiohttp) sets itself; no compression, so the audit sees plain bytes.
_DROP_REQUEST = _HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
#: ... plus what uvicorn sets itself.
_DROP_RESPONSE = _HOP_BY_HOP | {b"content-length", b"date", b"server"}
#: Responses up to this size that announce a content-length are relayed in one message.
_WHOLE_BODY_MAX = 8 * 1024 * 1024


class UpstreamAborted(Exception):
    """The upstream failed after the response had started; the client connection is aborted."""


class Proxy:
    """ASGI app forwarding every request to ``upstream``."""

    def __init__(self, upstream: str, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.base = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout_s, sock_read=self.config.read_timeout_s
        )

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=self.timeout,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        body = b"".join(chunks)
        headers: list[tuple[str, str]] = [
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"] if n not in _DROP_REQUEST
        ]
        client = scope.get("client")
        if client:
            headers.append(("x-forwarded-for", client[0]))
        url = self.base + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        qs = scope.get("query_string", b"")
        if qs:
            url += "?" + qs.decode("latin-1")
        ex = scope.get("vllm_audit.exchange")

        # A client that goes away stops the upstream request; the middleware records "cancelled".
        await until_disconnect(self._forward(scope, send, url, body, headers, ex), receive)

    async def _forward(
        self, scope: Scope, send: Send, url: str, body: bytes, headers: list[tuple[str, str]], ex: Any
    ) -> None:
        started = False
        try:
            async with self.session().request(
                scope["method"], url, data=body or None, headers=headers, allow_redirects=False
            ) as resp:
                out_headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _DROP_RESPONSE]
                ctype = resp.headers.get("content-type", "")
                length = resp.content_length
                if length is not None and length <= _WHOLE_BODY_MAX and "text/event-stream" not in ctype:
                    data = await resp.read()
                    out_headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    started = True
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    return
                await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                started = True
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            await self._fail(
                send, ex, started, 504, TIMEOUT, "upstream_timeout", "The upstream did not answer in time.", exc
            )
        except aiohttp.ClientConnectorError as exc:
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
        except (aiohttp.ClientError, ConnectionError) as exc:
            await self._fail(
                send, ex, started, 502, UPSTREAM_ERROR, "upstream_error", "The upstream connection failed.", exc
            )

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
