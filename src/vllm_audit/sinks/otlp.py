"""The ``otlp`` sink: OpenTelemetry log records over OTLP/HTTP (``POST /v1/logs``, protobuf).

One request per batch of one writer's entries: one ``ResourceLogs`` (``service.name``,
``service.version``, ``host.name``, ``vllm_audit.writer_id``) with one ``ScopeLogs``
(``vllm-audit``) holding one ``LogRecord`` per entry, in chain order:

- ``time_unix_nano`` from the record's ``timestamp``, ``observed_time_unix_nano`` = now;
- ``severity_number`` / ``severity_text`` by status (:func:`vllm_audit.sinks.otel.severity`);
- ``body`` = the stored JSON line, byte for byte (its leaf hash can be recomputed downstream);
- ``event_name`` = ``vllm_audit.<record type>``;
- ``attributes`` from :mod:`vllm_audit.sinks.otel` (GenAI semantic conventions + ``vllm_audit.*``).

Responses, per the OTLP/HTTP specification: 200 = acknowledged (a ``partial_success`` with
rejected records is counted and logged, never retried, as the spec requires: the receiver does
not say which ones); 429, 502, 503, 504 = retry later, honouring ``Retry-After``; 400 (bad data)
and 413 (too large) = the batch is bisected until the offending records are alone, and those are
quarantined with the receiver's message while the rest is delivered. Any other answer (401, 403,
404, 500 ...) is treated as transient: a misconfigured endpoint must not quarantine the log.

OTLP has no idempotency key: a batch acknowledged but not yet committed to the cursor when the
shipper dies is sent again after a restart. ``vllm_audit.record_hash`` (the leaf hash) on each
record lets a backend dedupe.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import socket
import struct
import time
from collections.abc import Sequence
from typing import Literal

from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.base import Context, Sink
from vllm_audit.ship.config import Secret
from vllm_audit.sinks import otel
from vllm_audit.sinks._http import HttpClient, TransientError, parse_retry_after
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

log = logging.getLogger("vllm_audit.sinks.otlp")

RETRYABLE = frozenset({429, 502, 503, 504})
#: Answers that blame the data: bisect, then quarantine what the receiver still refuses alone.
BAD_DATA = frozenset({400, 413})


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "otlp"``: OpenTelemetry logs over OTLP/HTTP with protobuf encoding."""

    #: The logs endpoint (``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``); a URL without a path gets ``/v1/logs``.
    endpoint: str = "http://127.0.0.1:4318/v1/logs"
    #: Extra request headers (not secret), e.g. ``{ "X-Scope-OrgID" = "audit" }``.
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Request headers whose values are secrets, e.g. ``{ Authorization = { env = "OTLP_AUTH" } }``.
    secret_headers: dict[str, Secret] = dataclasses.field(default_factory=dict)
    #: CA bundle (PEM) to verify an https endpoint (empty: the system store).
    ca_file: str = ""
    #: Seconds to wait for the receiver's answer.
    timeout_s: float = 10.0
    #: Request body compression.
    compression: Literal["none", "gzip"] = "none"
    #: The ``service.name`` resource attribute.
    service_name: str = "vllm-audit"
    #: ``gen_ai.provider.name`` (and ``gen_ai.system``) of inference records.
    provider_name: str = "vllm"

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")


# -- protobuf wire format (the few OTLP messages this sink writes; checked against opentelemetry-proto in tests)


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]
_pack_fixed64 = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field (``tag`` = field number << 3 | 2, below 128)."""
    n = len(data)
    return _SMALL[tag] + (_SMALL[n] if n < 0x80 else _varint(n)) + data


def _str(tag: int, s: str) -> bytes:
    return _field(tag, s.encode("utf-8", "surrogatepass"))


def any_value(v: otel.AttrValue) -> bytes:
    """An ``AnyValue`` message."""
    if isinstance(v, str):
        return _str(0x0A, v)
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v)
    if isinstance(v, float):
        return b"\x21" + _pack_double(v)
    return _field(0x2A, b"".join(_field(0x0A, _str(0x0A, x)) for x in v))  # ArrayValue of strings


def key_value(key: str, v: otel.AttrValue) -> bytes:
    """A ``KeyValue`` message."""
    return _str(0x0A, key) + _field(0x12, any_value(v))


class _AttrCache:
    """Encoded ``KeyValue`` fields of the attributes that repeat (model, route, org, provider ...)."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[tuple[str, otel.AttrValue], bytes] = {}

    def field(self, key: str, v: otel.AttrValue) -> bytes:
        k = (key, v)
        try:
            return self._d[k]
        except (KeyError, TypeError):
            pass
        data = _field(0x32, key_value(key, v))
        if isinstance(v, str | bool) and len(self._d) < 4096:
            self._d[k] = data
        return data


