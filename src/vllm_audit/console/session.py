"""Console sessions: the credential, sealed in an HttpOnly cookie, checked again on every request.

Signing in posts an API key or a JWT — the same credentials the audit API takes. The console
checks it with the audit API's authenticator and, if it is good, sets a cookie holding the
credential sealed with AES-256-GCM under a key only the server has (``<log dir>/keys/console.key``,
mode 0600, created on first use and shared by the workers of one host). Every later request
opens the cookie and authenticates the credential again, so a revoked or expired key or token
stops working in the console at once, exactly as in the API. The cookie also carries its own
expiry (``SESSION_TTL_S``); signing out deletes it.

CSRF: every form carries a token that is an HMAC of the session's random nonce (the login form:
of a pre-session nonce cookie), and a POST must also come from this origin (``Origin`` /
``Sec-Fetch-Site``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_audit.errors import ConfigError

#: How long a session cookie is good for (the credential inside is re-checked on every request).
SESSION_TTL_S = 8 * 3600
SESSION_COOKIE = "vllm_audit_console"
LOGIN_COOKIE = "vllm_audit_console_login"
LANG_COOKIE = "vllm_audit_console_lang"
KEY_FILE = "console.key"
_AAD = b"vllm-audit-console-session-v1"


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """An opened session cookie."""

    credential: str
    nonce: str
    expires: int


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte session key at ``path``; created (0600, exclusively) when missing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker created it first
            data = path.read_bytes()
        else:
            try:
                os.write(fd, key.hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            return key
    except OSError as exc:
        raise ConfigError(f"console: cannot read the session key {str(path)!r}: {exc.strerror or exc}.") from None
    try:
        key = bytes.fromhex(data.decode().strip())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"console: the session key {str(path)!r} is not 64 hex digits.")
    return key


class Sessions:
    """Seals and opens session cookies; makes and checks CSRF tokens."""

    def __init__(self, key: bytes, *, ttl_s: int = SESSION_TTL_S) -> None:
        self._aead = AESGCM(hashlib.sha256(b"seal" + key).digest())
        self._mac = hashlib.sha256(b"csrf" + key).digest()
        self.ttl_s = ttl_s

    def seal(self, credential: str, *, now: float | None = None) -> str:
        t = int(time.time() if now is None else now)
        body = orjson.dumps({"c": credential, "n": secrets.token_urlsafe(16), "e": t + self.ttl_s})
        iv = secrets.token_bytes(12)
        return _b64e(iv + self._aead.encrypt(iv, body, _AAD))

    def open(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session in ``cookie``; None when absent, forged, altered or expired."""
        if not cookie or len(cookie) > 8192:
            return None
        try:
            raw = _b64d(cookie)
            body = orjson.loads(self._aead.decrypt(raw[:12], raw[12:], _AAD))
        except (ValueError, InvalidTag, orjson.JSONDecodeError):
            return None
        if not isinstance(body, dict):
            return None
        cred, nonce, exp = body.get("c"), body.get("n"), body.get("e")
        if not (isinstance(cred, str) and isinstance(nonce, str) and isinstance(exp, int)):
            return None
        if exp <= int(time.time() if now is None else now):
            return None
        return Session(cred, nonce, exp)

    def csrf_token(self, nonce: str) -> str:
        return hmac.new(self._mac, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(nonce), token or "")


def new_nonce() -> str:
    return secrets.token_urlsafe(16)
