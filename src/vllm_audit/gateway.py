"""``vllm-audit serve``: the audit middleware around a proxy (or the built-in demo engine).

One audit code path: the gateway is ``AuditMiddleware(Proxy(upstream))``; with no upstream it is
``AuditMiddleware(DemoEngine())``. Each uvicorn worker process builds its own app (and so owns
its own writer and chain) through the ``create_app`` factory.

Connections are guarded (issue: idle and slow clients must not exhaust the server): uvicorn
closes idle keep-alive connections (``[gateway] keep_alive_timeout_s``) and answers 503 beyond
``max_client_connections``; :class:`GuardedHttpTools` (uvicorn's httptools protocol) also closes
a connection that does not deliver a request's headers within ``header_timeout_s`` (an idle new
connection included) or whose request head grows past ``max_header_bytes``; the middleware
bounds the body (``[edge] body_timeout_s``, ``max_request_bytes``). With ``ops_port`` set,
/healthz, /readyz and /metrics are also served on a listener of their own, so probes still get
through when the main port is at its connection limit.

With ``--workers N`` every worker listens on a socket of its own on the same port
(``SO_REUSEPORT``), so the kernel spreads new connections over the workers by their address hash.
uvicorn's default shares one listening socket between the workers, and whichever worker wakes
first accepts a whole burst: under wrk's 64 keep-alive connections one worker of two served
about two thirds of the requests while the other sat partly idle. The supervisor keeps a socket
bound to the port without listening on it (the port is held and a conflict fails at start; the
kernel queues no connection on a socket that does not listen).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vllm_audit.config import ENV_CONFIG, ENV_OVERRIDES, Config, config_from_env
from vllm_audit.demo import DemoEngine
from vllm_audit.middleware import AuditMiddleware
from vllm_audit.proxy import Proxy
from vllm_audit.types import ASGIApp


def create_app(config: Config | None = None) -> AuditMiddleware:
    """Build the gateway app (also the uvicorn factory: config from the environment)."""
    cfg = config if config is not None else config_from_env()
    _ensure_logging()
    gw = cfg.gateway
    GuardedHttpTools.header_timeout_s = gw.header_timeout_s
    GuardedHttpTools.max_head_bytes = gw.max_header_bytes
    upstream = gw.upstream
    inner: ASGIApp = Proxy(upstream, gw) if upstream else DemoEngine(gw)
    ops = (gw.ops_host, gw.ops_port) if gw.ops_port else None
    return AuditMiddleware(
        inner, cfg, upstream=upstream or "demo", ops_at_root=True, ops_listener=ops, tune_gc=True
    )


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request head.

    uvicorn arms its keep-alive timer only after a response, so a connection that never sends a
    complete request (an idle new socket, headers dribbled a byte at a time) would stay open
    for ever; here the head of every request must arrive within ``header_timeout_s``.
    """

    header_timeout_s = 10.0
    max_head_bytes = 1024 * 1024

    def connection_made(self, transport: Any) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._in_head = True
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._disarm()
                self.send_400_response("Request head too large.")
                return
            super().data_received(data)
            # Armed only when this data left the head incomplete (a head that arrives whole in
            # one read, the usual case, costs no timer); the deadline runs from its first bytes.
            if self._in_head and self._head_bytes and not self.transport.is_closing():
                self._arm()
            return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _held_port(sock: socket.socket) -> bool:
    """A socket the supervisor bound with SO_REUSEPORT and never put in the listening state."""
    return bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    )


def hold_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT without listening: the workers' sockets join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reuse_port_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory for workers (``loop="vllm_audit.gateway:reuse_port_loop"``)."""
    import uvloop

    class ReusePortLoop(uvloop.Loop):
        """uvloop whose ``create_server(sock=<held port>)`` listens on a socket of this process's
        own, bound to the same address with SO_REUSEPORT, instead of the supervisor's shared one."""

        async def create_server(  # type: ignore[override]  # one signature for the overloads
            self, protocol_factory: Any, *args: Any, sock: socket.socket | None = None, **kwargs: Any
        ) -> asyncio.AbstractServer:
            if sock is not None and _held_port(sock):
                own = socket.socket(sock.family, socket.SOCK_STREAM)
                own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                own.bind(sock.getsockname())
                sock = own
            return await super().create_server(protocol_factory, *args, sock=sock, **kwargs)

    return ReusePortLoop()


def _ensure_logging() -> None:
    """Worker processes start with no handler for our loggers; give them one (stderr, INFO)."""
    ours = logging.getLogger("vllm_audit")
    if not ours.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def run(config_path: str | None, overrides: dict[str, Any]) -> None:
    """Run the gateway with uvicorn (uvloop + httptools) in the foreground."""
    import uvicorn

    if config_path:
        os.environ[ENV_CONFIG] = os.path.abspath(config_path)
    if overrides:
        os.environ[ENV_OVERRIDES] = json.dumps(overrides)
    cfg = config_from_env()  # fail fast, in the parent, on a bad file
    gw = cfg.gateway
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vllm_audit").info(
        "vllm-audit gateway on http://%s:%d -> %s; log dir %s; durability %s; on failure %s",
        gw.host,
        gw.port,
        gw.upstream or "built-in demo engine",
        os.path.abspath(cfg.log.dir),
        cfg.log.durability,
        cfg.log.on_failure,
    )
    settings: dict[str, Any] = dict(
        factory=True,
        host=gw.host,
        port=gw.port,
        http="vllm_audit.gateway:GuardedHttpTools",
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
        # uvicorn would rewrite the client address from X-Forwarded-For (it trusts 127.0.0.1 by
        # default); the audit edge resolves it itself, from [edge] trusted_proxies only.
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=cast(int, gw.keep_alive_timeout_s),  # used with call_later: floats work
        limit_concurrency=gw.max_client_connections or None,
        timeout_graceful_shutdown=10,
    )
    if gw.workers <= 1:
        uvicorn.run("vllm_audit.gateway:create_app", loop="uvloop", **settings)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "vllm_audit.gateway:create_app", workers=gw.workers, loop="vllm_audit.gateway:reuse_port_loop", **settings
    )
    try:
        held = hold_port(gw.host, gw.port)
    except OSError as exc:
        raise SystemExit(f"vllm-audit serve: cannot bind {gw.host}:{gw.port}: {exc.strerror or exc}") from None
    try:
        Multiprocess(config, sockets=[held]).run()
    except KeyboardInterrupt:  # pragma: no cover - the supervisor handles SIGINT itself
        pass
    finally:
        held.close()
