"""Where the edge meets the access area: identity, quotas, the audit API.

The middleware calls these and nothing else of ``vllm_audit.access``, so the seam is one file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_audit.config import Config
from vllm_audit.types import ASGIApp

Listener = Callable[[list[dict[str, Any]]], None]


def anonymous() -> Any:
    from vllm_audit.access.identity import Identity

    return Identity.anonymous()


def build_authenticator(config: Config) -> Any:
    from vllm_audit import access

    return access.build_authenticator(config)


def build_quota(config: Config) -> Any:
    from vllm_audit import access

    return access.build_quota(config)


def build_audit_api(config: Config, submit_event: Callable[[dict[str, Any]], None]) -> ASGIApp | None:
    from vllm_audit import access

    app: ASGIApp | None = access.build_audit_api(config, submit_event)
    return app


def token_charger(quota: Any) -> Listener | None:
    """A post-commit listener charging each record's tokens to the caller's token quotas."""
    charge = getattr(quota, "charge_tokens", None)
    if charge is None:
        return None

    def listener(entries: list[dict[str, Any]]) -> None:
        for rec in entries:
            if rec.get("record_type") == "inference" and rec.get("total_tokens"):
                charge(rec, int(rec["total_tokens"]))

    return listener
