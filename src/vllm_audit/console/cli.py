"""``vllm-audit console --config FILE``: the console alone, for deployments running vLLM with the middleware.

It reads the same log directory and query store as the vLLM process and writes its audit events
into a chain of its own (one writer per process); it does not run the projections (the vLLM
process or ``vllm-audit ship`` does).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("console", help="serve the auditor's console (and the audit API) on its own")
    p.add_argument("--config", required=True, help="TOML configuration file (the one vLLM's middleware uses)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8300, help="port to listen on (default 8300)")
    p.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    import uvicorn

    from vllm_audit.config import load_config

    config = load_config(args.config)
    app = build_app(config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on")
    return 0


def build_app(config: Any) -> Any:
    """The ASGI app of ``vllm-audit console``: console + audit API, events into this process's own chain."""
    from vllm_audit import hooks
    from vllm_audit.console import build_console
    from vllm_audit.errors import ConfigError
    from vllm_audit.types import Receive, Scope, Send
    from vllm_audit.writer import AuditWriter

    writer = AuditWriter(config, run_projections=False)
    submit = hooks.durable_submitter(writer.submit_event)
    api = hooks.build_audit_api(config, writer.submit_event)
    console = build_console(config, submit, api)
    if console is None:
        raise ConfigError("the console needs the audit API: [access.api] enabled = true.")
    base = console.base

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    writer.start()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    writer.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = str(scope.get("path", ""))
        if path == base or path.startswith(base + "/"):
            await console(scope, receive, send)
        elif api is not None and path.startswith(config.edge.ops_prefix.rstrip("/") + "/v1"):
            ident = None
            if console.authenticator is not None:
                ident = await console.authenticator.authenticate(scope)
            inner = dict(scope)
            if ident is not None:
                inner["vllm_audit.identity"] = ident
            await api(inner, receive, send)
        elif path in ("/", ""):
            await send({"type": "http.response.start", "status": 303, "headers": [(b"location", base.encode() + b"/")]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found"})

    return app
