"""The redactor: the writer thread calls it on every finalized record before sealing.

``build_redactor(config)`` resolves the policies once and returns ``Redactor.__call__``. For each
record it picks the tenant's policy by ``org_id`` and transforms ``input_prompt``,
``output_response``, ``error_message``, ``client_ip`` and ``user_id``; it adds ``redaction`` =
``{"policy": name, "entities": {type: count}}`` (counts only) and, for encrypted fields, a sibling
``<field>_enc`` envelope. It never raises: a field it cannot process becomes ``<UNREDACTABLE>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from vllm_audit.privacy import operators as op
from vllm_audit.privacy.config import ENTITY_TYPES, FIELDS, PrivacyConfig
from vllm_audit.privacy.keystore import DataKey, FileKeyStore, KeyProvider
from vllm_audit.privacy.policy import FieldRule, Policy, resolve_all
from vllm_audit.privacy.recognizers import find

if TYPE_CHECKING:  # vllm_audit.config imports privacy.config: no runtime import back
    from vllm_audit.config import Config

UNREDACTABLE = "<UNREDACTABLE>"
MAX_DEPTH = 64
#: Keys of chat messages / content parts whose string values are structure, not content.
_STRUCTURAL_KEYS = frozenset({"role", "type"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRING_FIELDS = frozenset({"client_ip", "user_id"})
_FIELD_ENTITY = {"client_ip": "IP_ADDRESS", "user_id": "USER_ID"}
_TAG_RULE = FieldRule("redact", True, dict.fromkeys(ENTITY_TYPES, "tag"))


#: Short strings known to hold no entity (dict keys, roles, part types): a set lookup instead of
#: a scan. ``find`` is a pure function, so an entry stays true; the set is bounded.
_CLEAN_SHORT: set[str] = set()
_CLEAN_SHORT_LEN = 64
_CLEAN_SHORT_MAX = 4096


def _clean_short(s: str) -> bool:
    """Whether a string of at most 64 characters holds no entity (and no lone surrogate)."""
    if s in _CLEAN_SHORT:
        return True
    if find(s) or _has_surrogate(s):
        return False
    if len(_CLEAN_SHORT) < _CLEAN_SHORT_MAX:
        _CLEAN_SHORT.add(s)
    return True


class _TooDeepError(Exception):
    pass


class _Context:
    """Per-record state: entity counts and the tenant's keys, fetched at most once."""

    __slots__ = ("counts", "keys", "org", "policy", "_psk")

    def __init__(self, policy: Policy, keys: KeyProvider | None, org: str) -> None:
        self.policy = policy
        self.keys = keys
        self.org = org
        self.counts: dict[str, int] = {}
        self._psk: bytes | None = None

    def psk(self) -> bytes:
        if self._psk is None:
            if self.keys is None:
                raise LookupError("no key store configured")
            self._psk = self.keys.data_key(self.org).psk
        return self._psk


