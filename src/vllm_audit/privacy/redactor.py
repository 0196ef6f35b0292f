"""The redactor: the writer thread calls it on every finalized record before sealing.

``build_redactor(config)`` resolves the policies once and returns ``Redactor.__call__``. For each
record it picks the tenant's policy by ``org_id`` and treats every field by its privacy class
(``classes.py``): ``input_prompt``, ``output_response``, ``error_message``, ``client_ip``,
``peer_ip`` and ``user_id`` by their policy mode; identifier fields (request id, model name,
route, ...) and any field the table does not name are scanned; operational fields are kept. It
adds ``redaction`` = ``{"policy": name, "entities": {type: count}}`` (counts only) and, for
encrypted fields, a sibling ``<field>_enc`` envelope. It never raises: a field it cannot process
becomes ``<UNREDACTABLE>``.

Inside a structured field (chat messages, content parts, lists of prompts) the string values are
scanned one by one *and* across each boundary between consecutive ones (256 characters on each
side, joined directly), so a phone number whose halves are two content parts, or two messages, is
found; each part's covered characters are replaced (the operator's output in the first part,
nothing in the others). A value glued to its neighbour's last word is over-redacted ("admin" +
"bob@x.io" both go); never under-redacted. One compiled gate pass over the joined text decides
whether anything needs scanning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from vllm_audit.privacy import operators as op
from vllm_audit.privacy.classes import field_class
from vllm_audit.privacy.config import ENTITY_TYPES, FIELDS, PrivacyConfig
from vllm_audit.privacy.gate import forget, utf8
from vllm_audit.privacy.keystore import DataKey, FileKeyStore, KeyProvider
from vllm_audit.privacy.policy import FieldRule, Policy, resolve_all
from vllm_audit.privacy.recognizers import find, scannable

if TYPE_CHECKING:  # vllm_audit.config imports privacy.config: no runtime import back
    from vllm_audit.config import Config

UNREDACTABLE: Final = "<UNREDACTABLE>"
MAX_DEPTH: Final = 64
#: Keys of chat messages / content parts whose string values are structure, not content.
_STRUCTURAL_KEYS: Final = frozenset({"role", "type"})
_SURROGATE: Final = re.compile("[" + chr(0xD800) + "-" + chr(0xDFFF) + "]")  # lone surrogates (no literal: mypyc)
_STRING_FIELDS: Final = frozenset({"client_ip", "peer_ip", "user_id"})
_FIELD_ENTITY: Final = {"client_ip": "IP_ADDRESS", "peer_ip": "IP_ADDRESS", "user_id": "USER_ID"}
_POLICY_FIELDS: Final = frozenset(FIELDS)
#: How far on each side of a boundary between two strings a split value is looked for.
SPLIT_WINDOW: Final = 256
_TAG_RULE: Final = FieldRule("redact", True, dict.fromkeys(ENTITY_TYPES, "tag"))


#: Short strings known to hold no entity (dict keys, roles, part types): a set lookup instead of
#: a scan. ``find`` is a pure function, so an entry stays true; the set is bounded.
_CLEAN_SHORT: Final[set[str]] = set()
_CLEAN_SHORT_LEN: Final = 64
_CLEAN_SHORT_MAX: Final = 4096
#: Record shapes (policy name + field names) whose plan is cached.
_PLAN_MAX: Final = 256


#: A request/response id as servers and SDKs generate them: a lower-case UUID (with or without
#: hyphens), optionally after ``chatcmpl-`` or ``cmpl-``. Lower-case hex holds no secret prefix,
#: no "@", no colon and no capital, so only a number can hide in it: a run of at least 7 digits
#: (hyphens between them allowed), which every number recognizer needs (``_id_clean``).
_UUID_ID: Final = re.compile(
    r"(?:chatcmpl-|cmpl-)?(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})"
)
_DIGIT_OR_NOT: Final = bytes(0x64 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))  # digit -> "d", other -> "."


def _id_clean(s: str) -> bool:
    """Whether ``s`` is a UUID-shaped id (``_UUID_ID``) with no run of 7 digits: no entity can be in it."""
    if not 32 <= len(s) <= 45 or _UUID_ID.fullmatch(s) is None:
        return False
    return s.encode().translate(_DIGIT_OR_NOT, b"-").find(b"ddddddd") < 0  # hyphens dropped: runs join (`in`
    # on bytes tries its operand as an int first: a TypeError raised and cleared)


def _clean_short(s: str) -> bool:
    """Whether a string of at most 64 characters holds no entity (and no lone surrogate)."""
    if s in _CLEAN_SHORT:
        return True
    if _id_clean(s):
        return True  # unique per request: not worth a cache entry
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
    return _apply_cuts(text, [(a, b, [e, c], text[a:b], True) for a, b, e, c in found], rule, ctx)


#: A replacement inside one string: span, (entity, canonical), the whole raw value (it may span
#: several strings), and whether the operator's output goes here (False: a later part of a split
#: value, removed).
_Cut = tuple[int, int, list[str], str, bool]


def _apply_cuts(text: str, cuts: list[_Cut], rule: FieldRule, ctx: _Context) -> str:
    parts: list[str] = []
    pos = 0
    counts = ctx.counts
    for a, b, (entity, canonical), raw, emit in cuts:
        if a < pos:  # overlaps the previous cut (a split value over a found one): extend that one
            a = pos
            if b <= a:
                continue
        parts.append(text[pos:a])
        pos = b
        if not emit:
            continue
        counts[entity] = counts.get(entity, 0) + 1
        how = rule.ops[entity]
        if how == "tag":
            parts.append(f"<{entity}>")
        elif how == "pseudonym":
            parts.append(op.pseudonym(entity, canonical, ctx.psk()))
        elif how == "mask":
            parts.append(op.mask(raw, entity, ctx.policy.mask_keep))
        elif how == "keep":
            parts.append(text[a:b])
    parts.append(text[pos:])
    out = "".join(parts)
    return _SURROGATE.sub("\ufffd", out) if _has_surrogate(out) else out


def redact_texts(texts: list[str], rule: FieldRule, ctx: _Context, max_chars: int) -> list[str]:
    """Each string redacted, values split across consecutive strings included (see the module doc)."""
    if len(texts) == 1:
        return [redact_string(texts[0], rule, ctx, max_chars)]
    joined = "".join(texts)
    too_long = [len(t) > max_chars for t in texts]
    # Every scan below is of a substring of the join, and a gate hit in a substring is one in the
    # join (its patterns are ASCII; the detection copy maps character by character), so a clean join
    # gives no finding and the pass over it only pays when it is clean. It is made first only when a
    # text is too long to scan: that text is kept as it is when the join is clean, else replaced.
    if any(too_long) and not scannable(joined):
        return [_SURROGATE.sub("\ufffd", t) if _has_surrogate(t) else t for t in texts]
    starts = [0]
    for t in texts:
        starts.append(starts[-1] + len(t))
    # Findings as spans of the joined text: each string's own, then values crossing a boundary.
    spans: list[tuple[int, int, str, str]] = []
    # Whether each string holds a lone surrogate, checked right after its own scan (which has just
    # encoded it, see gate.utf8); a short string known clean holds none, a too long one is replaced.
    surrogate = [False] * len(texts)
    for i, t in enumerate(texts):
        if too_long[i] or (len(t) <= _CLEAN_SHORT_LEN and _clean_short(t)):
            continue  # a short string known clean (a system prompt, "ok") holds nothing of its own
        spans.extend((starts[i] + a, starts[i] + b, e, c) for a, b, e, c in find(t))
        surrogate[i] = _has_surrogate(t)
    seen = {(a, b) for a, b, _, _ in spans}
    joined_spans: list[tuple[int, int, str, str]] = []
    for i in range(1, len(texts)):
        p = starts[i]
        if p == 0 or p == len(joined) or too_long[i - 1] or too_long[i]:
            continue
        lo = max(0, p - SPLIT_WINDOW)
        window = joined[lo : p + SPLIT_WINDOW]
        # What the joined window finds beyond each string's own findings comes from the join: a
        # value cut in two, or a value whose prefix ("sk-") is in the other string.
        for a, b, e, c in find(window):
            a, b = a + lo, b + lo
            if (a, b) not in seen:
                seen.add((a, b))
                joined_spans.append((_extend_left(joined, a, lo), _extend_right(joined, b, lo + len(window)), e, c))
    if joined_spans:  # a string's own finding inside a joined one is a fragment of it: count it once
        spans = [s for s in spans if not any(ja <= s[0] and s[1] <= jb for ja, jb, _, _ in joined_spans)]
        spans.extend(joined_spans)
    out = list(texts)
    cuts: list[list[_Cut]] = [[] for _ in texts]
    for a, b, e, c in sorted(spans, key=lambda s: (s[0], -s[1])):
        raw = joined[a:b]
        first = True
        for i in range(len(texts)):
            s0, s1 = starts[i], starts[i + 1]
            if s1 <= a or s0 >= b or s0 == s1:
                continue
            cuts[i].append((max(a, s0) - s0, min(b, s1) - s0, [e, c], raw, first))
            first = False
    for i, t in enumerate(texts):
        if too_long[i]:
            ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
            out[i] = UNREDACTABLE
        elif cuts[i]:
            out[i] = _apply_cuts(t, sorted(cuts[i], key=lambda c: (c[0], -c[1])), rule, ctx)
        elif surrogate[i]:
            out[i] = _SURROGATE.sub("\ufffd", t)
    return out


def _extend_left(t: str, a: int, lo: int) -> int:
    """A value that starts at the window's edge may start earlier: extend to the token's start."""
    if a > lo or a == 0:
        return a
    while a > 0 and not t[a - 1].isspace():
        a -= 1
    return a


def _extend_right(t: str, b: int, hi: int) -> int:
    """A value that ends at the window's edge may go on: extend to the token's end."""
    if b < hi or b == len(t):
        return b
    while b < len(t) and not t[b].isspace():
        b += 1
    return b


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (strict UTF-8 encoding, in C, fails only on those)."""
    if text.isascii():  # O(1)
        return False
    try:
        utf8(text)  # the gate's bytes when it has just scanned this text
    except UnicodeEncodeError:
        return _SURROGATE.search(text) is not None
    return False


