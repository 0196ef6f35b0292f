"""Per-tenant data keys, wrapped by a master key-encryption key (envelope encryption).

Layout::

    <key_file>                  {"version":1,"kid":"mk_…","kek":"<b64 32 bytes>"}   mode 0600
    <key_dir>/keys/<kid>.json   one data key: scope, org_id, user_id, wrapped DEK and pseudonym key
    <key_dir>/scopes/<h>        the kid currently used for a scope (h = SHA-256 of the scope)
    <key_dir>/tombstones/<kid>.json   {"kid","org_id","user_id","erased_at"} after erasure

A data key holds an AES-256-GCM key (``dek``, for encryption) and an HMAC-SHA256 key (``psk``, for
pseudonyms and keyed hashes); both are wrapped with AES-256-GCM under the master key with the kid
as associated data. ``erase`` overwrites the key file with random bytes, fsyncs, unlinks it and
leaves a tombstone: everything encrypted under the kid becomes unreadable (crypto-shredding), while
the log, which commits to ciphertext only, still verifies. A KMS can replace this file store by
implementing ``KeyProvider``.

Overwriting in place does not defeat copy-on-write file systems, SSD wear levelling or backups of
the key directory; keep the key directory off snapshots (documented in docs/privacy.md).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_audit._fs import fsync_dir
from vllm_audit.errors import AuditError, KeyFileError


class KeyErasedError(AuditError):
    """The data key was destroyed (crypto-shredded); its content cannot be recovered."""


class KeyNotFoundError(AuditError):
    """No data key with this id exists in the key store."""


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    """One scope's data key: AES-256-GCM key ``dek`` and HMAC key ``psk`` (never printed)."""

    kid: str
    org_id: str
    user_id: str | None
    dek: bytes
    psk: bytes

    def __repr__(self) -> str:
        return f"DataKey(kid={self.kid!r}, org_id={self.org_id!r}, user_id={self.user_id!r})"


@dataclasses.dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of an erased key."""

    kid: str
    org_id: str
    user_id: str | None
    erased_at: str


class KeyProvider(Protocol):
    """Where data keys come from; a KMS-backed provider implements the same three calls."""

    def data_key(self, org_id: str, user_id: str | None = None) -> DataKey:
        """The current key of a scope (a tenant, or one user of a tenant), created on first use."""
        ...

    def key_by_id(self, kid: str) -> DataKey:
        """The key with this id; raises ``KeyErasedError`` or ``KeyNotFoundError``."""
        ...

    def erase(self, org_id: str, user_id: str | None = None) -> list[Tombstone]:
        """Destroy the keys of a tenant (all its users too) or of one user; returns the tombstones."""
        ...


def generate_master_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Write a new master key file with mode 0600 and return its key id."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise KeyFileError(f"Key file {str(p)!r} already exists; refusing to overwrite it.")
    p.parent.mkdir(parents=True, exist_ok=True)
    kid = "mk_" + secrets.token_hex(8)
    body = orjson.dumps({"version": 1, "kid": kid, "kek": _b64(secrets.token_bytes(32))})
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return kid


def load_master_key(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """The (kid, key) of a master key file; refuses files readable by group or others."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise KeyFileError(f"Cannot read key file {str(p)!r}: {exc.strerror or exc}.") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = oct(stat.S_IMODE(st.st_mode))
        raise KeyFileError(f"Key file {str(p)!r} is accessible by group or others (mode {mode}); chmod 600 it.")
    try:
        data = orjson.loads(p.read_bytes())
        kid, kek = str(data["kid"]), base64.b64decode(data["kek"], validate=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"Key file {str(p)!r} is malformed: {exc}.") from None
    if len(kek) != 32:
        raise KeyFileError(f"Key file {str(p)!r} does not hold a 256-bit key.")
    return kid, kek


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _scope_name(org_id: str, user_id: str | None) -> str:
    return orjson.dumps([org_id, user_id]).decode()


