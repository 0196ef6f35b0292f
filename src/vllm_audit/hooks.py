"""Where the edge meets the access area: identity, quotas, the audit API, the access projections.

The middleware and the runner wiring call these and nothing else of ``vllm_audit.access``, so the
seam is one file.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from vllm_audit.config import Config
from vllm_audit.types import ASGIApp

log = logging.getLogger("vllm_audit.console")
_TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)


def anonymous() -> Any:
    from vllm_audit.access.identity import Identity

    return Identity.anonymous()


def build_authenticator(config: Config) -> Any:
    from vllm_audit import access

    return access.build_authenticator(config)


def build_quota(config: Config) -> Any:
    from vllm_audit import access

    return access.build_quota(config)


def build_audit_api(config: Config, submit_event: Callable[..., Any]) -> ASGIApp | None:
    """The audit API, given the writer's ``submit_event``; every API request's event is awaited
    until durable (``submit_event(entry, wait=True)`` returns a future failing when it is not)."""
    from vllm_audit import access

    app: ASGIApp | None = access.build_audit_api(config, durable_submitter(submit_event))
    return app


def build_console(config: Config, submit_event: Callable[..., Any], audit_api: Any) -> ASGIApp | None:
    """The auditor's console (``{ops_prefix}/console``), or None when the audit API is off.

    Built on its first request, not here: it needs files under the log directory (its session
    key), and a log directory that is unusable at start must cost the edge nothing but a 503 from
    the console (the failure policy covers the records), never a failed start.
    """
    if audit_api is None:
        return None
    from vllm_audit.errors import AuditError

    state: dict[str, ASGIApp | None] = {}

    async def console(scope: Any, receive: Any, send: Any) -> None:
        if "app" not in state:
            from vllm_audit.console import build_console as build

            try:
                state["app"] = build(config, durable_submitter(submit_event), audit_api)
            except AuditError as exc:
                from vllm_audit._asgi import send_bytes

                log.error("console unavailable: %s", exc)
                await send_bytes(send, 503, b"The console is unavailable: the audit log cannot be used.\n", _TEXT)
                return
        app = state["app"]
        if app is None:
            from vllm_audit._asgi import send_bytes

            await send_bytes(send, 404, b"Not found.\n", _TEXT)
            return
        await app(scope, receive, send)

    return console


def durable_submitter(submit_event: Callable[..., Any]) -> Callable[[dict[str, Any]], Awaitable[None] | None]:
    """Adapt ``AuditWriter.submit_event`` so each call waits for durability.

    A ``submit_event`` without a ``wait`` parameter (a writer predating it) cannot report
    durability: its calls are passed through, and the API serves once the event is queued.
    """
    try:
        waits = "wait" in inspect.signature(submit_event).parameters
    except (TypeError, ValueError):
        waits = False
    if not waits:
        return submit_event

    def submit(entry: dict[str, Any]) -> Awaitable[None] | None:
        fut = submit_event(entry, wait=True)
        return fut if fut is None or inspect.isawaitable(fut) else asyncio.sleep(0)

    return submit


def build_projections(config: Config) -> list[Any]:
    """The access area's projections (query store, quota charging) for the lead's runner."""
    from vllm_audit import access

    return access.build_projections(config)
