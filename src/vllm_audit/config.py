"""One configuration object, built from one TOML file.

``load_config(path)`` reads the file; ``config_from_env()`` reads the file named by
``VLLM_AUDIT_CONFIG`` (vLLM's ``--middleware`` constructs ``AuditMiddleware(app)`` with no
arguments, so the environment is the only way in). Every section is a frozen dataclass; unknown
keys and wrongly typed values are errors that name the file, the section and the key.

Area packages declare their own section dataclasses (``integrity.config``, ``privacy.config``,
``access.config``) and this module composes them; ``parse_section`` does the checking for all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from vllm_audit.access.config import AccessConfig
from vllm_audit.archive.config import ArchiveConfig, RetentionConfig
from vllm_audit.collect.config import CollectConfig
from vllm_audit.detect.config import DetectConfig
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.privacy.config import PrivacyConfig
from vllm_audit.ship.config import ShipConfig
from vllm_audit.sinks.registry import SinkSpec, parse_sinks

ENV_CONFIG = "VLLM_AUDIT_CONFIG"
#: JSON object merged over the file, section by section (how the CLI hands flags to workers).
ENV_OVERRIDES = "VLLM_AUDIT_OVERRIDES"

T = TypeVar("T")

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    """Where and how records are made durable (``[log]``)."""

    #: Directory of the local log (segments per writer, checkpoints, generated keys).
    dir: str = "./audit-log"
    #: "strict": the last byte of a response is released only after its record is fsynced.
    #: "async": records are fsynced in the background (a crash may lose the last batch).
    durability: Literal["strict", "async"] = "strict"
    #: What happens when records cannot be written (queue full, disk error).
    on_failure: Literal["fail_closed", "fail_open"] = "fail_closed"
    #: Records waiting for the writer beyond which the log counts as failing (policy applies).
    queue_size: int = 65536
    #: Most records in one group commit (one write + one fdatasync).
    batch_max: int = 4096
    #: Most bytes of a prompt and of a response kept for the record (per request, decided at the
    #: edge): a longer prompt is stored cut to this size, a longer response is kept only up to it
    #: (the rest is counted in response_bytes), each with its truncation flag. It bounds both the
    #: per-record work of the writer and the memory a stream holds while it runs.
    max_capture_bytes: int = 8 * MiB
    #: Exchanges whose captured bodies exceed this many bytes are finalized and redacted in a
    #: separate process, so they never hold up other clients' group commits (0: never).
    heavy_record_bytes: int = 256 * 1024
    #: Processes of that heavy-record lane (started on first use).
    heavy_workers: int = 1
    #: Processes that finalize and redact every batch's records (0: the writer thread does it).
    #: With 1 or more, the gateway's own process (its event loop) keeps its CPU for proxying; they
    #: prepare the next batch (at most 1024 records) while the writer thread seals one.
    prepare_processes: int = 0
    #: Batches with fewer exchanges than this are prepared in the writer thread (a round trip to
    #: the processes costs more than it saves for a handful).
    prepare_min_batch: int = 8
    #: Seconds a strictly durable response may wait for its record before it fails.
    durable_timeout_s: float = 10.0
    #: Log one operational line per record (logger ``vllm_audit.access``, INFO), written by the
    #: writer thread: request id, route, status, sizes, tokens, timings — never content.
    access_log: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeConfig:
    """The audited edge, common to the middleware and the gateway (``[edge]``)."""

    #: CIDRs of reverse proxies whose forwarding header (``client_ip_header``) is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: The one forwarding header the trusted proxies maintain: "x-forwarded-for" (nginx, AWS ALB,
    #: HAProxy, Envoy) or "forwarded" (RFC 7239). The other header is never read: proxies pass it
    #: through from the client unchanged, so believing it would let a client choose its own IP.
    client_ip_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    #: Header that carries the request id in and out (honoured when safe, else replaced).
    request_id_header: str = "x-request-id"
    #: Longest inbound request id honoured (bytes).
    max_request_id_length: int = 128
    #: Request bodies larger than this get 413 (and a record).
    max_request_bytes: int = 32 * MiB
    #: Requests whose headers add up to more than this get 431 (and a record).
    max_header_bytes: int = 64 * 1024
    #: Ask the upstream for usage on streams and strip the extra chunk from what the client gets.
    inject_stream_usage: bool = True
    #: Prefix under which the audit endpoints (healthz, readyz, metrics, audit API) are served.
    #: ``/healthz`` (liveness, no details) is also served at the root in every mode.
    ops_prefix: str = "/audit"
    #: File holding a bearer token (16+ characters) that readyz and metrics then require
    #: (``Authorization: Bearer ...``); relative to the config file. Empty: they are open.
    ops_token_file: str = ""
    #: Seconds a client may take to send the whole request body (408 and a record after).
    body_timeout_s: float = 30.0
    #: Paths that are passed through without a record (exact match). Empty by default.
    unaudited_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayConfig:
    """``vllm-audit serve`` (``[gateway]``). An empty upstream serves the built-in demo engine."""

    #: URL of the OpenAI-compatible server to front; empty serves the built-in demo engine.
    upstream: str = ""
    #: Address to listen on.
    host: str = "127.0.0.1"
    #: Port to listen on.
    port: int = 8000
    #: Worker processes; each owns its own writer and chain.
    workers: int = 1
    #: Seconds to establish a connection to the upstream (502 after).
    connect_timeout_s: float = 10.0
    #: Longest silence tolerated while reading the upstream's response (between chunks).
    read_timeout_s: float = 600.0
    #: Most concurrent connections to the upstream per worker.
    max_connections: int = 1000
    #: Most client connections (and requests in flight) per worker; beyond it uvicorn answers
    #: 503 at once. 0 = no limit.
    max_client_connections: int = 2048
    #: Seconds an idle keep-alive client connection stays open between requests.
    keep_alive_timeout_s: float = 5.0
    #: Seconds a client connection may take to send a request's headers (counted from the
    #: connection's start or the request's first byte); an idle new connection is closed after it.
    header_timeout_s: float = 10.0
    #: Largest request head (request line and headers) accepted before the connection is refused.
    max_header_bytes: int = 1 * MiB
    #: Address of a separate listener for /healthz, /readyz and /metrics (with ``ops_port``).
    ops_host: str = "127.0.0.1"
    #: Port of the separate operations listener; 0 serves them on the main port only.
    ops_port: int = 0
    #: Model name served by the demo engine.
    demo_model: str = "demo-model"
    #: Simulated per-token delay of the demo engine.
    demo_token_delay_ms: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    edge: EdgeConfig = dataclasses.field(default_factory=EdgeConfig)
    gateway: GatewayConfig = dataclasses.field(default_factory=GatewayConfig)
    integrity: IntegrityConfig = dataclasses.field(default_factory=IntegrityConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    access: AccessConfig = dataclasses.field(default_factory=AccessConfig)
    ship: ShipConfig = dataclasses.field(default_factory=ShipConfig)
    archive: ArchiveConfig = dataclasses.field(default_factory=ArchiveConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    #: ``[sinks.NAME]`` tables, one per sink: ``type`` plus that type's keys (see below).
    sinks: dict[str, SinkSpec] = dataclasses.field(default_factory=dict)
    #: ``[detect]``: the detector projection (rules over the record stream, docs/detection.md).
    detect: DetectConfig = dataclasses.field(default_factory=DetectConfig)
    #: ``[collect]``: `vllm-audit collect`, the scale-out collector (docs/scaling.md).
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    #: The file this was loaded from, if any. ``[log] dir`` is relative to the working directory;
    #: key and store files named in ``[privacy]`` and ``[access]`` are relative to this file.
    source: str | None = None

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and check a TOML configuration file; ``None`` gives the defaults.

    ``overrides`` (``{"section": {"key": value}}``) are merged over the file before checking.
    """
    if path is None:
        return config_from_mapping(_merge({}, overrides or {}), source=None)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {str(p)!r}: {exc.strerror or exc}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Config file {str(p)!r} is not valid TOML: {exc}.") from None
    return config_from_mapping(_merge(data, overrides or {}), source=str(p))


