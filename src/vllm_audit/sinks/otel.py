"""A stored record as OpenTelemetry attributes, following the GenAI semantic conventions.

:data:`FIELD_MAP` is the table (record field → OTel attribute) that ``docs/field-map.md`` shows;
:func:`attributes` applies it to one entry. The values are the stored ones: redaction and
pseudonymisation happened before the record was sealed (invariant 3), so ``client.address`` and
``user.id`` carry what the policy stored (an address or its pseudonym), never anything raw.
Absent and null fields produce no attribute. Chain fields (writer, seq, record hash, prev) go
under ``vllm_audit.*`` so a backend can dedupe a replayed record by ``vllm_audit.record_hash``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from vllm_audit.integrity.codec import Entry

#: An OTel attribute value as this mapping produces it.
AttrValue = str | int | float | bool | tuple[str, ...]

#: ``route`` → ``gen_ai.operation.name`` (well-known values of the GenAI conventions).
OPERATIONS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
}


@dataclasses.dataclass(frozen=True, slots=True)
class FieldMapping:
    """One row of the field map: where a record field goes in OpenTelemetry."""

    #: The record field (``docs/data-model.md``), or the entry property for chain fields.
    field: str
    #: The OTel attribute name.
    otel: str
    #: How the value is derived when it is not copied as it is.
    note: str = ""


FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("route", "gen_ai.operation.name", "chat, text_completion or embeddings, from the route"),
    FieldMapping("model_name", "gen_ai.request.model"),
    FieldMapping("served_model", "gen_ai.response.model"),
    FieldMapping("response_id", "gen_ai.response.id"),
    FieldMapping("finish_reason", "gen_ai.response.finish_reasons", "always a string array"),
    FieldMapping("prompt_tokens", "gen_ai.usage.input_tokens"),
    FieldMapping("completion_tokens", "gen_ai.usage.output_tokens"),
    FieldMapping("(sink option provider_name)", "gen_ai.provider.name", "also sent as the older gen_ai.system"),
    FieldMapping("upstream", "server.address", "host of the upstream URL (and server.port)"),
    FieldMapping("client_ip", "client.address", "as stored: the address or its pseudonym"),
    FieldMapping("user_id", "user.id", "as stored: the id or its pseudonym"),
    FieldMapping("roles", "user.roles"),
    FieldMapping("method", "http.request.method"),
    FieldMapping("route", "url.path"),
    FieldMapping("http_status", "http.response.status_code", "omitted when 0 (the client left first)"),
    FieldMapping("error_type", "error.type", "else the status when it is not ok"),
    FieldMapping("timestamp", "LogRecord.time_unix_nano", "OTLP sink"),
    FieldMapping("status", "LogRecord.severity_number", "OTLP sink: ok INFO, client errors WARN, failures ERROR"),
    FieldMapping("(the stored line)", "LogRecord.body", "OTLP sink: the stored JSON line as it is"),
    FieldMapping("record_type", "vllm_audit.record_type"),
    FieldMapping("event", "vllm_audit.event", "events only"),
    FieldMapping("request_id", "vllm_audit.request_id"),
    FieldMapping("org_id", "vllm_audit.org_id"),
    FieldMapping("status", "vllm_audit.status"),
    FieldMapping("stream", "vllm_audit.stream"),
    FieldMapping("total_tokens", "vllm_audit.usage.total_tokens"),
    FieldMapping("latency_ms", "vllm_audit.latency_ms"),
    FieldMapping("ttft_ms", "vllm_audit.ttft_ms"),
    FieldMapping("prompt_sha256", "vllm_audit.prompt_sha256"),
    FieldMapping("schema_version", "vllm_audit.schema_version"),
    FieldMapping("writer_id", "vllm_audit.writer_id"),
    FieldMapping("seq", "vllm_audit.seq"),
    FieldMapping("(leaf hash)", "vllm_audit.record_hash", "hex SHA-256 leaf hash: the dedupe key"),
    FieldMapping("prev", "vllm_audit.prev"),
)

#: Fields copied as they are when they hold a string, number or boolean: ``(record field, attribute)``.
_SCALARS: tuple[tuple[str, str], ...] = (
    ("model_name", "gen_ai.request.model"),
    ("served_model", "gen_ai.response.model"),
    ("response_id", "gen_ai.response.id"),
    ("prompt_tokens", "gen_ai.usage.input_tokens"),
    ("completion_tokens", "gen_ai.usage.output_tokens"),
    ("client_ip", "client.address"),
    ("user_id", "user.id"),
    ("method", "http.request.method"),
    ("route", "url.path"),
    ("record_type", "vllm_audit.record_type"),
    ("event", "vllm_audit.event"),
    ("request_id", "vllm_audit.request_id"),
    ("org_id", "vllm_audit.org_id"),
    ("status", "vllm_audit.status"),
    ("stream", "vllm_audit.stream"),
    ("total_tokens", "vllm_audit.usage.total_tokens"),
    ("latency_ms", "vllm_audit.latency_ms"),
    ("ttft_ms", "vllm_audit.ttft_ms"),
    ("prompt_sha256", "vllm_audit.prompt_sha256"),
    ("schema_version", "vllm_audit.schema_version"),
)


def operation_name(route: object) -> str | None:
    return OPERATIONS.get(route) if isinstance(route, str) else None


def server_address(upstream: object) -> tuple[str, int | None] | None:
    """``(host, port)`` of an upstream URL; None for ``demo``, null or anything that is not a URL."""
    if not isinstance(upstream, str) or "://" not in upstream:
        return None
    try:
        parts = urlsplit(upstream)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return host, port


def error_type(rec: Mapping[str, Any]) -> str | None:
    et = rec.get("error_type")
    if isinstance(et, str) and et:
        return et
    status = rec.get("status")
    if isinstance(status, str) and status and status != "ok":
        return status
    return None


def attributes(rec: Mapping[str, Any], entry: Entry, provider_name: str = "vllm") -> list[tuple[str, AttrValue]]:
    """The OTel attributes of one entry (``rec`` is ``entry.record()``), in :data:`FIELD_MAP` order."""
    out: list[tuple[str, AttrValue]] = []
    add = out.append
    op = operation_name(rec.get("route"))
    if op is not None:
        add(("gen_ai.operation.name", op))
    if rec.get("record_type") == "inference" and provider_name:
        add(("gen_ai.provider.name", provider_name))
        add(("gen_ai.system", provider_name))
    fr = rec.get("finish_reason")
    if isinstance(fr, str) and fr:
        add(("gen_ai.response.finish_reasons", (fr,)))
    elif isinstance(fr, list):
        add(("gen_ai.response.finish_reasons", tuple(str(x) for x in fr if x is not None)))
    server = server_address(rec.get("upstream"))
    if server is not None:
        add(("server.address", server[0]))
        if server[1] is not None:
            add(("server.port", server[1]))
    roles = rec.get("roles")
    if isinstance(roles, list) and roles:
        add(("user.roles", tuple(str(r) for r in roles)))
    hs = rec.get("http_status")
    if isinstance(hs, int) and not isinstance(hs, bool) and hs > 0:
        add(("http.response.status_code", hs))
    et = error_type(rec)
    if et is not None:
        add(("error.type", et))
    for field, name in _SCALARS:
        v = rec.get(field)
        if isinstance(v, str | int | float) and v != "":
            add((name, v))
    add(("vllm_audit.writer_id", entry.writer_id))
    add(("vllm_audit.seq", entry.seq))
    add(("vllm_audit.record_hash", entry.leaf_hex))
    add(("vllm_audit.prev", entry.prev))
    return out


#: OTel severity numbers (logs data model).
SEVERITY_INFO = 9
SEVERITY_WARN = 13
SEVERITY_ERROR = 17
_STATUS_SEVERITY = {
    "ok": SEVERITY_INFO,
    "cancelled": SEVERITY_INFO,
    "client_error": SEVERITY_WARN,
    "rejected": SEVERITY_WARN,
    "upstream_error": SEVERITY_ERROR,
    "timeout": SEVERITY_ERROR,
}
_TEXT = {SEVERITY_INFO: "INFO", SEVERITY_WARN: "WARN", SEVERITY_ERROR: "ERROR"}


def severity(rec: Mapping[str, Any]) -> tuple[int, str]:
    """``(severity_number, severity_text)``: by status for inference records, WARN/ERROR for alerts."""
    rt = rec.get("record_type")
    if rt == "alert":
        sev = rec.get("severity")
        n = SEVERITY_ERROR if sev in ("high", "critical") else SEVERITY_WARN
    elif rt == "inference":
        st = rec.get("status")
        n = _STATUS_SEVERITY.get(st, SEVERITY_WARN) if isinstance(st, str) else SEVERITY_WARN
    else:
        n = SEVERITY_INFO
    return n, _TEXT[n]


def time_unix_nano(timestamp: object) -> int:
    """Nanoseconds since the epoch of a record's ``timestamp`` (``2026-11-25T01:02:03.456Z``); 0 if unreadable."""
    if not isinstance(timestamp, str):
        return 0
    try:
        dt = datetime.fromisoformat(timestamp)
    except ValueError:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
