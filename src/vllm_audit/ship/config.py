"""The ``[ship]`` section (the projection runner) and secret references used by ``[sinks.NAME]``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from vllm_audit.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class ShipConfig:
    """The projection runner: query store, quota charging and every sink (``[ship]``)."""

    #: Run the projections on behalf of the gateway / middleware process. Off: run
    #: `vllm-audit ship` beside it (one process per log directory runs each projection; the
    #: others stand by).
    in_process: bool = True
    #: Where those projections run: "thread" (threads of the serving process), "process" (a child
    #: process it starts and restarts, so sinks never take the serving process's CPU or GIL), or
    #: "auto": a child process when any [sinks.*], [detect] or [archive] is configured, threads
    #: for the built-in query store and quota charging alone.
    isolation: Literal["auto", "thread", "process"] = "auto"
    #: Where cursors, quarantine files, status and locks live (empty: ``<log dir>/ship``).
    state_dir: str = ""
    #: Most entries handed to a projection in one batch.
    batch_max: int = 1000
    #: Seconds between looks at the log when a projection is caught up (out of process, or for
    #: writers of other processes; the writing process wakes its runner on every commit).
    poll_interval_s: float = 0.25
    #: After delivering a small batch, wait this long before the next one, so that under steady
    #: traffic projections work in batches (one transaction / request per batch) rather than per
    #: record. The added delay is at most this.
    linger_s: float = 0.05
    #: First retry delay after a failed batch; doubles up to ``backoff_max_s``, with full jitter.
    backoff_initial_s: float = 0.2
    #: Longest delay between retries of a failing projection.
    backoff_max_s: float = 30.0
    #: Seconds between status files written for ``vllm-audit ship --status``.
    status_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if self.linger_s < 0:
            raise ValueError("linger_s must be 0 or positive")
        for name in ("poll_interval_s", "backoff_initial_s", "backoff_max_s", "status_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def state_dir(ship: ShipConfig, log_dir: str) -> Path:
    return Path(ship.state_dir) if ship.state_dir else Path(log_dir) / "ship"


@dataclasses.dataclass(frozen=True, slots=True)
class Secret:
    """A secret named, never written, in the config: ``{ env = "NAME" }`` or ``{ file = "/path" }``."""

    #: Environment variable holding the secret.
    env: str = ""
    #: File holding the secret (surrounding whitespace stripped).
    file: str = ""

    def __post_init__(self) -> None:
        if bool(self.env) == bool(self.file):
            raise ValueError("a secret names exactly one of env or file")

    def resolve(self, where: str) -> str:
        """The secret's value; ``ConfigError`` naming ``where`` when it cannot be read."""
        if self.env:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"{where}: environment variable {self.env} is not set.")
            return value
        try:
            return Path(self.file).read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read secret file {self.file!r}: {exc.strerror or exc}.") from None