def redact_string(text: str, rule: FieldRule, ctx: _Context, max_chars: int) -> str:
    """``text`` with every entity replaced by the rule's operator; counts go to ``ctx``."""
    if len(text) > max_chars:
        ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
        return UNREDACTABLE
    found = find(text)
    if not found:
        return _SURROGATE.sub("\ufffd", text) if _has_surrogate(text) else text  # the same object: no copy
    parts: list[str] = []
    pos = 0
    counts = ctx.counts
    for a, b, entity, canonical in found:
        counts[entity] = counts.get(entity, 0) + 1
        parts.append(text[pos:a])
        how = rule.ops[entity]
        if how == "tag":
            parts.append(f"<{entity}>")
        elif how == "pseudonym":
            parts.append(op.pseudonym(entity, canonical, ctx.psk()))
        elif how == "mask":
            parts.append(op.mask(text[a:b], entity, ctx.policy.mask_keep))
        elif how == "keep":
            parts.append(text[a:b])
        pos = b
    parts.append(text[pos:])
    out = "".join(parts)
    return _SURROGATE.sub("\ufffd", out) if _has_surrogate(out) else out


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (strict UTF-8 encoding, in C, fails only on those)."""
    if text.isascii():  # O(1)
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.search(text) is not None
    return False


def _walk(value: Any, fn: Callable[[str], str], depth: int = 0) -> Any:
    if isinstance(value, str):
        return fn(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= MAX_DEPTH:
        raise _TooDeepError
    if isinstance(value, list | tuple):
        return [_walk(v, fn, depth + 1) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = fn(k) if isinstance(k, str) else fn(str(k))
            if k in _STRUCTURAL_KEYS and isinstance(v, str) and len(v) <= 64 and (v in _CLEAN_SHORT or not find(v)):
                out[key] = v
            else:
                out[key] = _walk(v, fn, depth + 1)
        return out
    return UNREDACTABLE  # bytes, objects: never let an unknown type through


class Redactor:
    """Applies the resolved policies to records; build it with ``build_redactor``."""

    def __init__(self, cfg: PrivacyConfig, keys: KeyProvider | None) -> None:
        self.default, self.tenants = resolve_all(cfg)
        self.keys = keys
        self.max_chars = cfg.max_text_chars

    def policy_for(self, org_id: str) -> Policy:
        """The policy of a tenant (the default one when the tenant has none)."""
        return self.tenants.get(org_id, self.default)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with its private fields transformed per policy; never raises."""
        if not isinstance(record, dict):
            return record
        org = record.get("org_id")
        org = org if isinstance(org, str) else "unknown"
        policy = self.policy_for(org)
        ctx = _Context(policy, self.keys, org)
        user = record.get("user_id")
        errors: list[str] = []
        fields = policy.fields
        for field in FIELDS:
            if record.get(field) is None:
                continue  # absent or None: _apply leaves both alone under every mode
            rule = fields[field]
            try:
                self._apply(record, field, rule, ctx, user)
            except Exception as exc:  # never let raw text through, never fail the writer
                record[field] = UNREDACTABLE
                record.pop(f"{field}_enc", None)
                ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
                errors.append(f"{field}: {type(exc).__name__}")

        info: dict[str, Any] = {"policy": policy.name, "entities": ctx.counts}
        if errors:
            info["errors"] = errors
        record["redaction"] = info
        return record

    def _apply(self, record: dict[str, Any], field: str, rule: FieldRule, ctx: _Context, user: Any) -> None:
        value = record[field]
        mode = rule.mode
        if mode == "keep" or value is None:
            return
        empty = "" if field in _STRING_FIELDS else None  # the schema types client_ip and user_id as strings
        if mode == "drop":
            record[field] = empty
        elif mode == "redact":
            record[field] = self._redact(value, rule, ctx)
        elif mode == "encrypt":
            key = self._enc_key(ctx, user)
            record[f"{field}_enc"] = op.encrypt_value(value, key, record.get("request_id"), field)
            record[field] = self._redact(value, rule, ctx) if rule.keep_redacted_copy else empty
        elif mode == "hash_only":
            record[field] = op.keyed_hash(value, ctx.psk())
        elif mode == "pseudonym":
            entity = _FIELD_ENTITY.get(field, "FIELD")
            canonical = value if isinstance(value, str) else op.json_bytes(value).decode()
            record[field] = "ps_" + op.pseudonym_hex(entity, canonical, ctx.psk())
        elif mode == "mask":
            if field == "client_ip" and isinstance(value, str):
                record[field] = op.mask_ip(value)
            elif isinstance(value, str):
                record[field] = op.mask(value, "FIELD", ctx.policy.mask_keep)
            else:
                record[field] = self._redact(value, rule, ctx)
        else:  # pragma: no cover - config validation rejects other modes
            raise ValueError(mode)

    def _redact(self, value: Any, rule: FieldRule, ctx: _Context) -> Any:
        max_chars = self.max_chars

        def fn(s: str) -> str:
            if len(s) <= _CLEAN_SHORT_LEN and len(s) <= max_chars and _clean_short(s):
                return s
            return redact_string(s, rule, ctx, max_chars)

        try:
            return _walk(value, fn)
        except _TooDeepError:
            ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
            return UNREDACTABLE

    def _enc_key(self, ctx: _Context, user: Any) -> DataKey:
        if self.keys is None:
            raise LookupError("no key store configured")
        if ctx.policy.key_scope == "user" and isinstance(user, str) and user:
            return self.keys.data_key(ctx.org, user)
        return self.keys.data_key(ctx.org)


def resolve_path(config: Config, path: str) -> Path:
    """A path from the config file, relative to the file's directory."""
    p = Path(path).expanduser()
    if not p.is_absolute() and config.source:
        p = Path(config.source).parent / p
    return p


def build_keystore(config: Config) -> FileKeyStore | None:
    """The key store named by ``[privacy] key_file``, or None when none is configured."""
    cfg = config.privacy
    if not cfg.key_file:
        return None
    key_dir = resolve_path(config, cfg.key_dir) if cfg.key_dir else None
    return FileKeyStore(resolve_path(config, cfg.key_file), key_dir, cfg.key_recheck_seconds)


def build_redactor(config: Config) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The record redactor for this configuration (identity when ``[privacy] enabled = false``)."""
    if not config.privacy.enabled:
        return _identity
    redactor = Redactor(config.privacy, None)  # validates policies before touching key files
    redactor.keys = build_keystore(config)
    return redactor


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    return record


_DEFAULT_CTX_POLICY = Policy("default", {}, "tenant", 4)


def redact_text(text: str) -> str:
    """``text`` with every recognised entity replaced by its typed tag (for logs and error messages)."""
    try:
        return redact_string(text, _TAG_RULE, _Context(_DEFAULT_CTX_POLICY, None, ""), 1 << 30)
    except Exception:
        return UNREDACTABLE


def decrypt_field(record: dict[str, Any], field: str, keystore: KeyProvider) -> str:
    """The plaintext of an encrypted field (JSON text for non-string values); raises if erased."""
    envelope = record.get(f"{field}_enc")
    if envelope is None:
        raise LookupError(f"Record has no encrypted {field!r}.")
    value = op.decrypt_envelope(envelope, keystore, record.get("request_id"), field)
    return value if isinstance(value, str) else orjson.dumps(value).decode()
