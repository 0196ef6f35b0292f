"""Where the edge meets the access area: identity, quotas, the audit API, the access projections.

The middleware and the runner wiring call these and nothing else of ``vllm_audit.access``, so the
seam is one file.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from vllm_audit.config import Config
from vllm_audit.types import ASGIApp


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
    """The auditor's console (``{ops_prefix}/console``), or None when the audit API is off."""
    from vllm_audit.console import build_console as build

    app: ASGIApp | None = build(config, durable_submitter(submit_event), audit_api)
    return app


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
