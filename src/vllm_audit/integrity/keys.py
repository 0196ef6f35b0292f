"""Ed25519 keys in the C2SP signed-note encoding, key ids, keyrings.

Files (one key per line; ``#`` comments and blank lines are ignored)::

    PREFIX.key   PRIVATE+KEY+<name>+<keyhash 8 hex>+<base64(0x01 || 32-byte seed)>      mode 0600
    PREFIX.pub   <name>+<keyhash 8 hex>+<base64(0x01 || 32-byte public key)> [not-before=T] [not-after=T]

These are the signer/verifier key strings of c2sp.org/signed-note (and Go's
``golang.org/x/mod/sumdb/note``), so other tools can check our checkpoints. The key hash is
``SHA-256(name || 0x0A || 0x01 || public key)[:4]``; the *fingerprint* shown to humans is the
whole SHA-256 in hex (its first 8 hex digits are the key hash). A keyring is a file with several
``.pub`` lines; ``not-before`` / ``not-after`` (RFC 3339 UTC) bound the checkpoint times a key may
sign, which is how rotation works: the verifier picks the key valid at each checkpoint's time.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import stat
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vllm_audit.errors import KeyFileError

ALG_ED25519 = 0x01
_PRIVATE_PREFIX = "PRIVATE+KEY+"


def key_hash(name: str, public: bytes) -> bytes:
    """The full SHA-256 behind a signed-note key id (``[:4]`` is the key id)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name) or not name.isprintable():
        raise ValueError(f"key name {name!r} must be non-empty, without spaces or '+'")


@dataclasses.dataclass(frozen=True, slots=True)
class VerifierKey:
    """A trusted public key, with the checkpoint times it may sign (epoch ms, inclusive)."""

    name: str
    public: bytes
    not_before_ms: int | None = None
    not_after_ms: int | None = None

    @property
    def key_id(self) -> bytes:
        return key_hash(self.name, self.public)[:4]

    @property
    def fingerprint(self) -> str:
        return key_hash(self.name, self.public).hex()

    @property
    def label(self) -> str:
        """``name+keyhash``, the way signed-note tools name a key."""
        return f"{self.name}+{self.key_id.hex()}"

    def vkey(self) -> str:
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{b64}"

    def valid_at(self, ms: int | None) -> bool:
        if ms is None:
            return self.not_before_ms is None and self.not_after_ms is None
        if self.not_before_ms is not None and ms < self.not_before_ms:
            return False
        return not (self.not_after_ms is not None and ms > self.not_after_ms)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKey:
    """A private Ed25519 key and its signed-note name."""

    name: str
    seed: bytes
    path: str = ""

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        _check_name(name)
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(name, seed)

    @property
    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def public(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def verifier(self) -> VerifierKey:
        return VerifierKey(self.name, self.public)

    @property
    def key_id(self) -> bytes:
        return key_hash(self.name, self.public)[:4]

    def skey(self) -> str:
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.seed).decode()
        return f"{_PRIVATE_PREFIX}{self.name}+{self.key_id.hex()}+{b64}"

    def signer(self) -> _Signer:
        return _Signer(self._key, self.key_id)


