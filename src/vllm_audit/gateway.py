"""``vllm-audit serve``: the audit middleware around a proxy (or the built-in demo engine).

One audit code path: the gateway is ``AuditMiddleware(Proxy(upstream))``; with no upstream it is
``AuditMiddleware(DemoEngine())``. Each uvicorn worker process builds its own app (and so owns
its own writer and chain) through the ``create_app`` factory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from vllm_audit.config import ENV_CONFIG, ENV_OVERRIDES, Config, config_from_env
from vllm_audit.demo import DemoEngine
from vllm_audit.middleware import AuditMiddleware
from vllm_audit.proxy import Proxy
from vllm_audit.types import ASGIApp


def create_app(config: Config | None = None) -> AuditMiddleware:
    """Build the gateway app (also the uvicorn factory: config from the environment)."""
    cfg = config if config is not None else config_from_env()
    _ensure_logging()
    upstream = cfg.gateway.upstream
    inner: ASGIApp = Proxy(upstream, cfg.gateway) if upstream else DemoEngine(cfg.gateway)
    return AuditMiddleware(inner, cfg, upstream=upstream or "demo", ops_at_root=True)


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
    uvicorn.run(
        "vllm_audit.gateway:create_app",
        factory=True,
        host=gw.host,
        port=gw.port,
        workers=gw.workers if gw.workers > 1 else None,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
        # uvicorn would rewrite the client address from X-Forwarded-For (it trusts 127.0.0.1 by
        # default); the audit edge resolves it itself, from [edge] trusted_proxies only.
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
    )
