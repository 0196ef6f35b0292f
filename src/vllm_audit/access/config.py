"""The ``[access]`` section: authentication, quotas, the query store and the audit API.

Every sub-table is a frozen dataclass parsed strictly by ``vllm_audit.config.parse_section``::

    [access]
    auth = "api_key+jwt"

    [access.api_keys]
    file = "/etc/vllm-audit/keys.json"

    [access.jwt]
    algorithms = ["RS256", "ES256"]
    issuer = "https://idp.example.com/"
    audience = "vllm"
    jwks_url = "https://idp.example.com/.well-known/jwks.json"

    [access.quota]
    redis_url = "redis://127.0.0.1:6379/0"
    [access.quota.per_user]
    requests_per_min = 60
    tokens_per_min = 100000

    [access.store]
    kind = "postgresql"
    dsn = "postgresql://vllm_audit_owner@db/audit"
    reader_dsn = "postgresql://vllm_audit_reader@db/audit"
"""

from __future__ import annotations

import dataclasses
from typing import Literal

AuthMode = Literal["none", "api_key", "jwt", "api_key+jwt", "trusted_header"]


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    """The API key store (``[access.api_keys]``)."""

    #: JSON file holding key *hashes* (never the keys); required in the api_key modes.
    #: Re-read whenever its mtime/size/inode changes, so a revocation takes effect at once.
    file: str = ""
    #: Headers a key is read from: ``Authorization: Bearer <key>`` and this one.
    header: str = "x-api-key"


@dataclasses.dataclass(frozen=True, slots=True)
class JwtConfig:
    """JWT bearer tokens (``[access.jwt]``)."""

    #: Accepted algorithms. "none" is never accepted.
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    #: Required ``iss``; empty: not checked.
    issuer: str = ""
    #: Required ``aud`` (one of these); empty: not checked.
    audience: tuple[str, ...] = ()
    #: Clock skew tolerated on ``exp``/``nbf``/``iat``, seconds.
    leeway_s: float = 30.0
    #: Tokens must carry ``exp``.
    require_exp: bool = True
    #: JWKS document on disk (re-read when it changes).
    jwks_file: str = ""
    #: JWKS document over HTTP(S); fetched at first use and cached.
    jwks_url: str = ""
    #: How long a fetched JWKS is trusted before it is fetched again.
    jwks_cache_ttl_s: float = 300.0
    #: Smallest interval between two refetches triggered by an unknown ``kid``.
    jwks_min_refetch_s: float = 10.0
    #: Timeout of a JWKS fetch.
    jwks_timeout_s: float = 5.0
    #: File with the shared secret for HS256/HS384/HS512 (whole file, trailing newline stripped).
    hs_secret_file: str = ""
    #: Claim carrying the user id.
    user_claim: str = "sub"
    #: Claim carrying the tenant (org) id.
    org_claim: str = "org_id"
    #: Claim carrying the roles (a list, or a space/comma separated string).
    roles_claim: str = "roles"
    #: Org used when the token has no org claim; empty: such tokens fail.
    default_org: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TrustedHeaderConfig:
    """Identity asserted by a trusted reverse proxy (``[access.trusted_header]``)."""

    #: Peers (the TCP client of this server) allowed to assert identity headers.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    user_header: str = "x-auth-user"
    org_header: str = "x-auth-org"
    #: Comma separated roles.
    roles_header: str = "x-auth-roles"


@dataclasses.dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Limits for one dimension; 0 means unlimited."""

    requests_per_min: int = 0
    tokens_per_min: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Rate limits (``[access.quota]``). Fixed one-minute windows, atomic in Redis."""

    #: Limits per API key (callers authenticated by key).
    per_key: QuotaLimits = dataclasses.field(default_factory=QuotaLimits)
    #: Limits per user (a user id counts separately in each org).
    per_user: QuotaLimits = dataclasses.field(default_factory=QuotaLimits)
    #: Limits per org (tenant).
    per_org: QuotaLimits = dataclasses.field(default_factory=QuotaLimits)
    #: Redis shared by all replicas; empty: counters live in this process (one replica only, and
    #: token charging must run in the same process: ``[ship] in_process = true``).
    redis_url: str = ""
    #: Prefix of the Redis keys.
    redis_prefix: str = "vllm_audit:quota"
    #: What happens when Redis is unreachable: "allow" (fail open) or "deny" (fail closed).
    on_redis_error: Literal["allow", "deny"] = "allow"
    #: Routes the quota applies to (exact match); empty: every route the middleware checks.
    routes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class StoreConfig:
    """The query store behind the audit API (``[access.store]``)."""

    #: "sqlite" (embedded, default) or "postgresql" (row-level security).
    kind: Literal["sqlite", "postgresql"] = "sqlite"
    #: SQLite file; empty: ``<log dir>/index.sqlite``.
    path: str = ""
    #: PostgreSQL DSN of the owner role: creates the schema, the reader role and the viewer
    #: functions, and writes the rows (the query-store projection). Needs CREATE on the schema and,
    #: unless ``reader_role`` exists already, CREATEROLE (see docs/access.md).
    dsn: str = ""
    #: PostgreSQL DSN the audit API reads with (a LOGIN role that is a member of ``reader_role``;
    #: only this login and the owner may declare whose eyes a read runs with). Empty: the API
    #: reads over ``dsn`` and switches to ``reader_role`` with ``SET LOCAL ROLE``.
    reader_dsn: str = ""
    #: The reader role; created (NOLOGIN) by the store's initialisation when it does not exist,
    #: whether or not ``reader_dsn`` is set.
    reader_role: str = "vllm_audit_reader"
    #: Table name prefix (PostgreSQL schema objects / SQLite tables).
    table_prefix: str = "vllm_audit"
    #: Before an audit API read, wait at most this long for the store's projection to reach the
    #: log's signed end (0: never wait). The projection runs in the runner, not in the request.
    read_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.read_wait_s <= 30:
            raise ValueError("read_wait_s must be between 0 and 30")


@dataclasses.dataclass(frozen=True, slots=True)
class AuditApiConfig:
    """The audit query API under ``{edge.ops_prefix}/v1`` (``[access.api]``)."""

    enabled: bool = True
    #: Role names as they appear in keys and tokens. Any other authenticated caller is a "user"
    #: (sees only their own calls).
    admin_role: str = "platform_admin"
    auditor_role: str = "org_auditor"
    #: Page size when ``limit`` is not given, and the largest allowed.
    default_limit: int = 50
    max_limit: int = 500


@dataclasses.dataclass(frozen=True, slots=True)
class AccessConfig:
    """Authentication, quotas, query store and audit API (``[access]``)."""

    #: "none": every caller is anonymous (auth is the upstream's business); "api_key"; "jwt";
    #: "api_key+jwt" (a bearer that parses as a JWT is a JWT, anything else an API key);
    #: "trusted_header" (identity headers from trusted proxies only).
    auth: AuthMode = "none"
    api_keys: ApiKeysConfig = dataclasses.field(default_factory=ApiKeysConfig)
    jwt: JwtConfig = dataclasses.field(default_factory=JwtConfig)
    trusted_header: TrustedHeaderConfig = dataclasses.field(default_factory=TrustedHeaderConfig)
    quota: QuotaConfig = dataclasses.field(default_factory=QuotaConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    api: AuditApiConfig = dataclasses.field(default_factory=AuditApiConfig)
