"""The authenticator the middleware calls once per request: scope -> Identity."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_audit.access.apikeys import KeyStore
from vllm_audit.access.config import AccessConfig, TrustedHeaderConfig
from vllm_audit.access.identity import Identity
from vllm_audit.access.jwtauth import JwtAuthenticator, looks_like_jwt
from vllm_audit.errors import ConfigError

if TYPE_CHECKING:
    from vllm_audit.config import Config

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def base_dir(config: Config) -> Path | None:
    return Path(config.source).resolve().parent if config.source else None


def resolve_path(config: Config, path: str) -> Path:
    p = Path(path)
    b = base_dir(config)
    return p if p.is_absolute() or b is None else b / p


def header(scope: Any, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1").strip()
    return None


def parse_networks(cidrs: tuple[str, ...], where: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}.") from None


def peer_in(scope: Any, networks: tuple[Network, ...]) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        ip = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


class TrustedHeaderAuthenticator:
    def __init__(self, cfg: TrustedHeaderConfig) -> None:
        self.networks = parse_networks(cfg.trusted_proxies, "[access.trusted_header] trusted_proxies")
        self.user = cfg.user_header.lower().encode("latin-1")
        self.org = cfg.org_header.lower().encode("latin-1")
        self.roles = cfg.roles_header.lower().encode("latin-1")

    def authenticate(self, scope: Any) -> Identity:
        user = header(scope, self.user)
        org = header(scope, self.org)
        if not peer_in(scope, self.networks):
            if user or org:
                return Identity.failed("header", "identity headers from an untrusted peer")
            return Identity.failed("header", "untrusted peer")
        if not user or not org:
            return Identity.failed("header", "missing identity headers")
        roles = tuple(r.strip() for r in (header(scope, self.roles) or "").split(",") if r.strip())
        return Identity(user_id=user, org_id=org, roles=roles, auth_status="trusted_header", auth_method="header")


class Authenticator:
    """``await authenticate(scope)`` never raises; failures come back as ``auth_status="failed"``."""

    def __init__(self, config: Config) -> None:
        acc: AccessConfig = config.access
        self.mode = acc.auth
        self.keys: KeyStore | None = None
        self.jwt: JwtAuthenticator | None = None
        self.trusted: TrustedHeaderAuthenticator | None = None
        self.key_header = acc.api_keys.header.lower().encode("latin-1")
        if self.mode in ("api_key", "api_key+jwt"):
            if not acc.api_keys.file:
                raise ConfigError(f"[access.api_keys] file is required when auth = {self.mode!r}.")
            self.keys = KeyStore(resolve_path(config, acc.api_keys.file))
        if self.mode in ("jwt", "api_key+jwt"):
            self.jwt = JwtAuthenticator(acc.jwt, base_dir(config))
        if self.mode == "trusted_header":
            self.trusted = TrustedHeaderAuthenticator(acc.trusted_header)

    async def authenticate(self, scope: Any) -> Identity:
        try:
            return await self._authenticate(scope)
        except Exception:  # a bug here must answer 401, never let a caller through
            return Identity.failed(_method(self.mode), "authentication error")

    async def _authenticate(self, scope: Any) -> Identity:
        if self.trusted is not None:
            return self.trusted.authenticate(scope)
        bearer = None
        authz = header(scope, b"authorization")
        if authz:
            scheme, _, value = authz.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return Identity.failed(_method(self.mode), "unsupported authorization scheme")
            bearer = value.strip()
        api_key = header(scope, self.key_header) if self.keys is not None else None
        if self.jwt is not None and bearer is not None and (self.keys is None or looks_like_jwt(bearer)):
            return await self.jwt.authenticate(bearer)
        if self.keys is not None and (api_key or bearer):
            return self.keys.verify(api_key or bearer or "")
        return Identity.failed(_method(self.mode), "missing credentials")


def _method(mode: str) -> Any:
    return {"api_key": "api_key", "jwt": "jwt", "api_key+jwt": "api_key", "trusted_header": "header"}.get(mode, "none")
