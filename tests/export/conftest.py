"""A real multi-tenant log written through the real Chain, with real signed checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def next_instant(after: str) -> str:
    """The current time once the millisecond clock has moved past ``after`` (a poll, not a sleep)."""
    deadline = time.monotonic() + 5
    while (t := now_iso()) <= after:
        assert time.monotonic() < deadline
    return t


def rec(i: int, org: str, **extra: Any) -> dict[str, Any]:
    return {
        "record_type": "inference",
        "schema_version": 1,
        "timestamp": now_iso(),
        "request_id": f"req-{org}-{i:06d}",
        "user_id": f"user-{i % 3}",
        "org_id": org,
        "model_name": "demo-model" if i % 2 else "other-model",
        "status": "ok" if i % 5 else "upstream_error",
        "input_prompt": f"ticket {i} for <EMAIL_ADDRESS>",
        "output_response": "done " * 10,
        **extra,
    }


@dataclasses.dataclass
class TenantLog:
    log_dir: Path
    pub: Path
    key: Path
    #: (from, to) of the exported range: records of phase 2 only.
    t_from: str = ""
    t_to: str = ""
    acme_in_range: int = 0


def write_phases(log: TenantLog, phases: list[list[dict[str, Any]]], **cfg: Any) -> None:
    """Write each phase as batches, sign a checkpoint after each phase; phase 1 is the exported range."""
    config = IntegrityConfig(
        signing_key=str(log.key),
        **{"segment_max_bytes": 20_000, "checkpoint_every_records": 1_000_000, "checkpoint_every_seconds": 3600, **cfg},
    )
    chain = Chain(log.log_dir, config)
    last_cp = ""
    for n, phase in enumerate(phases):
        if n == 1:
            log.t_from = next_instant(last_cp)
        for k in range(0, len(phase), 25):
            batch = [dict(r, timestamp=now_iso()) for r in phase[k : k + 25]]
            chain.append([*chain.pending_events(), *batch])
            chain.sync()
            chain.after_commit()
        if n == 1:
            log.t_to = next_instant(now_iso())
            log.acme_in_range = sum(1 for r in phase if r["org_id"] == "acme")
        last_cp = next_instant(now_iso())
        chain.checkpoint()
    chain.close()


@pytest.fixture
def tenant_log(tmp_path: Path) -> TenantLog:
    """Three phases of acme and globex records; the export range is phase 2."""
    key = write_keypair(tmp_path / "ops", "vllm-audit/ops-test")
    log = TenantLog(tmp_path / "log", tmp_path / "ops.pub", tmp_path / "ops.key")
    assert key.verifier.name == "vllm-audit/ops-test"
    phases = [
        [rec(i, "acme" if i % 3 else "globex") for i in range(60)],
        [rec(i, "acme" if i % 3 else "globex") for i in range(60, 150)],
        [rec(i, "acme" if i % 3 else "globex") for i in range(150, 200)],
    ]
    write_phases(log, phases)
    return log
