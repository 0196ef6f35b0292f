"""Who is calling: the result of authentication, carried into the record and the audit API."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

AuthStatus = Literal["authenticated", "anonymous", "failed", "trusted_header"]
AuthMethod = Literal["api_key", "jwt", "header", "none"]

#: Where the middleware puts the caller's identity in the ASGI scope.
SCOPE_KEY = "vllm_audit.identity"


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    org_id: str
    roles: tuple[str, ...] = ()
    auth_status: AuthStatus = "authenticated"
    auth_method: AuthMethod = "none"
    key_id: str | None = None
    failure_reason: str | None = None

    @classmethod
    def anonymous(cls) -> Identity:
        return cls(user_id="anonymous", org_id="unknown", roles=(), auth_status="anonymous", auth_method="none")

    @classmethod
    def failed(cls, method: AuthMethod, reason: str, key_id: str | None = None) -> Identity:
        return cls(
            user_id="anonymous",
            org_id="unknown",
            roles=(),
            auth_status="failed",
            auth_method=method,
            key_id=key_id,
            failure_reason=reason,
        )

    @property
    def quota_subject(self) -> dict[str, str]:
        """The quota counters' names for this caller (one-way hashes; recorded by the edge as
        ``quota_subject`` so that charging from the redacted record names the same counters)."""
        from vllm_audit.access.quota import quota_subject

        return quota_subject(self.user_id, self.org_id, self.key_id)

    @property
    def ok(self) -> bool:
        return self.auth_status in ("authenticated", "trusted_header")

    def as_actor(self) -> dict[str, Any]:
        """The fields that describe this caller in an audit event."""
        return {
            "user_id": self.user_id,
            "org_id": self.org_id,
            "roles": list(self.roles),
            "auth_status": self.auth_status,
            "auth_method": self.auth_method,
            "key_id": self.key_id,
        }


def identity_from_scope(scope: Any) -> Identity | None:
    """The identity the middleware attached to ``scope`` (key or ``state``), if any."""
    ident = scope.get(SCOPE_KEY)
    if isinstance(ident, Identity):
        return ident
    state = scope.get("state")
    if isinstance(state, dict):
        for key in (SCOPE_KEY, "identity"):
            ident = state.get(key)
            if isinstance(ident, Identity):
                return ident
    return None
