"""Sink types and the parsing of ``[sinks.NAME]`` tables.

Each sink type is a module that defines ``Options`` (a frozen dataclass, subclass of
:class:`SinkOptions`, whose ``#:`` comments document its keys) and
``build(name, options, env) -> Projection``. Modules import their client libraries lazily (inside
``build`` / ``open``), so parsing a config never imports Kafka or NATS clients.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vllm_audit.errors import ConfigError

if TYPE_CHECKING:
    from vllm_audit.ship.base import Projection

#: ``type = "..."`` → the module implementing it.
SINK_MODULES: dict[str, str] = {
    "file": "vllm_audit.sinks.file",
    "syslog": "vllm_audit.sinks.syslog",
    "kafka": "vllm_audit.sinks.kafka",
    "nats": "vllm_audit.sinks.nats",
    "elasticsearch": "vllm_audit.sinks.elastic",
    "otlp": "vllm_audit.sinks.otlp",
    "webhook": "vllm_audit.sinks.webhook",
}

RECORD_TYPES = ("inference", "event", "alert")


@dataclasses.dataclass(frozen=True, slots=True)
class SinkOptions:
    """Keys every sink accepts."""

    #: Entry types shipped: any of "inference", "event", "alert" (the others are skipped, the
    #: cursor moves past them).
    record_types: tuple[str, ...] = RECORD_TYPES
    #: Most entries in one delivery.
    batch_max: int = 500

    def __post_init__(self) -> None:
        bad = [t for t in self.record_types if t not in RECORD_TYPES]
        if bad:
            raise ValueError(f"record_types: unknown {bad}; choose from {list(RECORD_TYPES)}")
        if self.batch_max < 1:
            raise ValueError("batch_max must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True)
class SinkEnv:
    """What a sink is built with: where its state lives and where relative paths start."""

    log_dir: Path
    state_dir: Path
    #: Directory of the config file (relative paths in sink options start here), or the cwd.
    base_dir: Path

    def path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.base_dir / q


@dataclasses.dataclass(frozen=True, slots=True)
class SinkSpec:
    """One ``[sinks.NAME]`` table, checked."""

    name: str
    type: str
    options: Any


class _SinkModule(Protocol):
    Options: type[Any]

    def build(self, name: str, options: Any, env: SinkEnv) -> Projection: ...


def sink_module(type_: str) -> _SinkModule:
    mod: Any = importlib.import_module(SINK_MODULES[type_])
    return mod  # type: ignore[no-any-return]


def parse_sinks(data: Mapping[str, Any], where: str) -> dict[str, SinkSpec]:
    """Check every ``[sinks.NAME]`` table: a known ``type`` plus that type's options."""
    from vllm_audit.config import parse_section

    out: dict[str, SinkSpec] = {}
    for name, table in data.items():
        here = f"{where}.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{here}: must be a table with a 'type' key.")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"{here}: sink names use letters, digits, '-' and '_' only.")
        type_ = table.get("type")
        if type_ not in SINK_MODULES:
            known = ", ".join(sorted(SINK_MODULES))
            raise ConfigError(f"{here} type: {type_!r} is not a sink type. Known: {known}.")
        options = {k: v for k, v in table.items() if k != "type"}
        mod = sink_module(type_)
        out[name] = SinkSpec(name, type_, parse_section(mod.Options, options, here))
    return out


def build_sink(spec: SinkSpec, env: SinkEnv) -> Projection:
    return sink_module(spec.type).build(spec.name, spec.options, env)
