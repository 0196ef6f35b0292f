"""Operators: what replaces one entity in a text, and what replaces a whole field.

Entity operators: ``tag`` (``<CN_ID>``), ``mask`` (keep the last N characters), ``pseudonym``
(``<EMAIL:ps_3f9a1c2b7d4e>``, HMAC-SHA256 of the canonical value under the tenant's key: stable
within a tenant, different across tenants), ``drop`` (removed), ``keep``.

Field operators: ``keyed_hash`` (``hmac-sha256:<hex>`` of the JSON value), ``encrypt_value`` /
``decrypt_envelope`` (AES-256-GCM, AAD = request id + field name, so a ciphertext cannot be moved
to another record or field), ``mask_ip``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_audit.privacy.keystore import DataKey, KeyProvider

ALG = "AES-256-GCM"
PSEUDONYM_HEX = 12


def tag(entity: str) -> str:
    """The typed tag of an entity type."""
    return f"<{entity}>"


def mask(raw: str, entity: str, keep: int) -> str:
    """``raw`` with every letter and digit but the last ``keep`` replaced by ``*`` (e-mail: the domain stays)."""
    if entity == "EMAIL" and "@" in raw:
        local, _, domain = raw.rpartition("@")
        return local[:1] + "*" * max(len(local) - 1, 1) + "@" + domain
    if entity in ("API_KEY", "JWT", "PRIVATE_KEY", "URL_CREDENTIALS"):
        return f"<{entity}>"  # a partial secret is still a secret
    remaining = sum(1 for c in raw if c.isalnum())
    out = []
    for c in raw:
        if c.isalnum():
            out.append(c if remaining <= keep else "*")
            remaining -= 1
        else:
            out.append(c)
    return "".join(out)


def pseudonym_hex(entity: str, canonical: str, psk: bytes) -> str:
    """The keyed pseudonym digits of a canonical value under a tenant's pseudonym key."""
    mac = hmac.new(psk, f"{entity}\x00{canonical}".encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:PSEUDONYM_HEX]


def pseudonym(entity: str, canonical: str, psk: bytes) -> str:
    """``<ENTITY:ps_…>`` for a canonical value."""
    return f"<{entity}:ps_{pseudonym_hex(entity, canonical, psk)}>"


def json_bytes(value: Any) -> bytes:
    """The JSON encoding of a field value; lone surrogates are escaped instead of failing."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=True, default=str).encode("ascii")


def keyed_hash(value: Any, psk: bytes) -> str:
    """``hmac-sha256:<hex>`` of the JSON encoding of a value under a tenant's key."""
    return "hmac-sha256:" + hmac.new(psk, json_bytes(value), hashlib.sha256).hexdigest()


def mask_ip(value: str) -> str:
    """An IP address truncated to its /24 (IPv4) or /48 (IPv6) network; other text gets ``<IP_ADDRESS>``."""
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        return tag("IP_ADDRESS")
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


def _aad(request_id: Any, field: str) -> bytes:
    return f"vllm-audit/v1/{request_id}/{field}".encode("utf-8", "surrogatepass")


def encrypt_value(value: Any, key: DataKey, request_id: Any, field: str) -> dict[str, str]:
    """The envelope ``{"alg","kid","nonce","ct"}`` of a field value's JSON encoding."""
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key.dek).encrypt(nonce, json_bytes(value), _aad(request_id, field))
    return {
        "alg": ALG,
        "kid": key.kid,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "ct": base64.b64encode(ct).decode("ascii"),
    }


def decrypt_envelope(envelope: Any, keys: KeyProvider, request_id: Any, field: str) -> Any:
    """The field value inside an envelope; raises if the key is erased or the AAD does not match."""
    if not isinstance(envelope, dict) or envelope.get("alg") != ALG:
        raise ValueError(f"{field}_enc is not an {ALG} envelope.")
    key = keys.key_by_id(str(envelope["kid"]))
    plain = AESGCM(key.dek).decrypt(
        base64.b64decode(envelope["nonce"]), base64.b64decode(envelope["ct"]), _aad(request_id, field)
    )
    return orjson.loads(plain)
