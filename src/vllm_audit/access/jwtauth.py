"""JWT bearer tokens (PyJWT): RS256/ES256/EdDSA via a JWKS (file or URL), HS256 via a secret file.

The JWKS from a URL is cached for ``jwks_cache_ttl_s``; a token whose ``kid`` is unknown triggers
one refetch (at most every ``jwks_min_refetch_s``), which is how key rotation is picked up.
Algorithm confusion is impossible by construction: HMAC algorithms are verified only with the
HMAC secret, the others only with JWKS public keys, and ``none`` is never accepted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from vllm_audit.access.config import JwtConfig
from vllm_audit.access.identity import Identity
from vllm_audit.errors import ConfigError

log = logging.getLogger(__name__)

HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class Jwks:
    """Public keys by ``kid`` from a JWKS file and/or URL."""

    def __init__(self, cfg: JwtConfig, base_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.file = _resolve(cfg.jwks_file, base_dir) if cfg.jwks_file else None
        self.url = cfg.jwks_url
        self._file_stamp: tuple[int, int, int] | None = None
        self._file_keys: list[jwt.PyJWK] = []
        self._url_keys: list[jwt.PyJWK] = []
        self._fetched_at = 0.0
        self._last_attempt = -1e18
        self._lock = asyncio.Lock()

    def _refresh_file(self) -> None:
        if self.file is None:
            return
        try:
            st = os.stat(self.file)
        except OSError:
            self._file_keys, self._file_stamp = [], None
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._file_stamp:
            try:
                self._file_keys = _parse_jwks(self.file.read_bytes())
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                log.warning("JWKS file %s unusable: %s", self.file, exc)
                self._file_keys = []
            self._file_stamp = stamp

    async def _fetch(self) -> None:
        self._last_attempt = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.cfg.jwks_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as resp:
                resp.raise_for_status()
                body = await resp.read()
            self._url_keys = _parse_jwks(body)
            self._fetched_at = time.monotonic()
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.url, exc)

    async def keys(self, kid: str | None) -> list[jwt.PyJWK]:
        self._refresh_file()
        if self.url:
            known = {k.key_id for k in self._url_keys + self._file_keys}
            now = time.monotonic()
            wanted = (
                not self._url_keys
                or now - self._fetched_at > self.cfg.jwks_cache_ttl_s
                or (kid is not None and kid not in known)
            )
            if wanted and now - self._last_attempt >= self.cfg.jwks_min_refetch_s:
                async with self._lock:
                    # Another coroutine may have fetched while this one waited for the lock.
                    if time.monotonic() - self._last_attempt >= self.cfg.jwks_min_refetch_s:
                        await self._fetch()
        pool = self._file_keys + self._url_keys
        if kid is None:
            return pool
        return [k for k in pool if k.key_id == kid]


def _parse_jwks(raw: bytes) -> list[jwt.PyJWK]:
    data = orjson.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document")
    out = []
    for k in data["keys"]:
        try:
            out.append(jwt.PyJWK.from_dict(k))
        except jwt.PyJWTError as exc:
            log.warning("skipping JWKS key %s: %s", k.get("kid") if isinstance(k, dict) else "?", exc)
    return out


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else base_dir / p


class JwtAuthenticator:
    def __init__(self, cfg: JwtConfig, base_dir: Path | None = None) -> None:
        if "none" in (a.lower() for a in cfg.algorithms):
            raise ConfigError("[access.jwt] algorithms: 'none' is never accepted.")
        self.cfg = cfg
        self.algorithms = tuple(cfg.algorithms)
        self.hs_secret: bytes | None = None
        if cfg.hs_secret_file:
            p = _resolve(cfg.hs_secret_file, base_dir)
            try:
                self.hs_secret = p.read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigError(f"[access.jwt] hs_secret_file {str(p)!r}: {exc.strerror}.") from None
            if len(self.hs_secret) < 32:
                raise ConfigError("[access.jwt] hs_secret_file: the secret must be at least 32 bytes.")
        self.jwks = Jwks(cfg, base_dir)
        self._options: Any = {"require": ["exp"] if cfg.require_exp else [], "verify_aud": bool(cfg.audience)}

    async def authenticate(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return Identity.failed("jwt", "malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return Identity.failed("jwt", "token algorithm not allowed")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        candidates: list[Any]
        if alg in HMAC_ALGS:
            if self.hs_secret is None:
                return Identity.failed("jwt", "token algorithm not allowed")
            candidates = [self.hs_secret]
        else:
            jwks = await self.jwks.keys(kid)
            candidates = [k.key for k in jwks if (k.algorithm_name or alg) == alg or k.algorithm_name is None]
            if not candidates:
                return Identity.failed("jwt", "unknown signing key")
        claims: dict[str, Any] | None = None
        reason = "invalid token signature"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=list(self.cfg.audience) or None,
                    issuer=self.cfg.issuer or None,
                    leeway=self.cfg.leeway_s,
                    options=self._options,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                reason = _reason(exc)
                break
        if claims is None:
            return Identity.failed("jwt", reason)
        return self._identity(claims)

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        cfg = self.cfg
        user = claims.get(cfg.user_claim)
        if not isinstance(user, str) or not user:
            return Identity.failed("jwt", f"token lacks the {cfg.user_claim} claim")
        org = claims.get(cfg.org_claim) or cfg.default_org
        if not isinstance(org, str) or not org:
            return Identity.failed("jwt", f"token lacks the {cfg.org_claim} claim")
        raw = claims.get(cfg.roles_claim, ())
        if isinstance(raw, str):
            roles = tuple(r for r in raw.replace(",", " ").split() if r)
        elif isinstance(raw, list | tuple):
            roles = tuple(str(r) for r in raw)
        else:
            roles = ()
        return Identity(user_id=user, org_id=org, roles=roles, auth_status="authenticated", auth_method="jwt")


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired token"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim} claim"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm not allowed"
    if isinstance(exc, jwt.InvalidKeyError):
        return "unusable signing key"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"