_Slot = tuple[Any, Any]  # (container, key or index) holding one string value


def _collect(value: Any, texts: list[str], slots: list[_Slot], key_fn: Callable[[str], str], depth: int) -> Any:
    """A copy of ``value`` whose string values are listed in ``texts`` (in order) with their slots."""
    if value is None or isinstance(value, (int, float)):  # bool is an int (a tuple: mypyc builds no union)
        return value
    if depth >= MAX_DEPTH:
        raise _TooDeepError
    if isinstance(value, (list, tuple)):
        items: list[Any] = []
        for v in value:
            if isinstance(v, str):
                slots.append((items, len(items)))
                texts.append(v)
                items.append(v)
            else:
                items.append(_collect(v, texts, slots, key_fn, depth + 1))
        return items
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            # A key already known clean ("role", "content") is kept without a call.
            key = k if type(k) is str and k in _CLEAN_SHORT else key_fn(k if isinstance(k, str) else str(k))
            if isinstance(v, str):
                if k in _STRUCTURAL_KEYS and len(v) <= 64 and (v in _CLEAN_SHORT or not find(v)):
                    out[key] = v
                else:
                    slots.append((out, key))
                    texts.append(v)
                    out[key] = v
            else:
                out[key] = _collect(v, texts, slots, key_fn, depth + 1)
        return out
    return UNREDACTABLE  # bytes, objects: never let an unknown type through


