"""``AuditMiddleware``: the one audit path, for vLLM's own server and for the gateway.

Pure ASGI. Per request: request id, client ip, identity, quota, then the inner app runs with a
replaying ``receive`` and an observing ``send``. Response bytes are passed on as they come (no
buffering of streams); the middleware only keeps references to them for the record. When the
response's last message arrives, the exchange is handed to the writer and, in strict durability,
that last message is released only once the record is on disk.

With vLLM: ``vllm serve MODEL --middleware vllm_audit.AuditMiddleware`` (vLLM constructs
``AuditMiddleware(app)``; configuration comes from the file named by ``VLLM_AUDIT_CONFIG``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from vllm_audit import hooks
from vllm_audit._asgi import JSON_HEADER, send_bytes
from vllm_audit._gc import tune_gc_for_serving
from vllm_audit.capture import (
    CANCELLED,
    CLIENT_ERROR,
    REJECTED,
    UPSTREAM_ERROR,
    Exchange,
    encode_path,
    lax_bool,
    normalize_path,
    outcome,
    parse_json,
)
from vllm_audit.clientip import ClientIPResolver
from vllm_audit.config import Config, config_from_env
from vllm_audit.errors import ConfigError, LogWriteError
from vllm_audit.ids import accept_request_id
from vllm_audit.metrics import Metrics
from vllm_audit.types import ASGIApp, Message, Receive, Scope, Send
from vllm_audit.writer import AuditWriter

log = logging.getLogger("vllm_audit.edge")

#: Routes whose streams get ``stream_options.include_usage`` injected (and the extra chunk stripped).
USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
#: Route labels for metrics; anything else is "other" (paths come from clients: bound the cardinality).
KNOWN_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/messages",
        "/invocations",
        "/tokenize",
        "/detokenize",
        "/pooling",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/health",
    }
)


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def error_body(message: str, type_: str, code: str | int | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


class AuditMiddleware:
    """Audit every HTTP exchange of ``app`` into the local tamper-evident log."""

    def __init__(
        self,
        app: ASGIApp,
        config: Config | None = None,
        *,
        writer: AuditWriter | None = None,
        upstream: str | None = None,
        ops_at_root: bool = False,
        ops_listener: tuple[str, int] | None = None,
        tune_gc: bool = False,
    ) -> None:
        self.app = app
        self.tune_gc = tune_gc
        self.config = config if config is not None else config_from_env()
        cfg = self.config
        self.ips = ClientIPResolver(cfg.edge.trusted_proxies, cfg.edge.client_ip_header)
        self.auth = hooks.build_authenticator(cfg)
        self.quota = hooks.build_quota(cfg)
        self.anonymous = hooks.anonymous()
        self.metrics = writer.metrics if writer is not None else Metrics()
        if writer is None:
            writer = AuditWriter(cfg, metrics=self.metrics)  # quota charging is a projection of the log
            writer.start()
        self.writer = writer
        self.upstream = upstream
        self.audit_api = hooks.build_audit_api(cfg, writer.submit_event)
        self.console = hooks.build_console(cfg, writer.submit_event, self.audit_api)
        self.ops_prefix = cfg.edge.ops_prefix.rstrip("/")
        self.ops_at_root = ops_at_root
        self.ops_listener = ops_listener
        self._ops_server: asyncio.AbstractServer | None = None
        self.rid_header = cfg.edge.request_id_header.lower().encode("latin-1")
        self.rid_max = cfg.edge.max_request_id_length
        self.max_body = cfg.edge.max_request_bytes
        self.max_headers = cfg.edge.max_header_bytes
        self.max_capture = cfg.log.max_capture_bytes
        self.strict = cfg.log.durability == "strict"
        self.fail_open = cfg.log.on_failure == "fail_open"
        self.durable_timeout = cfg.log.durable_timeout_s
        self.inject_usage = cfg.edge.inject_stream_usage
        self.unaudited = frozenset(cfg.edge.unaudited_paths)
        self.body_timeout = cfg.edge.body_timeout_s
        self.ops_token = _read_token(cfg.edge.ops_token_file, cfg.source)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._lifespan_send(send))
                return
            await self.app(scope, receive, send)
            return
        path: str = normalize_path(scope["path"])
        if path.startswith(self.ops_prefix) and (path == self.ops_prefix or path[len(self.ops_prefix)] == "/"):
            await self._ops(path[len(self.ops_prefix) :], scope, receive, send)
            return
        if path == "/healthz" or (self.ops_at_root and path in ("/readyz", "/metrics")):
            await self._ops(path, scope, receive, send)
            return
        if path in self.unaudited:
            await self.app(scope, receive, send)
            return
        await self._audit(scope, receive, send, path)

    def _lifespan_send(self, send: Send) -> Send:
        """Drain and close the writer before the server is told shutdown is complete.

        Servers may end the process right after shutdown (uvicorn re-raises SIGTERM), so an
        ``atexit`` hook alone could lose the final checkpoint, or queued records in async mode.
        """

        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                if self.ops_listener is not None:
                    await self._start_ops_listener()
                if self.tune_gc:
                    tune_gc_for_serving()
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if self._ops_server is not None:
                    self._ops_server.close()
                await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
            await send(message)

        return wrapped

    async def ops_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The operations endpoints alone (/healthz, /readyz, /metrics): the separate listener's app."""
        if scope["type"] != "http":
            return
        path = normalize_path(scope["path"])
        if path in ("/healthz", "/readyz", "/metrics"):
            await self._ops(path, scope, receive, send)
        else:
            await _send_error(send, 404, "not_found", "No operations endpoint at this path.", b"")

    async def _start_ops_listener(self) -> None:
        """Serve :meth:`ops_app` on ``[gateway] ops_host:ops_port`` (uvicorn's protocol, same loop).

        Each worker binds the port with SO_REUSEPORT, so with several workers a scrape reaches
        one of them (each reports its own writer's metrics, labelled with its writer id).
        """
        import uvicorn
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        from uvicorn.server import ServerState

        assert self.ops_listener is not None
        host, port = self.ops_listener
        config = uvicorn.Config(
            self.ops_app, lifespan="off", access_log=False, log_level="warning", interface="asgi3", proxy_headers=False
        )
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()
        self._ops_server = await loop.create_server(
            lambda: HttpToolsProtocol(config=config, server_state=state, app_state={}),
            host,
            port,
            reuse_port=True,
        )
        log.info("operations endpoints on http://%s:%d", host, port)

    # -- the audited exchange -----------------------------------------------------------------

    async def _audit(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        rid_raw: bytes | None = None
        hdr_size = 0
        has_body = False
        for name, value in headers:
            hdr_size += len(name) + len(value)
            if name == self.rid_header:
                rid_raw = value
            elif name == b"content-length" or name == b"transfer-encoding":
                has_body = True
        request_id, note = accept_request_id(rid_raw, self.rid_max)
        ex = Exchange(request_id, scope.get("method", "GET"), path)
        ex.capture_limit = self.max_capture
        if note is not None:
            ex.request_id_source = "replaced"
            ex.request_id_note = note
        elif rid_raw:
            ex.request_id_source = "client"
        client = scope.get("client")
        peer = client[0] if client else None
        ex.peer_ip = peer or "unknown"
        ex.client_ip, ex.forwarded_ignored = self.ips.resolve(peer, headers)
        ex.upstream = self.upstream
        ex.identity = self.anonymous

        try:
            if hdr_size > self.max_headers:
                raise _Reject(
                    431, "request_header_fields_too_large", f"Request headers exceed {self.max_headers} bytes."
                )
            if not self.writer.accepting and not self.fail_open:
                self.metrics.count_rejected("log_unavailable")
                raise _Reject(503, "audit_log_unavailable", "The audit log cannot record requests; try again later.")
            if self.auth is not None:
                ident = await self.auth.authenticate(scope)
                ex.identity = ident
                if ident.auth_status == "failed":
                    raise _Reject(
                        401,
                        "invalid_api_key",
                        ident.failure_reason or "Authentication failed.",
                        [(b"www-authenticate", b"Bearer")],
                    )
            if self.quota is not None:
                retry_after = await self.quota.check(ex.identity, scope["path"])
                if retry_after is not None:
                    ra = str(max(1, int(retry_after + 0.999))).encode()
                    raise _Reject(429, "rate_limit_exceeded", "Rate limit exceeded.", [(b"retry-after", ra)])
            body = await self._read_body_in_time(receive, ex) if has_body else b""
        except _Reject as rej:
            await self._reject(ex, send, rej)
            return
        except _ClientGone:
            ex.disconnected = True
            ex.outcome = CANCELLED
            ex.t_end = time.perf_counter()
            self._submit(ex)
            return

        if body:
            body = self._inspect_body(ex, body)
        rid_b = request_id.encode("latin-1")
        new_headers = [(n, v) for n, v in headers if n != self.rid_header and n != b"x-request-id"]
        new_headers.append((b"x-request-id", rid_b))
        if ex.usage_injected:
            new_headers = [(n, v) for n, v in new_headers if n != b"content-length"]
            new_headers.append((b"content-length", str(len(body)).encode()))
        inner_scope = dict(scope)
        inner_scope["headers"] = new_headers
        raw_path = scope.get("raw_path")
        if path != scope["path"] or (raw_path and (b"%" in raw_path or b"/." in raw_path or b"//" in raw_path)):
            # The upstream acts on the route the edge classified, not on another reading of the bytes.
            inner_scope["path"] = path
            inner_scope["raw_path"] = encode_path(path)
        inner_scope["vllm_audit.request_id"] = request_id
        inner_scope["vllm_audit.identity"] = ex.identity
        inner_scope["vllm_audit.exchange"] = ex

        await self._run_app(inner_scope, receive, send, ex, body, rid_b)

    async def _run_app(
        self, scope: Scope, receive: Receive, send: Send, ex: Exchange, body: bytes, rid_b: bytes
    ) -> None:
        body_pending = True
        held_start: Message | None = None
        submitted = False
        undelivered = False
        stripper = _UsageStripper() if ex.usage_injected else None
        # Strict durability: whatever completes the response for the client (the SSE terminator,
        # the last bytes of a known content-length) is held with the final message until durable.
        # ``completes(chunk)``: where in the chunk the held part starts, -1 when it completes nothing.
        completes: Callable[[bytes], int] | None = None
        tail: list[bytes] = []
        max_capture = self.max_capture

        async def inner_receive() -> Message:
            nonlocal body_pending
            if body_pending:
                body_pending = False
                return {"type": "http.request", "body": body, "more_body": False}
            msg = await receive()
            if msg["type"] == "http.disconnect":
                ex.disconnected = True
            return msg

        def keep(chunk: bytes) -> None:
            """Keep a reference to a response chunk for the record (up to max_capture bytes)."""
            n = ex.response_bytes + len(chunk)
            ex.response_bytes = n
            if n <= max_capture:
                ex.chunks.append(chunk)
            else:
                ex.response_truncated = True

        async def finish(message: Message) -> None:
            """The response's last message: hand the record over, then (strict) release it once durable."""
            nonlocal held_start, submitted, undelivered
            ex.completed = True
            ex.t_end = time.perf_counter()
            submitted = True
            fut = self._submit(ex, wait=self.strict)
            if fut is not None:
                try:
                    await self._durable(fut)
                except (LogWriteError, TimeoutError) as exc:
                    if not self.fail_open:
                        reason = "durable_timeout" if isinstance(exc, TimeoutError) else "write_failed"
                        log.error("request %s: record not durable (%s); failing the response", ex.request_id, exc)
                        if held_start is not None:
                            held_start = None
                            self._delivery_failed(ex, reason, "error_503", 503)
                            await _send_error(
                                send, 503, "audit_log_unavailable", "The audit log cannot record requests.", rid_b
                            )
                            return
                        self._delivery_failed(ex, reason, "aborted", ex.http_status)
                        undelivered = True
                        raise _DeliveryFailed(f"request {ex.request_id}: the record is not durable") from None
            if held_start is not None:
                start, held_start = held_start, None
                await send(start)
            if tail:
                message = {**message, "body": b"".join(tail) + message.get("body", b"")}
                tail.clear()
            await send(message)

        async def inner_send(message: Message) -> None:
            nonlocal held_start, completes, stripper
            mtype = message["type"]
            if mtype == "http.response.body":
                chunk: bytes = message.get("body", b"")
                more: bool = message.get("more_body", False)
                if more and held_start is None and not tail:
                    # Hot path: a stream chunk after the first one. Keep a reference, pass it on.
                    if chunk:
                        keep(chunk)
                        if stripper is not None and stripper.needs(chunk):
                            chunk = stripper.feed(chunk)
                            if stripper.captured is not None and ex.usage_chunk is None:
                                ex.usage_chunk = stripper.captured
                            if not chunk:
                                return
                            message = {"type": "http.response.body", "body": chunk, "more_body": True}
                        cut = completes(chunk) if completes is not None else -1
                        if cut >= 0:
                            tail.append(chunk[cut:] if cut else chunk)
                            if not cut:
                                return
                            message = {"type": "http.response.body", "body": chunk[:cut], "more_body": True}
                    await send(message)
                    return
                await slow_body(message, chunk, more)
                return
            if mtype == "http.response.start":
                ex.http_status = message["status"]
                hdrs = list(message.get("headers", ()))
                echo = True
                length = -1
                for name, value in hdrs:
                    if name == b"content-type":
                        ex.content_type = value
                    elif name == b"x-request-id":
                        echo = False
                    elif name == b"content-length" and value.isdigit():
                        length = int(value)
                if echo:
                    hdrs.append((b"x-request-id", rid_b))
                held_start = {**message, "headers": hdrs}
                if b"text/event-stream" in ex.content_type:
                    if self.strict:
                        completes = _responses_hold if ex.route == "/v1/responses" else _sse_hold
                elif self.strict and length >= 0:
                    completes = _length_reached(ex, length)
                if stripper is not None and (ex.http_status != 200 or b"text/event-stream" not in ex.content_type):
                    stripper = None
                return
            if mtype == "http.response.pathsend" and not submitted:  # a file response: complete
                await finish(message)
            else:
                await send(message)

        async def slow_body(message: Message, chunk: bytes, more: bool) -> None:
            """A body message other than a plain stream chunk: the first, the last, or one held back."""
            nonlocal held_start
            strip = stripper
            if chunk:
                if ex.t_first is None:
                    ex.t_first = time.perf_counter()
                keep(chunk)
            out = chunk
            if strip is not None:
                out = strip.feed(chunk) if chunk else b""
                if not more:
                    out += strip.flush()
                if strip.captured is not None and ex.usage_chunk is None:
                    ex.usage_chunk = strip.captured
            if not more:
                last = message if out is chunk else {"type": "http.response.body", "body": out, "more_body": False}
                await finish(last)
                return
            # Only what completes the response waits: the events before a terminator in the same
            # chunk (a fast or coalesced stream) go now, as they would have one by one; once
            # something is held, everything after it is too.
            cut = (0 if tail else completes(out) if completes is not None else -1) if out else -1
            if cut >= 0:
                tail.append(out[cut:] if cut else out)
                out = out[:cut]
            pending_start, held_start = held_start, None
            if pending_start is not None:
                await send(pending_start)
            if out:
                await send(message if out is chunk else {"type": "http.response.body", "body": out, "more_body": True})

        try:
            await self.app(scope, inner_receive, inner_send)
        except BaseException as exc:
            if undelivered:
                # Returning leaves the response incomplete: the server aborts the connection, so
                # the client never sees a complete answer whose record is not on disk.
                return
            if not submitted:
                ex.t_end = time.perf_counter()
                if ex.outcome is not None:
                    pass  # the inner app said what happened (e.g. the proxy: timeout)
                elif isinstance(exc, asyncio.CancelledError) or ex.disconnected:
                    ex.outcome = CANCELLED
                else:
                    ex.outcome = UPSTREAM_ERROR
                    ex.error_type = type(exc).__name__
                    ex.error_message = "The served application raised an exception."
                    if not ex.http_status:
                        ex.http_status = 500
                self._submit(ex)
            raise
        if not submitted:
            ex.t_end = time.perf_counter()
            if held_start is not None and not ex.disconnected:
                # The app started a response and returned without a body: finish it.
                await finish({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif not ex.http_status and not ex.disconnected:
                ex.outcome = UPSTREAM_ERROR
                ex.error_message = "The served application returned without a response."
            self._submit(ex)

    def _delivery_failed(self, ex: Exchange, reason: str, received: str, status: int) -> None:
        """Amend a queued record whose response the client did not get (see docs/data-model.md)."""
        self.metrics.count_rejected("delivery_failed")
        self.writer.submit_event(
            {
                "event": "delivery_failed",
                "record_id": ex.record_id,
                "request_id": ex.request_id,
                "reason": reason,
                "client_received": received,
                "http_status": status,
            }
        )

    async def _durable(self, fut: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.durable_timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def _submit(self, ex: Exchange, wait: bool = False) -> asyncio.Future[None] | None:
        self.metrics.count_request(ex.route if ex.route in KNOWN_ROUTES else "other", outcome(ex))
        if ex.http_status >= 500 or ex.outcome == UPSTREAM_ERROR:
            self.metrics.upstream_errors_total += 1
        if not self.writer.accepting:
            if self.fail_open:
                self.metrics.edge_dropped_total += 1
                log.warning("request %s: audit log unavailable, record dropped (fail_open)", ex.request_id)
                return None
        return self.writer.submit(ex, wait=wait)

    async def _read_body_in_time(self, receive: Receive, ex: Exchange) -> bytes:
        # A plain timer instead of asyncio.timeout(): same semantics here (the read is cancelled
        # at the deadline), a fraction of the per-request cost.
        task = asyncio.current_task()
        assert task is not None
        expired = _Expiry(task)
        cancelling = task.cancelling()
        timer = asyncio.get_running_loop().call_later(self.body_timeout, expired.fire)
        try:
            return await self._read_body(receive, ex)
        except asyncio.CancelledError:
            if not expired.fired or task.uncancel() > cancelling:
                raise  # not (only) our deadline: someone else cancelled the request too
            raise _Reject(
                408, "request_timeout", f"The request body did not arrive within {self.body_timeout:g} s."
            ) from None
        finally:
            timer.cancel()

    async def _read_body(self, receive: Receive, ex: Exchange) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = self.max_body
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGone
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    ex.request_bytes = size
                    raise _Reject(413, "request_too_large", f"Request body exceeds {limit} bytes.")
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ex.request_bytes = size
        ex.request_body = body  # whole: hashed for the record; the stored prompt is capped at finalize
        return body

    def _inspect_body(self, ex: Exchange, body: bytes) -> bytes:
        """Find ``stream`` (and inject ``include_usage``) — the only parsing on the request path.

        The body is read as the upstream reads it (:func:`parse_json`, pydantic's lax booleans),
        so no spelling of ``"stream": true`` the upstream honours streams without usage. The
        parse is skipped only when the bytes cannot hold a ``stream`` key: plain UTF-8 starting
        with ``{``, no ``\\u`` escape, and no ``stream`` substring.
        """
        if b"stream" not in body and b"\\u" not in body and body[:1] == b"{" and b"\x00" not in body[:4]:
            return body
        try:
            req, error, exact = orjson.loads(body), None, True
        except orjson.JSONDecodeError:
            (req, error), exact = parse_json(body), False
        ex.request_json, ex.request_parse_error = req, error
        if not isinstance(req, dict):
            return body  # the upstream answers the malformed request; the record says so
        ex.stream = lax_bool(req.get("stream"))
        if not (ex.stream and self.inject_usage and ex.route in USAGE_ROUTES):
            return body
        opts = req.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            return body  # invalid; let the upstream say so
        if isinstance(opts, dict) and lax_bool(opts.get("include_usage")):
            return body  # the client asked for usage itself: pass everything through
        new = dict(req)
        # Only the final usage chunk is wanted: without include_usage the upstream ignores
        # continuous_usage_stats, so it is dropped to keep every other chunk as the client expects.
        new_opts = {k: v for k, v in (opts or {}).items() if k not in ("include_usage", "continuous_usage_stats")}
        new_opts["include_usage"] = True
        new["stream_options"] = new_opts
        ex.usage_injected = True
        if exact:
            return orjson.dumps(new)
        # values only json.loads makes (NaN, big ints, lone surrogates) survive json.dumps exactly
        return json.dumps(new, ensure_ascii=True, allow_nan=True).encode("ascii")

    async def _reject(self, ex: Exchange, send: Send, rej: _Reject) -> None:
        ex.http_status = rej.status
        ex.outcome = REJECTED if rej.status in (401, 403, 429, 503) else CLIENT_ERROR
        ex.error_type = rej.code
        ex.error_message = rej.message
        ex.completed = True
        ex.t_end = time.perf_counter()
        if rej.status != 503:
            self.metrics.count_rejected(rej.code)
        fut = self._submit(ex, wait=self.strict and rej.status != 503)
        if fut is not None:
            try:
                await self._durable(fut)
            except (LogWriteError, TimeoutError):
                if not self.fail_open:
                    rej = _Reject(503, "audit_log_unavailable", "The audit log cannot record requests.")
        await _send_error(send, rej.status, rej.code, rej.message, ex.request_id.encode("latin-1"), rej.headers)

    # -- audit endpoints ----------------------------------------------------------------------

    async def _ops(self, sub: str, scope: Scope, receive: Receive, send: Send) -> None:
        if sub == "/healthz":
            await _send_json(send, 200, {"status": "ok"})
        elif sub in ("/readyz", "/metrics"):
            if self.ops_token is not None and not _bearer_ok(scope, self.ops_token):
                await _send_error(
                    send,
                    401,
                    "invalid_ops_token",
                    f"{sub} needs the operations bearer token.",
                    b"",
                    [(b"www-authenticate", b"Bearer")],
                )
            elif sub == "/readyz":
                ok = self.writer.accepting
                payload: dict[str, Any] = {
                    "status": "ready" if ok else "not_ready",
                    "writer_id": self.writer.writer_id,
                    "queue_depth": self.writer.depth(),
                    "on_failure": self.config.log.on_failure,
                }
                if self.writer.failure:
                    payload["reason"] = _public_reason(self.writer.failure)
                await _send_json(send, 200 if ok else 503, payload)
            else:
                body = self.metrics.render()
                await send_bytes(send, 200, body, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        elif (sub == "/console" or sub.startswith("/console/")) and self.console is not None:
            await self.console(scope, receive, send)
        elif (sub == "/v1" or sub.startswith("/v1/")) and self.audit_api is not None:
            ident = self.anonymous
            if self.auth is not None:
                ident = await self.auth.authenticate(scope)
            inner = dict(scope)
            inner["vllm_audit.identity"] = ident
            await self.audit_api(inner, receive, send)
        else:
            await _send_error(send, 404, "not_found", "No audit endpoint at this path.", b"")


_PATHISH = re.compile(r"'[^']*[/\\][^']*'|\"[^\"]*[/\\][^\"]*\"|[^\s'\"]*[/\\][^\s'\"]*")


def _public_reason(reason: str) -> str:
    """A failure reason without filesystem paths (they tell an outsider how the host is laid out)."""
    return _PATHISH.sub("<path>", reason)[:300]


def _bearer_ok(scope: Scope, token: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


def _read_token(path: str, source: str | None) -> bytes | None:
    """The operations bearer token from ``[edge] ops_token_file`` (None when not configured)."""
    if not path:
        return None
    import os

    full = path if os.path.isabs(path) or source is None else os.path.join(os.path.dirname(source), path)
    try:
        with open(full, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"[edge] ops_token_file: cannot read {path!r}: {exc.strerror or exc}.") from None
    if len(token) < 16:
        raise ConfigError("[edge] ops_token_file: the token must be at least 16 characters.")
    return token


class _ClientGone(Exception):
    pass


class _Expiry:
    """A deadline that cancels ``task`` when it fires (and remembers that it did)."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


class _DeliveryFailed(Exception):
    """Raised into the served app's ``send`` when a strict record could not be made durable."""


def _sse_end(chunk: bytes) -> bool:
    """The chunk ends with the OpenAI stream terminator ``data: [DONE]``."""
    return chunk.endswith((b"[DONE]\n\n", b"[DONE]\r\n\r\n"))


def _event_start(chunk: bytes, at: int) -> int:
    """Where the SSE event holding position ``at`` of ``chunk`` starts (0: the chunk's start)."""
    lf, crlf = chunk.rfind(b"\n\n", 0, at), chunk.rfind(b"\r\n\r\n", 0, at)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _sse_hold(chunk: bytes) -> int:
    """A chat or completions stream: where its terminator (the final ``data: [DONE]`` event)
    starts in ``chunk``, -1 when the chunk does not end the stream."""
    if not _sse_end(chunk):
        return -1
    return _event_start(chunk, len(chunk) - (4 if chunk.endswith(b"\r\n\r\n") else 2))


_RESPONSES_END = (b"response.completed", b"response.incomplete", b"response.failed")


def _responses_hold(chunk: bytes) -> int:
    """A /v1/responses stream (no ``[DONE]``): where its first terminal event starts in
    ``chunk``, else as :func:`_sse_hold`."""
    at = min((i for i in (chunk.find(m) for m in _RESPONSES_END) if i >= 0), default=-1)
    return _sse_hold(chunk) if at < 0 else _event_start(chunk, at)


def _length_reached(ex: Exchange, length: int) -> Callable[[bytes], int]:
    """For a response with a content-length: the chunk that brings the body to its full length is
    held whole (0), earlier ones not at all (-1)."""

    def reached(chunk: bytes) -> int:
        return 0 if ex.response_bytes >= length else -1

    return reached


#: What makes an event need :meth:`_UsageStripper.feed`'s attention (``[DONE]`` too, once finish
#: chunks are held).
_INTERESTING = (b'"usage"', b'"finish_reason":"')


class _UsageStripper:
    """Removes the usage-only SSE event we asked for, passing everything else through.

    Only complete events are passed on (bytes after the last event boundary wait for the next
    chunk), so an event split across messages is still recognised. Servers like vLLM send one
    event per message, so nothing is held back in practice.

    vLLM stamps ``system_fingerprint`` on every finish chunk (one per choice) when usage is not
    requested, and only on the usage chunk when it is. So finish chunks wait for the usage
    chunk (other events pass on meanwhile, as does nothing after ``[DONE]``) and get the
    fingerprint back exactly where vLLM puts it for a request without usage: the client
    receives what it would have without us, for any ``n``. With ``n > 1`` a choice that
    finishes early has its finish chunk delivered after other choices' later events (each
    choice's own events keep their order).
    """

    __slots__ = ("captured", "carry", "held", "sep")

    def __init__(self) -> None:
        self.carry = b""
        self.captured: bytes | None = None
        self.held: list[bytes] = []
        #: The stream's event boundary, LF LF (vLLM, OpenAI) or CR LF CR LF (also SSE), learnt
        #: from the first boundary seen; None until then.
        self.sep: bytes | None = None

    def needs(self, chunk: bytes) -> bool:
        """Whether ``chunk`` must go through :meth:`feed` (the hot path skips it otherwise)."""
        sep = self.sep
        return bool(
            sep is None
            or self.carry
            or not chunk.endswith(sep)
            or b'"usage"' in chunk
            or (self.captured is None and b'"finish_reason":"' in chunk)
            or (self.held and b"[DONE]" in chunk)
        )

    def feed(self, chunk: bytes) -> bytes:
        data = self.carry + chunk if self.carry else chunk
        self.carry = b""
        sep = self.sep
        if sep is None:
            lf, crlf = data.find(b"\n\n"), data.find(b"\r\n\r\n")
            if lf >= 0 or crlf >= 0:
                sep = self.sep = b"\r\n\r\n" if crlf >= 0 and (lf < 0 or crlf < lf) else b"\n\n"
        elif not self.needs(data):
            return data
        cut = data.rfind(sep) if sep is not None else -1
        if sep is None or cut < 0:
            if len(data) > 1 << 20:  # not SSE framing we understand: stop holding anything
                return self._release(None) + data
            self.carry = data
            return b""
        n = len(sep)
        head = data[: cut + n]
        self.carry = data[cut + n :]
        out = []
        # The events before the first one that may need handling pass on as one slice (a stream
        # that arrives coalesced, many events per read, is not split and re-joined event by event);
        # not when blank lines would make empty events, which the loop below drops.
        lead = len(head)
        if self.captured is None:
            for pat in (b'"usage"', b'"finish_reason":"', b"data: [DONE]") if self.held else _INTERESTING:
                i = head.find(pat, 0, lead)
                if i >= 0:
                    lead = i
            if lead < len(head):
                end = head.rfind(sep, 0, lead)  # the boundary before that event, if any
                lead = end + n if end >= 0 else 0
        if lead and (head.startswith(sep) or head.find(sep + sep[: n // 2], 0, lead + n // 2) >= 0):
            lead = 0
        if lead:
            out.append(head if lead == len(head) else head[:lead])
            head = head[lead:]
        for event in head.split(sep):
            if not event:
                continue
            if self.captured is None and b'"usage"' in event and _usage_only(event):
                self.captured = event
                out.append(self._release(_fingerprint(event)))
                continue
            if self.captured is None and (
                b'"finish_reason":"' in event or (self.held and event.startswith(b"data: [DONE]"))
            ):
                self.held.append(event)
                continue
            out.append(event)
            out.append(sep)
        return b"".join(out)

    def _release(self, fingerprint: str | None) -> bytes:
        if not self.held:
            return b""
        out = []
        sep = self.sep or b"\n\n"
        patch = b',"system_fingerprint":' + orjson.dumps(fingerprint) + b"}" if fingerprint else None
        for event in self.held:
            if (
                patch is not None
                and b'"finish_reason":"' in event
                and b'"system_fingerprint"' not in event
                and event.endswith(b"]}")
            ):
                event = event[:-1] + patch
            out.append(event)
            out.append(sep)
        self.held = []
        return b"".join(out)

    def flush(self) -> bytes:
        data, self.carry = self.carry, b""
        return self._release(None) + data


def _fingerprint(event: bytes) -> str | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                obj = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return None
            fp = obj.get("system_fingerprint") if isinstance(obj, dict) else None
            return fp if isinstance(fp, str) else None
    return None


def _usage_only(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                obj = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                return False
            return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
    return False


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("the record was not durable in time"))


async def _send_error(
    send: Send, status: int, code: str, message: str, rid: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    type_ = "invalid_request_error" if status < 500 else "service_unavailable"
    if status == 401:
        type_ = "authentication_error"
    elif status == 429:
        type_ = "rate_limit_error"
    headers = [JSON_HEADER]
    if rid:
        headers.append((b"x-request-id", rid))
    if extra:
        headers.extend(extra)
    await send_bytes(send, status, error_body(message, type_, code), headers)


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await send_bytes(send, status, orjson.dumps(payload))