def _write_new(path: Path, body: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


class FileKeyStore:
    """``KeyProvider`` over a master key file and a directory of wrapped data keys."""

    def __init__(
        self, key_file: str | os.PathLike[str], key_dir: str | os.PathLike[str] | None = None, recheck_s: float = 1.0
    ) -> None:
        self.key_file = Path(key_file)
        self.key_dir = Path(key_dir) if key_dir else self.key_file.with_name(self.key_file.name + ".d")
        self.master_kid, self._kek = load_master_key(self.key_file)
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        # scope -> (key, time it was last seen on disk)
        self._by_scope: dict[str, tuple[DataKey, float]] = {}
        for sub in ("keys", "scopes", "tombstones"):
            (self.key_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- lookup -----------------------------------------------------------------------------
    def data_key(self, org_id: str, user_id: str | None = None) -> DataKey:
        """The current key of a scope, created on first use; notices erasure by other processes."""
        scope = _scope_name(org_id, user_id)
        now = time.monotonic()
        hit = self._by_scope.get(scope)
        if hit is not None and now - hit[1] < self._recheck_s:
            return hit[0]
        with self._lock:
            if hit is not None and self._key_path(hit[0].kid).exists():
                self._by_scope[scope] = (hit[0], now)
                return hit[0]
            key = self._load_or_create(scope, org_id, user_id)
            self._by_scope[scope] = (key, now)
            return key

    def key_by_id(self, kid: str) -> DataKey:
        """The key with this id; ``KeyErasedError`` after erasure, ``KeyNotFoundError`` if unknown."""
        if not kid.replace("_", "").isalnum():
            raise KeyNotFoundError(f"Invalid key id {kid!r}.")
        path = self._key_path(kid)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            tomb = self.key_dir / "tombstones" / f"{kid}.json"
            if tomb.exists():
                when = orjson.loads(tomb.read_bytes()).get("erased_at", "?")
                raise KeyErasedError(f"Key {kid} was erased at {when}; the content is unrecoverable.") from None
            raise KeyNotFoundError(f"No key {kid} in {str(self.key_dir)!r}.") from None
        return self._unwrap(raw)

    # -- erasure ----------------------------------------------------------------------------
    def erase(self, org_id: str, user_id: str | None = None) -> list[Tombstone]:
        """Crypto-shred every key of the tenant (``user_id=None``) or of one of its users."""
        out: list[Tombstone] = []
        with self._lock:
            for path in sorted((self.key_dir / "keys").glob("*.json")):
                try:
                    meta = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    continue
                if meta.get("org_id") != org_id or (user_id is not None and meta.get("user_id") != user_id):
                    continue
                out.append(self._shred(path, meta))
            self._by_scope = {s: v for s, v in self._by_scope.items() if v[0].org_id != org_id}
        return out

    def _shred(self, path: Path, meta: dict[str, object]) -> Tombstone:
        kid = str(meta["kid"])
        when = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        user = meta.get("user_id")
        tomb = Tombstone(kid, str(meta.get("org_id")), None if user is None else str(user), when)
        tomb_path = self.key_dir / "tombstones" / f"{kid}.json"
        tomb_path.write_bytes(orjson.dumps(dataclasses.asdict(tomb)))
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write(secrets.token_bytes(max(size, 1)))
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        scope_link = self._scope_path(_scope_name(tomb.org_id, tomb.user_id))
        try:
            if scope_link.read_text() == kid:
                scope_link.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(path.parent)
        return tomb

    # -- internals --------------------------------------------------------------------------
    def _key_path(self, kid: str) -> Path:
        return self.key_dir / "keys" / f"{kid}.json"

    def _scope_path(self, scope: str) -> Path:
        return self.key_dir / "scopes" / hashlib.sha256(scope.encode()).hexdigest()[:32]

    def _load_or_create(self, scope: str, org_id: str, user_id: str | None) -> DataKey:
        link = self._scope_path(scope)
        for _ in range(3):
            try:
                kid = link.read_text().strip()
            except FileNotFoundError:
                kid = ""
            if kid:
                try:
                    return self.key_by_id(kid)
                except KeyErasedError:
                    link.unlink(missing_ok=True)
                except KeyNotFoundError:
                    link.unlink(missing_ok=True)
            created = self._create(org_id, user_id)
            tmp = link.with_name(link.name + f".{created.kid}.tmp")
            tmp.write_text(created.kid)
            try:
                os.link(tmp, link)  # atomic "create if absent": another process may have won
                fsync_dir(link.parent)
                return created
            except FileExistsError:
                self._key_path(created.kid).unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
        raise KeyFileError(f"Could not create a data key for {scope}.")  # pragma: no cover

    def _create(self, org_id: str, user_id: str | None) -> DataKey:
        kid = "k_" + secrets.token_hex(10)
        dek, psk = secrets.token_bytes(32), secrets.token_bytes(32)
        aead = AESGCM(self._kek)
        wrapped = {}
        for name, secret in (("dek", dek), ("psk", psk)):
            nonce = secrets.token_bytes(12)
            wrapped[name] = {"nonce": _b64(nonce), "ct": _b64(aead.encrypt(nonce, secret, self._aad(kid, name)))}
        body = {
            "version": 1,
            "kid": kid,
            "org_id": org_id,
            "user_id": user_id,
            "master_kid": self.master_kid,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "wrapped": wrapped,
        }
        _write_new(self._key_path(kid), orjson.dumps(body))
        return DataKey(kid, org_id, user_id, dek, psk)

    def _aad(self, kid: str, name: str) -> bytes:
        return f"vllm-audit/{name}/{kid}".encode()

    def _unwrap(self, raw: bytes) -> DataKey:
        try:
            meta = orjson.loads(raw)
            kid = str(meta["kid"])
            aead = AESGCM(self._kek)
            parts = {}
            for name in ("dek", "psk"):
                w = meta["wrapped"][name]
                nonce, ct = base64.b64decode(w["nonce"]), base64.b64decode(w["ct"])
                parts[name] = aead.decrypt(nonce, ct, self._aad(kid, name))
        except InvalidTag:
            raise KeyFileError("A data key does not unwrap under this master key (wrong key file?).") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"A data key file is malformed: {exc}.") from None
        user = meta.get("user_id")
        return DataKey(kid, str(meta["org_id"]), None if user is None else str(user), parts["dek"], parts["psk"])