class Redactor:
    """Applies the resolved policies to records; build it with ``build_redactor``."""

    def __init__(self, cfg: PrivacyConfig, keys: KeyProvider | None) -> None:
        self.default, self.tenants = resolve_all(cfg)
        self.keys = keys
        self.max_chars = cfg.max_text_chars
        self._plans: dict[tuple[str, ...], tuple[str, ...]] = {}

    def policy_for(self, org_id: str) -> Policy:
        """The policy of a tenant (the default one when the tenant has none)."""
        return self.tenants.get(org_id, self.default)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with every field treated by its privacy class and policy; never raises."""
        if not isinstance(record, dict):
            return record
        org = record.get("org_id")
        org = org if isinstance(org, str) else "unknown"
        policy = self.policy_for(org)
        ctx = _Context(policy, self.keys, org)
        user = record.get("user_id")
        errors: list[str] = []
        fields = policy.fields
        identifiers = policy.identifiers
        generated_id = record.get("request_id_source") == "generated"
        for field in self._plan(policy, record):
            value = record[field]
            if value is None or isinstance(value, (int, float)):  # bool is an int
                continue  # None and numbers: every mode leaves them alone; they carry no text
            try:
                if field in _POLICY_FIELDS:
                    self._apply(record, field, fields[field], ctx, user)
                elif isinstance(value, str) and value in _CLEAN_SHORT:
                    continue  # a short identifier already seen to be clean ("POST", "stop", a model name)
                elif field == "request_id" and generated_id:
                    continue
                else:  # identifiers, and any field the class table does not name
                    record[field] = self._redact(value, identifiers, ctx)
            except Exception as exc:  # never let raw text through, never fail the writer
                record[field] = UNREDACTABLE
                record.pop(f"{field}_enc", None)
                ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
                errors.append(f"{field}: {type(exc).__name__}")

        forget()  # the raw text last scanned is not kept alive by the gate's encoding slot
        info: dict[str, Any] = {"policy": policy.name, "entities": ctx.counts}
        if errors:
            info["errors"] = errors
        record["redaction"] = info
        return record

    def _plan(self, policy: Policy, record: dict[str, Any]) -> tuple[str, ...]:
        """The fields of a record of this shape that need work (cached per policy and key tuple).

        Operational and tenant fields, and policy fields whose mode is ``keep``, are left out; the
        cache holds at most ``_PLAN_MAX`` shapes (records of one writer have a handful).
        """
        shape = (policy.name, *record)
        plan = self._plans.get(shape)
        if plan is None:
            plan = tuple(
                f for f in record
                if field_class(f) not in ("operational", "tenant")
                and not (f in _POLICY_FIELDS and policy.fields[f].mode == "keep")
            )  # fmt: skip
            if len(self._plans) >= _PLAN_MAX:
                self._plans.clear()
            self._plans[shape] = plan
        return plan

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
            if field in ("client_ip", "peer_ip") and isinstance(value, str):
                record[field] = op.mask_ip(value)
            elif isinstance(value, str):
                record[field] = op.mask(value, "FIELD", ctx.policy.mask_keep)
            else:
                record[field] = self._redact(value, rule, ctx)
        else:  # pragma: no cover - config validation rejects other modes
            raise ValueError(mode)

    def _redact(self, value: Any, rule: FieldRule, ctx: _Context) -> Any:
        max_chars = self.max_chars
        if isinstance(value, str):
            if len(value) <= _CLEAN_SHORT_LEN and _clean_short(value):
                return value
            return redact_string(value, rule, ctx, max_chars)

        def key_fn(s: str) -> str:
            if len(s) <= _CLEAN_SHORT_LEN and len(s) <= max_chars and _clean_short(s):
                return s
            return redact_string(s, rule, ctx, max_chars)

        texts: list[str] = []
        slots: list[_Slot] = []
        try:
            copy = _collect(value, texts, slots, key_fn, 0)
        except _TooDeepError:
            ctx.counts["UNREDACTABLE"] = ctx.counts.get("UNREDACTABLE", 0) + 1
            return UNREDACTABLE
        if texts:
            for (container, key), old, new in zip(slots, texts, redact_texts(texts, rule, ctx, max_chars), strict=True):
                if new is not old:
                    container[key] = new
        return copy

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


_DEFAULT_CTX_POLICY: Final = Policy("default", {}, "tenant", 4)


def redact_text(text: str) -> str:
    """``text`` with every recognised entity replaced by its typed tag (for logs and error messages)."""
    try:
        return redact_string(text, _TAG_RULE, _Context(_DEFAULT_CTX_POLICY, None, ""), 1 << 30)
    except Exception:
        return UNREDACTABLE
    finally:
        forget()


def decrypt_field(record: dict[str, Any], field: str, keystore: KeyProvider) -> str:
    """The plaintext of an encrypted field (JSON text for non-string values); raises if erased."""
    envelope = record.get(f"{field}_enc")
    if envelope is None:
        raise LookupError(f"Record has no encrypted {field!r}.")
    value = op.decrypt_envelope(envelope, keystore, record.get("request_id"), field)
    return value if isinstance(value, str) else orjson.dumps(value).decode()
