"""A real log that ``vllm-audit prune`` can prune again and again (retention 0 days, no archive).

Every step goes through the real code: :class:`Chain` writes and resumes, :func:`plan` and
:func:`execute` prune (appending the signed ``retention.pruned`` event through the resumed writer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.archive.prune import execute, plan
from vllm_audit.config import Config, load_config
from vllm_audit.integrity.chain import Chain, list_segments
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.reader import PrunedRange, read_pruned
from vllm_audit.integrity.verify import Report, verify_log

from ._logtools import record


@dataclasses.dataclass
class PrunableLog:
    tmp: Path
    config: Config
    cfg: IntegrityConfig
    written: int = 0

    @property
    def log_dir(self) -> Path:
        return self.tmp / "log"

    @property
    def writer_dir(self) -> Path:
        (d,) = (self.log_dir / "writers").iterdir()
        return d

    @property
    def toml(self) -> Path:
        """The same configuration as a file, for the CLI."""
        p = self.tmp / "audit.toml"
        p.write_text(
            f'[log]\ndir = "{self.log_dir}"\n'
            f'[integrity]\nsigning_key = "{self.tmp / "k.key"}"\nsegment_max_bytes = 8000\n'
            "[retention]\ndays = 0\nrequire_archive = false\n"
        )
        return p

    def write(self, batches: int, size: int = 10) -> None:
        """Resume the writer (it must go on where the log stops) and commit ``batches`` batches."""
        c = Chain(self.log_dir, self.cfg)
        try:
            for _ in range(batches):
                c.append(c.pending_events() + [record(i) for i in range(self.written, self.written + size)])
                c.sync()
                c.after_commit()
                self.written += size
        finally:
            c.close()

    def prune(self, firsts: Collection[int] | None = None) -> dict[str, Any]:
        """``vllm-audit prune`` of the removable sealed segments starting at ``firsts`` (default: all)."""
        decisions = plan(self.config)
        assert decisions and all(d.prune for d in decisions), decisions
        chosen = [d for d in decisions if firsts is None or d.first_seq in firsts]
        assert chosen and (firsts is None or len(chosen) == len(firsts)), (firsts, decisions)
        return execute(self.config, chosen, reason="test")

    def pruned(self) -> list[PrunedRange]:
        return read_pruned(self.writer_dir)

    def segments(self) -> list[tuple[int, Path]]:
        return list_segments(self.writer_dir)

    def verify(self) -> Report:
        return verify_log(self.log_dir, load_public_keys([self.tmp / "k.pub"]))

    def event_locations(self, prune_id: str) -> list[str]:
        """The local segment files that hold the ``retention.pruned`` event of ``prune_id``."""
        out = []
        for _f, path in self.segments():
            for line in path.read_bytes().splitlines():
                ev = orjson.loads(line)
                if ev.get("event") == "retention.pruned" and ev["detail"]["prune_id"] == prune_id:
                    out.append(path.name)
        return out


def prunable_log(tmp: Path, batches: int = 6) -> PrunableLog:
    """A closed writer with several sealed segments of ~8 KB (10 records per batch)."""
    write_keypair(tmp / "k", "ops/k")
    config = load_config(
        None,
        {
            "log": {"dir": str(tmp / "log")},
            "integrity": {"signing_key": str(tmp / "k.key"), "segment_max_bytes": 8000},
            "retention": {"days": 0, "require_archive": False},
        },
    )
    log = PrunableLog(tmp, config, IntegrityConfig(signing_key=str(tmp / "k.key"), segment_max_bytes=8000))
    log.write(batches)
    return log
