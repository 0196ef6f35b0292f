"""API keys: issued once, stored only as SHA-256 hashes in a JSON key file.

A key looks like ``vak_<key_id>_<secret>``: ``key_id`` is 12 hex digits (public, shown in
records and listings), ``secret`` is 32 random bytes (urlsafe base64). Only
``SHA-256(key)`` is stored. A slow password hash (scrypt, argon2) protects *low-entropy* secrets
against offline guessing; a 256-bit random secret cannot be guessed, so a fast hash loses nothing
and keeps the per-request check at a microsecond (it runs on the event loop for every call).

The file is replaced atomically (write, fsync, rename) under an ``flock`` on ``<file>.lock`` so
concurrent CLI runs do not lose updates. Readers re-read it whenever its inode, size or mtime
changes (one ``stat`` per request), so a revocation takes effect on running gateways at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.access.identity import Identity
from vllm_audit.errors import KeyFileError

KEY_PREFIX = "vak"
_KEY_RE = re.compile(r"^vak_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    sha256: str
    user_id: str
    org_id: str
    roles: tuple[str, ...] = ()
    created: str = ""
    expires: str | None = None
    revoked: bool = False
    revoked_at: str | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roles"] = list(self.roles)
        return d

    def public(self) -> dict[str, Any]:
        """Everything but the hash (for listings)."""
        d = self.to_json()
        del d["sha256"]
        d["status"] = self.status()
        return d

    def status(self, now: dt.datetime | None = None) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and parse_time(self.expires) <= (now or utcnow()):
            return "expired"
        return "active"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiKey:
        return cls(
            key_id=str(d["key_id"]),
            sha256=str(d["sha256"]),
            user_id=str(d["user_id"]),
            org_id=str(d["org_id"]),
            roles=tuple(str(r) for r in d.get("roles", ())),
            created=str(d.get("created", "")),
            expires=d.get("expires"),
            revoked=bool(d.get("revoked", False)),
            revoked_at=d.get("revoked_at"),
            description=str(d.get("description", "")),
        )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(s: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


class KeyStore:
    """The key file; cheap to consult on every request."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    # -- reading ------------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._keys = None, {}
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._keys = {k.key_id: k for k in self._read()}
            self._stamp = stamp

    def _read(self) -> list[ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyFileError(f"Cannot read key file {str(self.path)!r}: {exc.strerror}.") from None
        if not raw.strip():
            return []
        try:
            data = orjson.loads(raw)
            return [ApiKey.from_json(d) for d in data["keys"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"Key file {str(self.path)!r} is malformed: {exc}.") from None

    def keys(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: (k.created, k.key_id))

    def verify(self, key: str) -> Identity:
        """The identity of ``key`` (``auth_status="failed"`` with a reason when it is not valid)."""
        m = _KEY_RE.match(key)
        if not m:
            return Identity.failed("api_key", "malformed API key")
        key_id = m.group(1)
        try:
            self._refresh()
        except KeyFileError:
            return Identity.failed("api_key", "API key store unavailable", key_id)
        entry = self._keys.get(key_id)
        if entry is None or not hmac.compare_digest(entry.sha256, hash_key(key)):
            return Identity.failed("api_key", "unknown API key", key_id)
        if entry.revoked:
            return Identity.failed("api_key", "revoked API key", key_id)
        if entry.expires:
            try:
                expired = parse_time(entry.expires) <= utcnow()
            except ValueError:
                expired = True
            if expired:
                return Identity.failed("api_key", "expired API key", key_id)
        return Identity(
            user_id=entry.user_id,
            org_id=entry.org_id,
            roles=entry.roles,
            auth_status="authenticated",
            auth_method="api_key",
            key_id=key_id,
        )

    # -- writing (CLI / admin API) ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            self._write(keys)
        finally:
            os.close(fd)

    def _write(self, keys: list[ApiKey]) -> None:
        data = orjson.dumps({"version": 1, "keys": [k.to_json() for k in keys]}, option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def add(
        self,
        user_id: str,
        org_id: str,
        roles: tuple[str, ...] = (),
        expires: dt.datetime | None = None,
        description: str = "",
    ) -> tuple[str, ApiKey]:
        """Issue a key; returns ``(key, entry)``. The key itself is never stored."""
        if not user_id or not org_id:
            raise ValueError("user_id and org_id are required")
        with self._locked() as keys:
            taken = {k.key_id for k in keys}
            key_id, key = new_key()
            while key_id in taken:  # pragma: no cover - 48 random bits collided
                key_id, key = new_key()
            entry = ApiKey(
                key_id=key_id,
                sha256=hash_key(key),
                user_id=user_id,
                org_id=org_id,
                roles=tuple(roles),
                created=iso(utcnow()),
                expires=iso(expires) if expires else None,
                description=description,
            )
            keys.append(entry)
        return key, entry

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent). Raises ``KeyError`` for an unknown key id."""
        with self._locked() as keys:
            for i, k in enumerate(keys):
                if k.key_id == key_id:
                    if not k.revoked:
                        keys[i] = dataclasses.replace(k, revoked=True, revoked_at=iso(utcnow()))
                    return keys[i]
        raise KeyError(key_id)
