"""The ``[integrity]`` section."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class IntegrityConfig:
    """Chain, segments, signed checkpoints and anchors (``[integrity]``)."""

    #: Private key (``vllm-audit keygen``) that signs checkpoints. Empty: one is generated on first
    #: start in ``<log dir>/keys/`` with a warning (configure a real one kept off the log host).
    signing_key: str = ""
    #: Sign a checkpoint when this many entries were added since the last one ...
    checkpoint_every_records: int = 1000
    #: ... or this many seconds passed and entries were added.
    checkpoint_every_seconds: float = 10.0
    #: The writer calls ``heartbeat()`` after this many idle seconds; every heartbeat signs a
    #: checkpoint (even with no new entries), so a silent writer is told apart from a deleted tail.
    heartbeat_seconds: float = 10.0
    #: Seal the active segment and start a new one at this size ...
    segment_max_bytes: int = 64 * 1024 * 1024
    #: ... or age (seconds; 0 = never by time).
    segment_max_seconds: float = 86400.0
    #: Directories (other disks / hosts / WORM mounts) that receive a copy of every checkpoint.
    anchors: tuple[str, ...] = ()
    #: Checkpoint origin line is ``<origin_prefix>/<writer_id>``.
    origin_prefix: str = "vllm-audit"
    #: Also append each signed checkpoint to the chain as a ``checkpoint`` event (when entries were
    #: added since the last one), so sinks ship it and `vllm-audit collect` verifies Merkle roots.
    embed_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.checkpoint_every_records < 1:
            raise ValueError("checkpoint_every_records must be at least 1")
        for name in ("checkpoint_every_seconds", "heartbeat_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.segment_max_bytes < 4096:
            raise ValueError("segment_max_bytes must be at least 4096")
        if self.segment_max_seconds < 0:
            raise ValueError("segment_max_seconds must be 0 (off) or positive")
        if not self.origin_prefix or any(c.isspace() for c in self.origin_prefix):
            raise ValueError("origin_prefix must be non-empty and without spaces")
