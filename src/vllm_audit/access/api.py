"""The audit query API (pure ASGI), served under ``{edge.ops_prefix}/v1``.

Roles: ``user`` sees only their own calls, ``org_auditor`` their org, ``platform_admin`` all.
Isolation is enforced by the store (row-level security on PostgreSQL). Every read — including
denied, cross-tenant and not-found reads — is written to the tamper-evident log through
``submit_event`` *before* the response leaves; if that fails the read is refused (503).
Key administration (``/keys``) is for ``platform_admin`` only and is an audit event too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import orjson

from vllm_audit.access.apikeys import KeyStore, iso, utcnow
from vllm_audit.access.auth import Authenticator, resolve_path
from vllm_audit.access.identity import Identity, identity_from_scope
from vllm_audit.access.ingest import Ingester, log_dir
from vllm_audit.access.openapi import STATUSES, openapi_spec
from vllm_audit.access.store import USAGE_GROUPS, BadQuery, RecordQuery, Store, Viewer, open_store
from vllm_audit.types import Receive, Scope, Send

if TYPE_CHECKING:
    from vllm_audit._asgi import lifespan
from vllm_audit.config import Config

log = logging.getLogger(__name__)

SubmitEvent = Callable[[dict[str, Any]], None]

_REQUEST_ID_MAX = 256
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
MAX_BODY = 64 * 1024


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


class AuditApi:
    def __init__(self, config: Config, submit_event: SubmitEvent, store: Store | None = None) -> None:
        self.config = config
        self.cfg = config.access.api
        self.base = config.edge.ops_prefix.rstrip("/") + "/v1"
        self.submit_event = submit_event
        self.store = store or open_store(config)
        self._store_ready = False
        self._init_lock = asyncio.Lock()
        self._ingest_lock = asyncio.Lock()
        self.ingester = Ingester(log_dir(config), self.store) if config.access.store.ingest_on_read else None
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
        path: str = scope.get("path", "")
        if path.startswith(self.base):
            path = path[len(self.base) :]
        method: str = scope.get("method", "GET")
        try:
            status, body, headers = await self._dispatch(scope, receive, method, path or "/")
        except HttpError as exc:
            status, body, headers = exc.status, _error_body(exc.status, exc.message, exc.code), exc.headers
        except Exception:
            log.exception("audit API error")
            status, body, headers = 500, _error_body(500, "internal error", "internal_error"), {}
        await _send_json(send, status, body, headers)

    async def _dispatch(
        self, scope: Scope, receive: Receive, method: str, path: str
    ) -> tuple[int, Any, dict[str, str]]:
        if path == "/openapi.json":
            _allow(method, "GET")
            return 200, orjson.Fragment(self._spec), {}
        parts = path.strip("/").split("/")
        if parts == ["records"]:
            _allow(method, "GET")
            return await self._records(scope)
        if len(parts) == 2 and parts[0] == "records":
            _allow(method, "GET")
            return await self._record(scope, unquote(parts[1]))
        if parts == ["usage"]:
            _allow(method, "GET")
            return await self._usage(scope)
        if parts == ["whoami"]:
            _allow(method, "GET")
            ident, viewer = await self._caller(scope, "whoami", {})
            return 200, {**ident.as_actor(), "audit_role": viewer.role}, {}
        if parts == ["keys"]:
            _allow(method, "GET", "POST")
            if method == "GET":
                return await self._list_keys(scope)
            return await self._add_key(scope, receive)
        if len(parts) == 3 and parts[0] == "keys" and parts[2] == "revoke":
            _allow(method, "POST")
            return await self._revoke_key(scope, parts[1])
        raise HttpError(404, "no such endpoint", "not_found")

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

    async def _caller(self, scope: Scope, endpoint: str, query: Mapping[str, Any]) -> tuple[Identity, Viewer]:
        ident = await self._identity(scope)
        viewer = self.viewer_of(ident)
        if viewer is None:
            reason = ident.failure_reason or "authentication required"
            self._event("audit_read", ident, None, endpoint, query, [], "unauthenticated", 401)
            raise HttpError(401, reason, "unauthenticated", {"www-authenticate": "Bearer"})
        return ident, viewer

    def _event(
        self,
        event: str,
        ident: Identity,
        viewer: Viewer | None,
        endpoint: str,
        query: Mapping[str, Any],
        result_ids: list[str],
        outcome: str,
        http_status: int,
        **extra: Any,
    ) -> None:
        entry = {
            "record_type": "event",
            "event": event,
            "timestamp": iso(utcnow()),
            "actor": ident.as_actor(),
            "audit_role": viewer.role if viewer else None,
            "endpoint": endpoint,
            "query": dict(query),
            "result_ids": result_ids,
            "result_count": len(result_ids),
            "outcome": outcome,
            "http_status": http_status,
            **extra,
        }
        try:
            self.submit_event(entry)
        except Exception as exc:
            log.error("audit read could not be recorded: %s", exc)
            raise HttpError(503, "the audit log cannot record this read", "audit_log_unavailable") from None

    async def _ensure_store(self) -> None:
        if self._store_ready:
            return
        async with self._init_lock:
            if not self._store_ready:
                await asyncio.to_thread(self.store.init)
                self._store_ready = True

    async def _fresh_store(self) -> None:
        """Create the schema once; catch the store up with the log before a read."""
        await self._ensure_store()
        if self.ingester is None:
            return
        async with self._ingest_lock:
            try:
                await asyncio.to_thread(self.ingester.run_once)
            except Exception as exc:  # serve what the store has; the background ingester retries
                log.warning("catch-up ingestion before an audit read failed: %s", exc)
                self.ingester.forget()

    # -- records ------------------------------------------------------------------------------

    async def _records(self, scope: Scope) -> tuple[int, Any, dict[str, str]]:
        params = _params(scope)
        ident, viewer = await self._caller(scope, "records", params)
        try:
            q = self._record_query(params)
        except BadQuery as exc:
            self._event("audit_read", ident, viewer, "records", params, [], "bad_request", 400)
            raise HttpError(400, str(exc), "invalid_parameter") from None
        await self._fresh_store()
        try:
            records, nxt = await asyncio.to_thread(self.store.query, viewer, q)
        except BadQuery as exc:
            self._event("audit_read", ident, viewer, "records", params, [], "bad_request", 400)
            raise HttpError(400, str(exc), "invalid_parameter") from None
        ids = [str(r.get("request_id", "")) for r in records]
        self._event("audit_read", ident, viewer, "records", params, ids, "ok", 200)
        return 200, {"records": records, "next_cursor": nxt}, {}

    async def _record(self, scope: Scope, request_id: str) -> tuple[int, Any, dict[str, str]]:
        query = {"request_id": request_id}
        ident, viewer = await self._caller(scope, "record", query)
        if not request_id or len(request_id) > _REQUEST_ID_MAX or "\x00" in request_id:
            self._event("audit_read", ident, viewer, "record", query, [], "bad_request", 400)
            raise HttpError(400, "invalid request id", "invalid_parameter")
        await self._fresh_store()
        record = await asyncio.to_thread(self.store.get, viewer, request_id)
        if record is None:
            # Absent and not-yours look the same; the attempt is on the record either way.
            self._event("audit_read", ident, viewer, "record", query, [], "not_found", 404)
            raise HttpError(404, "no such record", "not_found")
        proof, proof_error = await asyncio.to_thread(self._proof, record)
        self._event("audit_read", ident, viewer, "record", query, [request_id], "ok", 200)
        return 200, {"record": record, "proof": proof, "proof_error": proof_error}, {}

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
        try:
            proof = build(self.log_dir, str(record.get("request_id", "")))
        except Exception as exc:  # e.g. not yet covered by a signed checkpoint
            return None, str(exc)
        if not isinstance(proof, dict):
            return None, "no proof found"
        try:
            proved = orjson.loads(proof["record"])
            same = proved["writer_id"] == record.get("writer_id") and proved["seq"] == record.get("seq")
        except (KeyError, TypeError, orjson.JSONDecodeError):
            same = False
        if not same:
            return None, "no inclusion proof is available for this record"
        return proof, None

    def _record_query(self, p: Mapping[str, str]) -> RecordQuery:
        limit = _int_param(p, "limit", self.cfg.default_limit, 1, self.cfg.max_limit)
        status = p.get("status")
        if status is not None and status not in STATUSES:
            raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
        sha = p.get("prompt_sha256")
        if sha is not None and not _SHA256.match(sha):
            raise BadQuery("prompt_sha256 must be 64 lowercase hex digits")
        for name in ("since", "until"):
            if name in p:
                from vllm_audit.access.store import norm_time

                norm_time(p[name])
        if "cursor" in p:
            from vllm_audit.access.store import decode_cursor

            decode_cursor(p["cursor"])
        fields = {f.name for f in dataclasses.fields(RecordQuery)} - {"limit"}
        return RecordQuery(limit=limit, **{k: v for k, v in p.items() if k in fields})

    # -- usage --------------------------------------------------------------------------------

    async def _usage(self, scope: Scope) -> tuple[int, Any, dict[str, str]]:
        params = _params(scope)
        ident, viewer = await self._caller(scope, "usage", params)
        try:
            raw = params.get("group_by", ",".join(USAGE_GROUPS))
            groups = [g for g in raw.split(",") if g]
            bad = [g for g in groups if g not in USAGE_GROUPS]
            if bad or not groups:
                raise BadQuery(f"group_by takes a comma separated subset of {', '.join(USAGE_GROUPS)}")
            q = self._record_query(
                {k: v for k, v in params.items() if k in ("since", "until", "user_id", "org_id", "model")}
            )
        except BadQuery as exc:
            self._event("audit_read", ident, viewer, "usage", params, [], "bad_request", 400)
            raise HttpError(400, str(exc), "invalid_parameter") from None
        await self._fresh_store()
        rows = await asyncio.to_thread(self.store.usage, viewer, q, groups)
        self._event("audit_read", ident, viewer, "usage", params, [], "ok", 200, result_count=len(rows))
        return 200, {"group_by": groups, "usage": rows}, {}

    # -- keys (platform_admin) ----------------------------------------------------------------

    async def _admin(self, scope: Scope, endpoint: str, query: Mapping[str, Any]) -> tuple[Identity, Viewer, KeyStore]:
        ident, viewer = await self._caller(scope, endpoint, query)
        if viewer.role != "platform_admin":
            self._event("key_admin_denied", ident, viewer, endpoint, query, [], "denied", 403)
            raise HttpError(403, "key administration is reserved to platform administrators", "forbidden")
        if self.keys is None:
            raise HttpError(404, "no API key store is configured", "not_found")
        return ident, viewer, self.keys

    async def _list_keys(self, scope: Scope) -> tuple[int, Any, dict[str, str]]:
        ident, viewer, keys = await self._admin(scope, "keys", {})
        entries = await asyncio.to_thread(keys.keys)
        self._event("key_list", ident, viewer, "keys", {}, [k.key_id for k in entries], "ok", 200)
        return 200, {"keys": [k.public() for k in entries]}, {}

    async def _add_key(self, scope: Scope, receive: Receive) -> tuple[int, Any, dict[str, str]]:
        body = await _read_json(receive)
        ident, viewer, keys = await self._admin(scope, "keys.add", {})
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
        self._event("key_added", ident, viewer, "keys.add", {}, [entry.key_id], "ok", 201, key=entry.public())
        return 201, {"key": key, **entry.public()}, {}

    async def _revoke_key(self, scope: Scope, key_id: str) -> tuple[int, Any, dict[str, str]]:
        ident, viewer, keys = await self._admin(scope, "keys.revoke", {"key_id": key_id})
        if not _KEY_ID.match(key_id):
            raise HttpError(404, "no such key", "not_found")
        try:
            entry = await asyncio.to_thread(keys.revoke, key_id)
        except KeyError:
            raise HttpError(404, "no such key", "not_found") from None
        self._event("key_revoked", ident, viewer, "keys.revoke", {"key_id": key_id}, [key_id], "ok", 200)
        return 200, entry.public(), {}


# -- helpers ------------------------------------------------------------------------------------


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(405, f"method {method} not allowed", "method_not_allowed", {"allow": ", ".join(allowed)})


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
    chunks = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected", "invalid_request")
        chunks += msg.get("body", b"")
        if len(chunks) > MAX_BODY:
            raise HttpError(413, "request body too large", "too_large")
        if not msg.get("more_body"):
            break
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
