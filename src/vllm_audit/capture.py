"""What the request path hands to the writer, and how it becomes a record.

The request path only fills an :class:`Exchange` (references to the raw bytes it saw, a few
timestamps and flags). :func:`finalize` turns it into a schema-v1 record dict on the writer
thread: JSON parsing of the request, SSE parsing of the response, usage and finish reason.
Nothing here runs on the event loop.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from vllm_audit.record import SCHEMA_VERSION

# Outcomes (the "status" field).
OK = "ok"
CLIENT_ERROR = "client_error"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
REJECTED = "rejected"

_TEXT_ROUTES_INPUT_KEYS = ("messages", "prompt", "input")


class Exchange:
    """One request/response as the edge saw it (raw bytes, no parsing)."""

    __slots__ = (
        "request_id",
        "request_id_source",
        "request_id_note",
        "started_at",
        "t0",
        "t_first",
        "t_end",
        "method",
        "route",
        "client_ip",
        "peer_ip",
        "forwarded_ignored",
        "identity",
        "request_body",
        "request_bytes",
        "request_truncated",
        "request_json",
        "stream",
        "usage_injected",
        "http_status",
        "content_type",
        "chunks",
        "response_bytes",
        "response_truncated",
        "usage_chunk",
        "outcome",
        "error_type",
        "error_message",
        "upstream",
        "disconnected",
        "completed",
    )

    def __init__(self, request_id: str, method: str, route: str) -> None:
        self.request_id = request_id
        self.request_id_source = "generated"
        self.request_id_note: str | None = None
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.method = method
        self.route = route
        self.client_ip = "unknown"
        self.peer_ip = "unknown"
        self.forwarded_ignored = False
        self.identity: Any = None
        self.request_body = b""
        self.request_bytes = 0
        self.request_truncated = False
        self.request_json: Any = None  # parsed on the path only when needed (stream flags)
        self.stream = False
        self.usage_injected = False
        self.http_status = 0
        self.content_type = b""
        self.chunks: list[bytes] = []
        self.response_bytes = 0
        self.response_truncated = False
        self.usage_chunk: bytes | None = None
        self.outcome: str | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.upstream: str | None = None
        self.disconnected = False
        self.completed = False


def finalize(ex: Exchange) -> dict[str, Any]:
    """Build the schema-v1 record for one exchange (writer thread)."""
    try:
        return _finalize(ex)
    except Exception as exc:  # never lose a record because parsing failed
        rec = _base(ex)
        rec["capture_error"] = f"{type(exc).__name__} while parsing the exchange"
        return rec


_iso_cache: tuple[int, str] = (-1, "")


def _iso(ts: float) -> str:
    """``2026-11-25T01:02:03.456Z`` (UTC, ms); the per-second prefix is cached (hot path)."""
    global _iso_cache
    sec = int(ts)
    ms = int((ts - sec) * 1000)
    cached_sec, prefix = _iso_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_cache = (sec, prefix)
    return f"{prefix}.{ms:03d}Z"


def outcome(ex: Exchange) -> str:
    """The record's ``status`` (also the edge's metrics label)."""
    if ex.outcome is not None:
        return ex.outcome
    if ex.disconnected and not ex.completed:
        return CANCELLED
    s = ex.http_status
    if 200 <= s < 400:
        return OK if ex.completed else UPSTREAM_ERROR
    if 400 <= s < 500:
        return CLIENT_ERROR
    return UPSTREAM_ERROR


def _base(ex: Exchange) -> dict[str, Any]:
    ident = ex.identity
    t_end = ex.t_end if ex.t_end is not None else time.perf_counter()
    rec: dict[str, Any] = {
        "record_type": "inference",
        "schema_version": SCHEMA_VERSION,
        "timestamp": _iso(ex.started_at),
        "request_id": ex.request_id,
        "request_id_source": ex.request_id_source,
        "client_ip": ex.client_ip,
        "peer_ip": ex.peer_ip,
        "forwarded_ignored": ex.forwarded_ignored,
        "user_id": getattr(ident, "user_id", "anonymous"),
        "org_id": getattr(ident, "org_id", "unknown"),
        "auth_status": getattr(ident, "auth_status", "anonymous"),
        "auth_method": getattr(ident, "auth_method", "none"),
        "key_id": getattr(ident, "key_id", None),
        "roles": list(getattr(ident, "roles", ())),
        "method": ex.method,
        "route": ex.route,
        "model_name": None,
        "model_revision": None,
        "response_id": None,
        "stream": ex.stream,
        "http_status": ex.http_status,
        "status": outcome(ex),
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "usage_source": None,
        "latency_ms": round((t_end - ex.t0) * 1000.0, 3),
        "ttft_ms": round((ex.t_first - ex.t0) * 1000.0, 3) if ex.t_first is not None and ex.stream else None,
        "input_prompt": None,
        "output_response": None,
        "prompt_sha256": None,
        "request_bytes": ex.request_bytes,
        "response_bytes": ex.response_bytes,
        "request_truncated": ex.request_truncated,
        "response_truncated": ex.response_truncated,
        "upstream": ex.upstream,
        "error_type": ex.error_type,
        "error_message": ex.error_message,
    }
    notes = []
    if ex.request_id_note:
        notes.append(ex.request_id_note)
    failure = getattr(ident, "failure_reason", None)
    if failure:
        rec["error_message"] = rec["error_message"] or failure
        rec["error_type"] = rec["error_type"] or "authentication_error"
    if notes:
        rec["notes"] = notes
    return rec


def _finalize(ex: Exchange) -> dict[str, Any]:
    rec = _base(ex)
    req = ex.request_json
    if req is None and ex.request_body and not ex.request_truncated:
        try:
            req = orjson.loads(ex.request_body)
        except orjson.JSONDecodeError:
            req = None
    if isinstance(req, dict):
        model = req.get("model")
        if isinstance(model, str):
            rec["model_name"] = model
        for key in _TEXT_ROUTES_INPUT_KEYS:
            if key in req:
                rec["input_prompt"] = req[key]
                break
        if "instructions" in req and isinstance(req.get("instructions"), str) and rec["input_prompt"] is not None:
            rec["input_prompt"] = {"instructions": req["instructions"], "input": rec["input_prompt"]}

    if ex.chunks:
        body = ex.chunks[0] if len(ex.chunks) == 1 else b"".join(ex.chunks)
        if b"text/event-stream" in ex.content_type:
            _parse_sse(body, ex.usage_chunk, rec)
        elif b"json" in ex.content_type and not ex.response_truncated:
            _parse_json_response(body, rec)
    elif ex.usage_chunk:
        _parse_sse(b"", ex.usage_chunk, rec)
    return rec


def _apply_usage(usage: Any, rec: dict[str, Any], source: str) -> None:
    if not isinstance(usage, dict):
        return
    pt = usage.get("prompt_tokens", usage.get("input_tokens"))
    ct = usage.get("completion_tokens", usage.get("output_tokens"))
    tt = usage.get("total_tokens")
    if isinstance(pt, int):
        rec["prompt_tokens"] = pt
    if isinstance(ct, int):
        rec["completion_tokens"] = ct
    if isinstance(tt, int):
        rec["total_tokens"] = tt
    elif isinstance(pt, int) and isinstance(ct, int):
        rec["total_tokens"] = pt + ct
    rec["usage_source"] = source


def _apply_meta(obj: dict[str, Any], rec: dict[str, Any]) -> None:
    rid = obj.get("id")
    if isinstance(rid, str) and rec["response_id"] is None:
        rec["response_id"] = rid
    model = obj.get("model")
    if isinstance(model, str):
        rec["model_name"] = rec["model_name"] or model
        rec.setdefault("served_model", model)
    fp = obj.get("system_fingerprint")
    if isinstance(fp, str):
        rec["model_revision"] = fp


def _parse_json_response(body: bytes, rec: dict[str, Any]) -> None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(obj, dict):
        return
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        rec["error_type"] = rec["error_type"] or (str(err.get("type")) if err.get("type") else "error")
        rec["error_message"] = rec["error_message"] or (str(msg)[:2000] if msg is not None else None)
        return
    if isinstance(obj.get("detail"), str | list) and rec["http_status"] >= 400:
        rec["error_type"] = rec["error_type"] or "error"
        rec["error_message"] = rec["error_message"] or str(obj["detail"])[:2000]
    _apply_meta(obj, rec)
    _apply_usage(obj.get("usage"), rec, "response")
    choices = obj.get("choices")
    if isinstance(choices, list) and choices:
        texts: list[Any] = []
        reasons: list[str] = []
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            msg = ch.get("message")
            if isinstance(msg, dict):
                text: Any = msg.get("content")
                if msg.get("tool_calls"):
                    text = {"content": text, "tool_calls": msg["tool_calls"]}
                texts.append(text)
            else:
                texts.append(ch.get("text"))
            fr = ch.get("finish_reason")
            if isinstance(fr, str):
                reasons.append(fr)
        rec["output_response"] = texts[0] if len(texts) == 1 else texts
        rec["finish_reason"] = reasons[0] if len(reasons) == 1 else (reasons or None)
        return
    if obj.get("object") == "list" and isinstance(obj.get("data"), list):
        data = obj["data"]
        if data and isinstance(data[0], dict) and "embedding" in data[0]:
            emb = data[0]["embedding"]
            dims = len(emb) if isinstance(emb, list) else None
            rec["output_response"] = {"embeddings": len(data), "dimensions": dims}
        return
    if obj.get("object") == "response":  # /v1/responses
        _apply_responses_output(obj, rec)


def _apply_responses_output(obj: dict[str, Any], rec: dict[str, Any]) -> None:
    texts: list[str] = []
    for item in obj.get("output") or []:
        if isinstance(item, dict):
            for part in item.get("content") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    rec["output_response"] = "".join(texts)
    status = obj.get("status")
    if isinstance(status, str):
        rec["finish_reason"] = status
    _apply_usage(obj.get("usage"), rec, "response")


def _sse_payloads(body: bytes) -> list[bytes]:
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                out.append(data)
    return out


def _load_events(payloads: list[bytes]) -> list[Any]:
    """Parse every event with one orjson call (one JSON array); fall back event by event."""
    if not payloads:
        return []
    try:
        events: list[Any] = orjson.loads(b"[" + b",".join(payloads) + b"]")
        return events
    except orjson.JSONDecodeError:
        out = []
        for p in payloads:
            try:
                out.append(orjson.loads(p))
            except orjson.JSONDecodeError:
                continue
        return out


def _parse_sse(body: bytes, usage_chunk: bytes | None, rec: dict[str, Any]) -> None:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    events = _load_events(_sse_payloads(body))
    injected = _load_events(_sse_payloads(usage_chunk)) if usage_chunk else []
    meta_done = False
    last_obj: dict[str, Any] | None = None
    for obj in events:
        if type(obj) is not dict:
            continue
        choices = obj.get("choices")
        if choices:
            last_obj = obj
            if not meta_done:
                _apply_meta(obj, rec)
                meta_done = True
            for ch in choices:
                if type(ch) is not dict:
                    continue
                idx = ch.get("index", 0)
                if type(idx) is not int:
                    idx = 0
                delta = ch.get("delta")
                piece = delta.get("content") if type(delta) is dict else ch.get("text")
                if type(piece) is str and piece:
                    bucket = texts.get(idx)
                    if bucket is None:
                        texts[idx] = [piece]
                    else:
                        bucket.append(piece)
                fr = ch.get("finish_reason")
                if fr is not None and type(fr) is str:
                    reasons[idx] = fr
            usage = obj.get("usage")
            if usage:
                _apply_usage(usage, rec, "stream")
            continue
        fp = obj.get("system_fingerprint")
        if isinstance(fp, str):  # vLLM's usage-only chunk (choices: []) carries it when usage is on
            rec["model_revision"] = fp
        if "error" in obj and isinstance(obj["error"], dict):
            err = obj["error"]
            rec["error_type"] = rec["error_type"] or str(err.get("type") or "error")
            rec["error_message"] = rec["error_message"] or str(err.get("message"))[:2000]
            continue
        etype = obj.get("type")
        if isinstance(etype, str) and etype.startswith("response."):  # /v1/responses events
            if etype == "response.output_text.delta" and isinstance(obj.get("delta"), str):
                texts.setdefault(0, []).append(obj["delta"])
            elif etype in ("response.completed", "response.incomplete", "response.failed"):
                resp = obj.get("response")
                if isinstance(resp, dict):
                    _apply_meta(resp, rec)
                    _apply_usage(resp.get("usage"), rec, "stream")
                    if isinstance(resp.get("status"), str):
                        rec["finish_reason"] = resp["status"]
            continue
        if not meta_done:
            _apply_meta(obj, rec)
            meta_done = True
        usage = obj.get("usage")
        if usage:
            _apply_usage(usage, rec, "stream")
    if last_obj is not None and rec["model_revision"] is None:
        fp = last_obj.get("system_fingerprint")
        if isinstance(fp, str):
            rec["model_revision"] = fp
    for obj in injected:
        if type(obj) is dict:
            if not meta_done:
                _apply_meta(obj, rec)
                meta_done = True
            fp = obj.get("system_fingerprint")
            if isinstance(fp, str):
                rec["model_revision"] = fp
            if obj.get("usage"):
                _apply_usage(obj["usage"], rec, "injected")
    if texts:
        joined = ["".join(texts[i]) for i in sorted(texts)]
        rec["output_response"] = joined[0] if len(joined) == 1 else joined
    if reasons:
        rs = [reasons[i] for i in sorted(reasons)]
        rec["finish_reason"] = rs[0] if len(rs) == 1 else rs
