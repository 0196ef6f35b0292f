"""Access: identity (API keys, JWT, trusted headers), quotas, the query store and the audit API.

The seam the middleware and gateway use (see docs/access.md)::

    auth = build_authenticator(config)        # None when [access] auth = "none"
    identity = await auth.authenticate(scope)
    quota = build_quota(config)               # None when no limit is configured
    retry_after = await quota.check(identity, route)
    api = build_audit_api(config, submit_event)
    projections = build_projections(config)   # query store + quota charging, for the runner
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_audit.access.identity import Identity

if TYPE_CHECKING:
    from vllm_audit.access.api import AuditApi, SubmitEvent
    from vllm_audit.access.auth import Authenticator
    from vllm_audit.access.quota import Quota
    from vllm_audit.config import Config
    from vllm_audit.ship.base import Projection

__all__ = ["Identity", "build_audit_api", "build_authenticator", "build_projections", "build_quota"]


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


def build_audit_api(config: Config, submit_event: SubmitEvent) -> AuditApi | None:
    """The ASGI app serving ``{edge.ops_prefix}/v1/...``, or None when disabled.

    ``submit_event(entry)`` must return an awaitable that completes when the event is durable and
    fails when it cannot be written (the API then answers 503).
    """
    from vllm_audit.access.api import build_audit_api as build

    return build(config, submit_event)


def build_projections(config: Config) -> list[Projection]:
    """The access area's projections of the log (query store, quota charging) for the runner."""
    from vllm_audit.access.projection import build_projections as build

    return build(config)
