"""The audit query API (pure ASGI), served under ``{edge.ops_prefix}/v1``.

Roles: ``user`` sees only their own calls, ``org_auditor`` their org, ``platform_admin`` all.
Isolation is enforced by the store (row-level security on PostgreSQL).

Every request to an endpoint under the API — whatever its outcome (200, 400, 401, 403, 404,
405, 413) — is written to the tamper-evident log as one event, and the response leaves only once
that event is durable: the caller is identified first, then the request is validated, then the
event is submitted and awaited. If the event cannot be written the request is refused with 503
(and nothing read is returned). The one exception is ``GET /openapi.json`` (the public API
description: no data, no event).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from vllm_audit._asgi import BodyError, lifespan, read_body
from vllm_audit.access.apikeys import KeyStore, iso, utcnow
from vllm_audit.access.auth import Authenticator, resolve_path
from vllm_audit.access.identity import Identity, identity_from_scope
from vllm_audit.access.openapi import STATUSES, openapi_spec
from vllm_audit.access.store import (
    USAGE_GROUPS,
    BadQuery,
    RecordQuery,
    Store,
    Viewer,
    decode_cursor,
    norm_time,
    open_store,
    record_key,
)
from vllm_audit.config import Config
from vllm_audit.integrity.reader import LogReader
from vllm_audit.types import Receive, Scope, Send

log = logging.getLogger(__name__)

#: Submits one event entry to the log; returns an awaitable that completes once the event is
#: durable and fails when it cannot be written (``AuditWriter.submit_event(entry, wait=True)``).
SubmitEvent = Callable[[dict[str, Any]], "Awaitable[None] | None"]

_ID_MAX = 256
_RAW_QUERY_MAX = 2048
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
MAX_BODY = 64 * 1024

_OUTCOMES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def _error_body(status: int, message: str, code: str) -> dict[str, Any]:
    kind = "authentication_error" if status == 401 else "permission_error" if status == 403 else "invalid_request_error"
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclasses.dataclass(slots=True)
class Call:
    """One API request being served: who, what, and what goes into its audit event."""

    ident: Identity
    viewer: Viewer | None
    endpoint: str
    query: dict[str, Any]
    event: str = "audit_read"
    result_ids: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def need_viewer(self) -> Viewer:
        if self.viewer is None:
            reason = self.ident.failure_reason or "authentication required"
            raise HttpError(401, reason, "unauthenticated", {"www-authenticate": "Bearer"})
        return self.viewer


class AuditApi:
    def __init__(self, config: Config, submit_event: SubmitEvent, store: Store | None = None) -> None:
        self.config = config
        self.cfg = config.access.api
        self.base = config.edge.ops_prefix.rstrip("/") + "/v1"
        self.submit_event = submit_event
        self.store = store or open_store(config)
        self._store_ready = False
        self._init_lock = asyncio.Lock()
        self.read_wait_s = config.access.store.read_wait_s
        self.authenticator = Authenticator(config) if config.access.auth != "none" else None
        keyfile = config.access.api_keys.file
        self.keys = KeyStore(resolve_path(config, keyfile)) if keyfile else None
        self.log_dir = log_dir(config)
        self._spec = orjson.dumps(openapi_spec(self.base, self.cfg.max_limit))

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope.get("method", "GET")
        parts = self._parts(scope)
        if parts == ["openapi.json"] and method == "GET":
            await _send_json(send, 200, orjson.Fragment(self._spec), {})
            return
        call: Call | None = None
        try:
            ident = await self._identity(scope)
            call = Call(ident, self.viewer_of(ident), _endpoint(parts), {})
            status, body, headers = await self._dispatch(call, scope, receive, method, parts)
        except HttpError as exc:
            status, body, headers = exc.status, _error_body(exc.status, exc.message, exc.code), exc.headers
        except Exception:
            log.exception("audit API error")
            status, body, headers = 500, _error_body(500, "internal error", "internal_error"), {}
        if call is None:  # identification itself failed: still on the record
            call = Call(Identity.failed("none", "authentication error"), None, _endpoint(parts), {})
        try:
            await self._audit(call, status)
        except HttpError as exc:
            status, body, headers = exc.status, _error_body(exc.status, exc.message, exc.code), exc.headers
        await _send_json(send, status, body, headers)

    def _parts(self, scope: Scope) -> list[str]:
        """The path below the API base, split into segments, each percent-decoded exactly once."""
        raw = scope.get("raw_path")
        if isinstance(raw, bytes | bytearray):
            path = bytes(raw).split(b"?", 1)[0].decode("latin-1")
            decode = True
        else:  # no raw path: ``path`` is decoded already
            path = str(scope.get("path", ""))
            decode = False
        if path.startswith(self.base):
            path = path[len(self.base) :]
        segs = path.strip("/").split("/")
        return [unquote(s, errors="replace") for s in segs] if decode else segs

    async def _dispatch(
        self, call: Call, scope: Scope, receive: Receive, method: str, parts: list[str]
    ) -> tuple[int, Any, dict[str, str]]:
        if len(parts) == 2 and parts[0] == "records":
            call.query = {"id": parts[1][:_ID_MAX]}
        elif parts[0] in ("records", "usage"):
            call.query = {"raw": _raw_query(scope)}
        elif len(parts) == 3 and parts[0] == "keys":
            call.query = {"key_id": parts[1][:_ID_MAX]}
        viewer = call.need_viewer()
        if parts == ["records"]:
            _allow(method, "GET")
            return await self._records(call, viewer, self._params(call, scope))
        if len(parts) == 2 and parts[0] == "records":
            _allow(method, "GET")
            return await self._record(call, viewer, parts[1])
        if parts == ["usage"]:
            _allow(method, "GET")
            return await self._usage(call, viewer, self._params(call, scope))
        if parts == ["whoami"]:
            _allow(method, "GET")
            return 200, {**call.ident.as_actor(), "audit_role": viewer.role}, {}
        if parts == ["keys"]:
            _allow(method, "GET", "POST")
            if method == "GET":
                return await self._list_keys(call, viewer)
            return await self._add_key(call, viewer, receive)
        if len(parts) == 3 and parts[0] == "keys" and parts[2] == "revoke":
            _allow(method, "POST")
            return await self._revoke_key(call, viewer, parts[1])
        raise HttpError(404, "no such endpoint", "not_found")

    def _params(self, call: Call, scope: Scope) -> dict[str, str]:
        params = _params(scope)
        call.query = dict(params)
        return params

    # -- caller -------------------------------------------------------------------------------

    async def _identity(self, scope: Scope) -> Identity:
        ident = identity_from_scope(scope)
        if ident is not None:
            return ident
        if self.authenticator is not None:
            return await self.authenticator.authenticate(scope)
        return Identity.anonymous()

    def viewer_of(self, ident: Identity) -> Viewer | None:
        if not ident.ok:
            return None
        if self.cfg.admin_role in ident.roles:
            return Viewer("platform_admin", ident.org_id, ident.user_id)
        if self.cfg.auditor_role in ident.roles:
            return Viewer("org_auditor", ident.org_id, ident.user_id)
        return Viewer("user", ident.org_id, ident.user_id)

    async def _audit(self, call: Call, status: int) -> None:
        """Write the request's one event and wait until it is durable; 503 when it cannot be."""
        outcome = "ok" if status < 400 else _OUTCOMES.get(status, "error")
        event = call.event
        if status >= 400 and call.endpoint.startswith("keys"):
            event = "key_admin_denied" if status in (401, 403) else "key_admin_failed"
        entry = {
            "record_type": "event",
            "event": event,
            "timestamp": iso(utcnow()),
            "actor": call.ident.as_actor(),
            "audit_role": call.viewer.role if call.viewer else None,
            "endpoint": call.endpoint,
            "query": call.query,
            "result_ids": call.result_ids,
            "result_count": len(call.result_ids),
            "outcome": outcome,
            "http_status": status,
            **call.extra,
        }
        try:
            pending = self.submit_event(entry)
            if pending is not None and inspect.isawaitable(pending):
                await pending
        except Exception as exc:
            log.error("audit API request could not be recorded: %s", exc)
            raise HttpError(503, "the audit log cannot record this request", "audit_log_unavailable") from None

    # -- store --------------------------------------------------------------------------------

    async def _ensure_store(self) -> None:
        if self._store_ready:
            return
        async with self._init_lock:
            if not self._store_ready:
                await asyncio.to_thread(self.store.init)
                self._store_ready = True

    async def _fresh_store(self) -> None:
        """Create the schema once; wait (at most ``read_wait_s``) for the store to reach the log's
        signed end, so a read reflects what is durable. The projection does the work, not this."""
        await self._ensure_store()
        if self.read_wait_s <= 0:
            return
        deadline = time.monotonic() + self.read_wait_s
        target = await asyncio.to_thread(_signed_ends, self.log_dir)
        while True:
            cursors = await asyncio.to_thread(self.store.load_cursors)
            behind = [w for w, n in target.items() if n > 0 and (cursors[w].next_seq if w in cursors else 0) < n]
            if not behind or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)

    # -- records ------------------------------------------------------------------------------

    async def _records(self, call: Call, viewer: Viewer, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        q = self._record_query(params)
        await self._fresh_store()
        records, nxt = await asyncio.to_thread(self.store.query, viewer, q)
        call.result_ids = [_key_of(r) for r in records]
        return 200, {"records": records, "next_cursor": nxt}, {}

    async def _record(self, call: Call, viewer: Viewer, ident: str) -> tuple[int, Any, dict[str, str]]:
        if not ident or len(ident) > _ID_MAX or "\x00" in ident:
            raise HttpError(400, "invalid record or request id", "invalid_parameter")
        await self._fresh_store()
        records = await asyncio.to_thread(self.store.find, viewer, ident)
        if not records:
            # Absent and not-yours look the same; the attempt is on the record either way.
            raise HttpError(404, "no such record", "not_found")
        found = []
        for rec in records:
            proof, proof_error = await asyncio.to_thread(self._proof, rec)
            found.append({"record": rec, "proof": proof, "proof_error": proof_error})
        call.result_ids = [_key_of(r) for r in records]
        return 200, {**found[0], "matches": found}, {}

    def _proof(self, record: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The integrity area's inclusion proof of exactly this record (writer id and seq must match:
        request ids are client-influenced, and a proof of another tenant's record must never leak)."""
        try:
            proofs = importlib.import_module("vllm_audit.integrity.proofs")
        except ImportError:
            return None, "inclusion proofs are not available"
        build = getattr(proofs, "build_inclusion_proof", None)
        if build is None:
            return None, "inclusion proofs are not available"
        wid, seq = record.get("writer_id"), record.get("seq")
        if not isinstance(wid, str) or not isinstance(seq, int):
            return None, "no inclusion proof is available for this record"
        try:
            proof = build(self.log_dir, str(record.get("request_id", "")), writer_id=wid, seq=seq)
        except Exception as exc:  # e.g. not yet covered by a signed checkpoint
            return None, str(exc)
        if not isinstance(proof, dict):
            return None, "no proof found"
        try:
            proved = orjson.loads(proof["record"])
            same = proved["writer_id"] == wid and proved["seq"] == seq
        except (KeyError, TypeError, orjson.JSONDecodeError):
            same = False
        if not same:
            return None, "no inclusion proof is available for this record"
        return proof, None

    def _record_query(self, p: Mapping[str, str]) -> RecordQuery:
        try:
            limit = _int_param(p, "limit", self.cfg.default_limit, 1, self.cfg.max_limit)
            status = p.get("status")
            if status is not None and status not in STATUSES:
                raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
            sha = p.get("prompt_sha256")
            if sha is not None and not _SHA256.match(sha):
                raise BadQuery("prompt_sha256 must be 64 lowercase hex digits")
            for name in ("since", "until"):
                if name in p:
                    norm_time(p[name])
            if "cursor" in p:
                decode_cursor(p["cursor"])
        except BadQuery as exc:
            raise HttpError(400, str(exc), "invalid_parameter") from None
        fields = {f.name for f in dataclasses.fields(RecordQuery)} - {"limit"}
        return RecordQuery(limit=limit, **{k: v for k, v in p.items() if k in fields})

    # -- usage --------------------------------------------------------------------------------

    async def _usage(self, call: Call, viewer: Viewer, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        raw = params.get("group_by", ",".join(USAGE_GROUPS))
        groups = [g for g in raw.split(",") if g]
        bad = [g for g in groups if g not in USAGE_GROUPS]
        if bad or not groups:
            raise HttpError(
                400, f"group_by takes a comma separated subset of {', '.join(USAGE_GROUPS)}", "invalid_parameter"
            )
        wanted = ("since", "until", "user_id", "org_id", "model")
        q = self._record_query({k: v for k, v in params.items() if k in wanted})
        await self._fresh_store()
        rows = await asyncio.to_thread(self.store.usage, viewer, q, groups)
        call.extra["result_count"] = len(rows)
        return 200, {"group_by": groups, "usage": rows}, {}

    # -- keys (platform_admin) ----------------------------------------------------------------

    def _admin(self, viewer: Viewer) -> KeyStore:
        if viewer.role != "platform_admin":
            raise HttpError(403, "key administration is reserved to platform administrators", "forbidden")
        if self.keys is None:
            raise HttpError(404, "no API key store is configured", "not_found")
        return self.keys

    async def _list_keys(self, call: Call, viewer: Viewer) -> tuple[int, Any, dict[str, str]]:
        keys = self._admin(viewer)
        entries = await asyncio.to_thread(keys.keys)
        call.event, call.result_ids = "key_list", [k.key_id for k in entries]
        return 200, {"keys": [k.public() for k in entries]}, {}

    async def _add_key(self, call: Call, viewer: Viewer, receive: Receive) -> tuple[int, Any, dict[str, str]]:
        keys = self._admin(viewer)
        body = await _read_json(receive)
        user_id, org_id = body.get("user_id"), body.get("org_id")
        roles = body.get("roles", [])
        days = body.get("expires_in_days")
        desc = body.get("description", "")
        texts = [user_id, org_id, desc, *(roles if isinstance(roles, list) else [])]
        if not (isinstance(user_id, str) and user_id and isinstance(org_id, str) and org_id):
            raise HttpError(400, "user_id and org_id are required strings", "invalid_parameter")
        if not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
            raise HttpError(400, "roles must be an array of strings", "invalid_parameter")
        if "expires_in_days" in body and (
            isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= 3650
        ):
            raise HttpError(400, "expires_in_days must be a number in (0, 3650]", "invalid_parameter")
        if not isinstance(desc, str):
            raise HttpError(400, "description must be a string", "invalid_parameter")
        if any(isinstance(t, str) and "\x00" in t for t in texts):
            raise HttpError(400, "strings must not contain NUL", "invalid_parameter")
        expires = utcnow() + dt.timedelta(days=float(days)) if days is not None else None
        key, entry = await asyncio.to_thread(keys.add, user_id, org_id, tuple(roles), expires, desc)
        call.event, call.result_ids, call.extra["key"] = "key_added", [entry.key_id], entry.public()
        return 201, {"key": key, **entry.public()}, {}

    async def _revoke_key(self, call: Call, viewer: Viewer, key_id: str) -> tuple[int, Any, dict[str, str]]:
        keys = self._admin(viewer)
        if not _KEY_ID.match(key_id):
            raise HttpError(404, "no such key", "not_found")
        try:
            entry = await asyncio.to_thread(keys.revoke, key_id)
        except KeyError:
            raise HttpError(404, "no such key", "not_found") from None
        call.event, call.result_ids = "key_revoked", [key_id]
        return 200, entry.public(), {}


# -- helpers ------------------------------------------------------------------------------------


def log_dir(config: Config) -> Path:
    """The log directory exactly as the writer opens it (``[log] dir``, relative to the cwd)."""
    return Path(config.log.dir)


def _signed_ends(log_dir: Path) -> dict[str, int]:
    reader = LogReader(log_dir)
    return {w: reader.signed_size(w) for w in reader.writer_ids()}


def _key_of(rec: Mapping[str, Any]) -> str:
    try:
        return record_key(rec)
    except (KeyError, TypeError, ValueError):
        return str(rec.get("request_id", ""))


def _endpoint(parts: list[str]) -> str:
    if parts == ["records"] or parts == ["usage"] or parts == ["whoami"] or parts == ["keys"]:
        return parts[0]
    if len(parts) == 2 and parts[0] == "records":
        return "record"
    if len(parts) == 3 and parts[0] == "keys" and parts[2] == "revoke":
        return "keys.revoke"
    return "unknown"


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(405, f"method {method} not allowed", "method_not_allowed", {"allow": ", ".join(allowed)})


def _raw_query(scope: Scope) -> str:
    return bytes(scope.get("query_string", b"")).decode("utf-8", "replace")[:_RAW_QUERY_MAX]


def _params(scope: Scope) -> dict[str, str]:
    raw = bytes(scope.get("query_string", b"")).decode("utf-8", "replace")
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=False, max_num_fields=64)
    except ValueError:
        raise HttpError(400, "too many query parameters", "invalid_parameter") from None
    out: dict[str, str] = {}
    for k, vs in parsed.items():
        if len(vs) > 1:
            raise HttpError(400, f"parameter {k!r} given more than once", "invalid_parameter")
        if "\x00" in vs[0]:
            raise HttpError(400, f"parameter {k!r} contains NUL", "invalid_parameter")
        out[k] = vs[0]
    return out


def _int_param(p: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    if name not in p:
        return default
    try:
        v = int(p[name])
    except ValueError:
        raise BadQuery(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise BadQuery(f"{name} must be between {lo} and {hi}")
    return v


async def _read_json(receive: Receive) -> dict[str, Any]:
    try:
        chunks = await read_body(receive, MAX_BODY)
    except BodyError as exc:
        if exc.too_large:
            raise HttpError(413, "request body too large", "too_large") from None
        raise HttpError(400, "client disconnected", "invalid_request") from None
    try:
        data = orjson.loads(chunks) if chunks else {}
    except orjson.JSONDecodeError:
        raise HttpError(400, "request body is not JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise HttpError(400, "request body must be a JSON object", "invalid_json")
    return data


async def _send_json(send: Send, status: int, body: Any, headers: Mapping[str, str]) -> None:
    data = orjson.dumps(body)
    hdrs = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
    ]
    hdrs += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


def build_audit_api(config: Config, submit_event: SubmitEvent) -> AuditApi | None:
    """The audit API app, or None when ``[access.api] enabled = false``."""
    if not config.access.api.enabled:
        return None
    return AuditApi(config, submit_event)