class _Signer:
    """A loaded private key (loading once matters: signing happens in the writer thread)."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: Ed25519PrivateKey, key_id: bytes) -> None:
        self._key = key
        self.key_id = key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


# -- parsing ------------------------------------------------------------------------------------


def parse_skey(text: str, where: str = "<key>") -> SigningKey:
    s = text.strip()
    if not s.startswith(_PRIVATE_PREFIX):
        raise KeyFileError(
            f"{where}: not a vllm-audit private key (expected a line starting with {_PRIVATE_PREFIX!r})."
        )
    parts = s[len(_PRIVATE_PREFIX) :].split("+", 2)
    if len(parts) != 3:
        raise KeyFileError(f"{where}: malformed private key line.")
    name, hexid, b64 = parts
    raw = _b64(b64, where)
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise KeyFileError(f"{where}: not an Ed25519 signed-note private key.")
    key = SigningKey(name, raw[1:], where)
    if key.key_id.hex() != hexid.lower():
        raise KeyFileError(f"{where}: key hash {hexid} does not match the key (expected {key.key_id.hex()}).")
    return key


def parse_vkey(line: str, where: str = "<key>") -> VerifierKey:
    fields = line.split()
    if not fields:
        raise KeyFileError(f"{where}: empty public key.")
    parts = fields[0].split("+", 2)
    if fields[0].startswith(_PRIVATE_PREFIX):
        raise KeyFileError(f"{where}: this is a private key; pass the .pub file.")
    if len(parts) != 3:
        raise KeyFileError(f"{where}: malformed public key (expected name+keyhash+base64).")
    name, hexid, b64 = parts
    raw = _b64(b64, where)
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise KeyFileError(f"{where}: not an Ed25519 signed-note public key.")
    nb = na = None
    for opt in fields[1:]:
        k, sep, v = opt.partition("=")
        if not sep or k not in ("not-before", "not-after"):
            raise KeyFileError(f"{where}: unknown key option {opt!r} (use not-before=<RFC 3339> / not-after=...).")
        try:
            ms = parse_time_ms(v)
        except ValueError:
            raise KeyFileError(f"{where}: {k}={v!r} is not an RFC 3339 time.") from None
        if k == "not-before":
            nb = ms
        else:
            na = ms
    key = VerifierKey(name, raw[1:], nb, na)
    if key.key_id.hex() != hexid.lower():
        raise KeyFileError(f"{where}: key hash {hexid} does not match the key (expected {key.key_id.hex()}).")
    return key


def _b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: key is not valid base64.") from None


def parse_time_ms(v: str) -> int:
    t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def format_time_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# -- files --------------------------------------------------------------------------------------


def _read(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"Key file {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"Cannot read key file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}.") from None


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load a private key, refusing a file that group or others can read."""
    p = str(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise KeyFileError(f"Key file {p!r} does not exist.") from None
    except OSError as exc:
        raise KeyFileError(f"Cannot read key file {p!r}: {exc.strerror}.") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"Private key file {p!r} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"fix it with: chmod 600 {p}"
        )
    lines = [ln for ln in _read(p).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"Key file {p!r} must hold exactly one private key line.")
    return parse_skey(lines[0], p)


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> list[VerifierKey]:
    """Load one or more ``.pub`` / keyring files (every non-comment line is a key)."""
    keys: list[VerifierKey] = []
    for path in paths:
        p = str(path)
        n = 0
        for i, line in enumerate(_read(p).splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            keys.append(parse_vkey(line, f"{p}:{i}"))
            n += 1
        if n == 0:
            raise KeyFileError(f"Key file {p!r} holds no public key.")
    if not keys:
        raise KeyFileError("No public key given.")
    return keys


def write_keypair(prefix: str | os.PathLike[str], name: str, *, force: bool = False) -> SigningKey:
    """Write ``PREFIX.key`` (0600, created exclusively) and ``PREFIX.pub``."""
    try:
        key = SigningKey.generate(name)
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
    priv, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    write_private(priv, key, force=force)
    header = f"# vllm-audit checkpoint key {key.verifier.label}\n# fingerprint sha256:{key.verifier.fingerprint}\n"
    try:
        pub.write_text(header + key.verifier.vkey() + "\n", "utf-8")
    except OSError as exc:
        raise KeyFileError(f"Cannot write {str(pub)!r}: {exc.strerror}.") from None
    return dataclasses.replace(key, path=str(priv))


def write_private(path: Path, key: SigningKey, *, force: bool = False) -> None:
    """Create ``path`` with mode 0600 atomically (a complete file appears, or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (key.skey() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
    except FileExistsError:
        raise KeyFileError(f"Key file {str(path)!r} already exists (refusing to overwrite it).") from None
    except OSError as exc:
        raise KeyFileError(f"Cannot write key file {str(path)!r}: {exc.strerror}.") from None
