"""Access: identity (API keys, JWT, trusted headers), quotas, the query store and the audit API.

The seam the middleware and gateway use (see docs/internals.md and docs/access.md)::

    auth = build_authenticator(config)        # None when [access] auth = "none"
    identity = await auth.authenticate(scope)
    quota = build_quota(config)               # None when no limit is configured
    retry_after = await quota.check(identity, route)
    quota.charge_tokens(record, total_tokens) # writer thread
    api = build_audit_api(config, submit_event)
    await run_ingester(config, stop)          # background task keeping the query store fresh
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm_audit.access.identity import Identity

if TYPE_CHECKING:
    from vllm_audit.access.api import AuditApi
    from vllm_audit.access.auth import Authenticator
    from vllm_audit.access.quota import Quota
    from vllm_audit.config import Config

__all__ = ["Identity", "build_audit_api", "build_authenticator", "build_quota", "run_ingester"]


def build_authenticator(config: Config) -> Authenticator | None:
    """The authenticator for ``[access] auth``, or None when it is "none"."""
    if config.access.auth == "none":
        return None
    from vllm_audit.access.auth import Authenticator

    return Authenticator(config)


def build_quota(config: Config) -> Quota | None:
    """The quota enforcer, or None when no limit is configured."""
    from vllm_audit.access.quota import Quota, quota_enabled

    return Quota(config.access.quota) if quota_enabled(config.access.quota) else None


def build_audit_api(config: Config, submit_event: Callable[[dict[str, Any]], None]) -> AuditApi | None:
    """The ASGI app serving ``{edge.ops_prefix}/v1/...``, or None when disabled."""
    from vllm_audit.access.api import build_audit_api as build

    return build(config, submit_event)


async def run_ingester(config: Config, stop: asyncio.Event) -> None:
    """Keep the query store up to date from the local log until ``stop`` is set."""
    from vllm_audit.access.ingest import run_ingester as run

    await run(config, stop)