def log_record(
    time_unix_nano: int,
    observed: int,
    severity_number: int,
    severity_text: str,
    body: bytes,
    attributes: bytes,
    event_name: str,
) -> bytes:
    """A ``LogRecord`` message (fields in field-number order, as protobuf serializers write them).

    ``body`` is the UTF-8 text of the string body; ``attributes`` the encoded attribute fields.
    """
    out = b"\x09" + _pack_fixed64(time_unix_nano) if time_unix_nano else b""
    out += b"\x10" + _varint(severity_number) + _str(0x1A, severity_text)
    out += _field(0x2A, _field(0x0A, body)) + attributes
    if observed:
        out += b"\x59" + _pack_fixed64(observed)
    return out + _str(0x62, event_name)


def partial_success(body: bytes) -> tuple[int, str]:
    """``(rejected_log_records, error_message)`` of an ``ExportLogsServiceResponse`` (0, "" when absent)."""
    inner = _fields(body).get(1)
    if not isinstance(inner, bytes):
        return 0, ""
    f = _fields(inner)
    n = f.get(1, 0)
    msg = f.get(2, b"")
    return (n if isinstance(n, int) else 0), (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else "")


def _fields(body: bytes) -> dict[int, int | bytes]:
    """The varint and length-delimited fields of one message (last one wins; stops at anything else)."""
    out: dict[int, int | bytes] = {}
    i, end = 0, len(body)

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            b = body[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    try:
        while i < end:
            key = varint()
            num, wire = key >> 3, key & 7
            if wire == 0:
                v = varint()
                out[num] = v - (1 << 64) if v >= 1 << 63 else v
            elif wire == 2:
                n = varint()
                out[num] = body[i : i + n]
                i += n
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                break
    except IndexError:
        pass
    return out


def status_message(body: bytes) -> str:
    """The ``message`` of a ``google.rpc.Status`` error body (field 2), else the body as text."""
    msg = _fields(body).get(2)
    if isinstance(msg, bytes):
        try:
            return msg.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return body[:300].decode("utf-8", "replace").strip()


class OtlpSink(Sink):
    kind = "otlp"

    def __init__(self, name: str, options: Options, env: SinkEnv) -> None:
        super().__init__(name, env.state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        endpoint = options.endpoint
        if "://" in endpoint and endpoint.split("://", 1)[1].rstrip("/").count("/") == 0:
            endpoint = endpoint.rstrip("/") + "/v1/logs"
        self.endpoint = endpoint
        where = f"sinks.{name}"
        self._client_args = (endpoint, options.timeout_s, str(env.path(options.ca_file)) if options.ca_file else "")
        HttpClient(endpoint, timeout_s=options.timeout_s, ca_file=self._client_args[2], where=f"{where} endpoint")
        headers = {"Content-Type": "application/x-protobuf", **options.headers}
        for key, secret in options.secret_headers.items():
            headers[key] = secret.resolve(f"{where} secret_headers.{key}")
        if options.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        self.headers = headers
        self._client: HttpClient | None = None
        self._ctx: Context | None = None
        self._host = socket.gethostname()
        self._resources: dict[str, tuple[bytes, bytes]] = {}
        self._attrs = _AttrCache()
        #: Records a receiver reported as rejected in a partial success (it does not say which).
        self.partial_rejected = 0
        #: Requests sent (bisection included) and records acknowledged, for status and tests.
        self.requests = 0
        self.acknowledged = 0

    def open(self) -> None:
        if self._client is None:
            url, timeout, ca = self._client_args
            self._client = HttpClient(url, timeout_s=timeout, ca_file=ca, where=f"sinks.{self.name} endpoint")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        self._ctx = ctx
        super().apply(writer_id, entries, ctx)

    # -- encoding -------------------------------------------------------------------------------

    def _resource_and_scope(self, writer_id: str) -> tuple[bytes, bytes]:
        """The ``resource`` field of ``ResourceLogs`` and the ``scope`` field of ``ScopeLogs``, once per writer."""
        cached = self._resources.get(writer_id)
        if cached is None:
            from vllm_audit import __version__

            attrs = (
                ("service.name", self.options.service_name),
                ("service.version", __version__),
                ("host.name", self._host),
                ("vllm_audit.writer_id", writer_id),
            )
            resource = b"".join(_field(0x0A, key_value(k, v)) for k, v in attrs)  # Resource.attributes = 1
            scope = _str(0x0A, "vllm-audit") + _str(0x12, __version__)  # InstrumentationScope name, version
            cached = _field(0x0A, resource), _field(0x0A, scope)
            self._resources[writer_id] = cached
        return cached

    def encode_record(self, entry: Entry, observed: int) -> bytes:
        """One serialized ``LogRecord`` for ``entry``."""
        rec = entry.record()
        number, text = otel.severity(rec)
        cache = self._attrs
        attrs = b"".join([cache.field(k, v) for k, v in otel.attributes(rec, entry, self.options.provider_name)])
        return log_record(
            otel.time_unix_nano(rec.get("timestamp")),
            observed,
            number,
            text,
            entry.line,
            attrs,
            f"vllm_audit.{entry.record_type or 'entry'}",
        )

    def request_body(self, writer_id: str, records: Sequence[bytes]) -> bytes:
        """An ``ExportLogsServiceRequest`` holding ``records`` (serialized ``LogRecord`` messages)."""
        resource, scope = self._resource_and_scope(writer_id)
        scope_logs = scope + b"".join(_field(0x12, r) for r in records)
        resource_logs = resource + _field(0x12, scope_logs)
        return _field(0x0A, resource_logs)

    # -- delivery -------------------------------------------------------------------------------

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        observed = time.time_ns()
        records = [self.encode_record(e, observed) for e in entries]
        return self._send(writer_id, list(entries), records)

    def _send(self, writer_id: str, entries: list[Entry], records: list[bytes]) -> list[tuple[Entry, str]]:
        if self._client is None:
            self.open()
        assert self._client is not None
        body = self.request_body(writer_id, records)
        if self.options.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)
        self.requests += 1
        resp = self._client.request("POST", "", body, self.headers)
        if resp.status == 200:
            self._partial(resp.body)
            self.acknowledged += len(records)
            return []
        message = status_message(resp.body) if resp.body else ""
        if resp.status in RETRYABLE:
            raise TransientError(
                f"OTLP receiver answered {resp.status}: {message}", parse_retry_after(resp.headers.get("retry-after"))
            )
        if resp.status in BAD_DATA:
            if len(entries) == 1:
                return [(entries[0], f"OTLP receiver answered {resp.status}: {message}"[:2000])]
            mid = len(entries) // 2
            return self._send(writer_id, entries[:mid], records[:mid]) + self._send(
                writer_id, entries[mid:], records[mid:]
            )
        raise TransientError(f"OTLP receiver answered {resp.status}: {message}")

    def _partial(self, body: bytes) -> None:
        rejected, message = partial_success(body)
        if rejected > 0:
            self.partial_rejected += rejected
            msg = f"partial success: receiver rejected {rejected} log record(s): {message}"
            log.warning("sink %s: %s", self.name, msg)
            if self._ctx is not None:
                self._ctx.status.last_error = msg[:500]
                self._ctx.status.last_error_at = time.time()


def build(name: str, options: Options, env: SinkEnv) -> OtlpSink:
    return OtlpSink(name, options, env)