def config_from_env() -> Config:
    """The configuration named by ``VLLM_AUDIT_CONFIG`` (defaults when unset), plus
    ``VLLM_AUDIT_OVERRIDES`` (a JSON object) when set."""
    path = os.environ.get(ENV_CONFIG) or None
    raw = os.environ.get(ENV_OVERRIDES)
    overrides: Any = None
    if raw:
        try:
            overrides = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_OVERRIDES} is not valid JSON: {exc}.") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"{ENV_OVERRIDES} must be a JSON object of sections.")
    return load_config(path, overrides)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_from_mapping(data: Mapping[str, Any], source: str | None = None) -> Config:
    where = source or "<config>"
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for key, value in data.items():
        if key == "source" or key not in hints:
            raise ConfigError(f"{where}: unknown section [{key}]. Known: {', '.join(_section_names())}.")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: [{key}] must be a table.")
        if key == "sinks":
            sections[key] = parse_sinks(value, f"{where} [sinks")
            continue
        sections[key] = parse_section(hints[key], value, f"{where} [{key}]")
    return Config(source=source, **sections)


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "source"]


def parse_section(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build the dataclass ``cls`` from ``data``, checking every key and type.

    Nested dataclasses are parsed recursively (sub-tables); ``tuple[X, ...]`` accepts TOML arrays;
    ``dict[str, X]`` accepts tables; ``Literal`` values are checked; ints are accepted for floats.
    """
    if not dataclasses.is_dataclass(cls):  # pragma: no cover - programming error
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}. Known keys: {', '.join(sorted(names))}.")
        kwargs[key] = _coerce(hints[key], value, f"{where} {key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}.")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected an array, got {type(value).__name__}.")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}.")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}.")
        return parse_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{where}: unsupported value {value!r}.")  # pragma: no cover
