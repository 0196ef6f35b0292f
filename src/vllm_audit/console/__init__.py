"""The auditor's console: server-rendered pages under ``{edge.ops_prefix}/console`` (docs/console.md).

The middleware (and so the gateway) mounts it next to the audit API; ``vllm-audit console`` serves
it alone, beside a vLLM that runs the middleware::

    console = build_console(config, submit_event, audit_api)   # None when the audit API is off
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_audit.config import Config
    from vllm_audit.console.app import Console, SubmitEvent

__all__ = ["build_console"]


def build_console(config: Config, submit_event: SubmitEvent, audit_api: Any = None) -> Console | None:
    """The console app, or None when ``[access.api] enabled = false`` (the console reads as the API does).

    ``submit_event(entry)`` returns an awaitable that completes when the view's event is durable.
    ``audit_api`` (an :class:`~vllm_audit.access.api.AuditApi`) is reused for its store and roles.
    """
    if not config.access.api.enabled:
        return None
    from vllm_audit.access.api import AuditApi
    from vllm_audit.console.app import Console

    return Console(config, submit_event, audit_api if isinstance(audit_api, AuditApi) else None)
