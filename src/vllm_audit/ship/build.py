"""Build the projections a configuration asks for, and the runner that drives them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vllm_audit.config import Config
from vllm_audit.ship.base import Projection
from vllm_audit.ship.config import state_dir
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.registry import SinkEnv, build_sink


def sink_env(config: Config) -> SinkEnv:
    base = Path(config.source).resolve().parent if config.source else Path(os.getcwd())
    return SinkEnv(Path(config.log.dir), state_dir(config.ship, config.log.dir), base)


def build_projections(config: Config) -> list[Projection]:
    """The built-in projections (query store, quota charging, when configured) and every sink."""
    from vllm_audit import access

    out: list[Projection] = list(access.build_projections(config))
    env = sink_env(config)
    for spec in config.sinks.values():
        out.append(build_sink(spec, env))
    if config.detect.enabled:
        from vllm_audit.detect.projection import build_detector

        out.append(build_detector(config))
    if config.archive.enabled:
        from vllm_audit.archive.projection import ArchiveProjection

        out.append(ArchiveProjection(config, env.state_dir))
    return out


def build_runner(config: Config, *, durable: tuple[str, Callable[[], int]] | None = None) -> Runner | None:
    """A runner over ``[log] dir`` for every projection (None when there is none)."""
    projections = build_projections(config)
    if not projections:
        return None
    return Runner(config.log.dir, state_dir(config.ship, config.log.dir), projections, config.ship, durable=durable)
