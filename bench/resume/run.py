"""Resume benchmark: what a writer's start-up costs on a long chain, before and after ``prune``.

One command: ``.venv/bin/python bench/resume/run.py [--records N] [--segment-mb M] [--reps R]``.
Writes N ~1 KB records through the real Chain (segments of M MB), then times ``Chain(...)`` taking
the chain over (the resume only: its files are released without appending) in three layouts: no
prune; pruned with one sealed segment left (state from the pruned range, checked against that
segment's manifest and the signed roots after it); pruned to the open tail alone (checked against
the signed roots). Prune is the real ``vllm-audit prune`` (retention 0 days, no archive required).
Prints JSON per layout: median wall and CPU milliseconds of R resumes, and the seq it resumed at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integrity._logtools import record

from vllm_audit.archive.prune import execute, plan
from vllm_audit.config import Config, load_config
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair


def _build(tmp: Path, records: int, segment_bytes: int) -> tuple[Config, IntegrityConfig]:
    write_keypair(tmp / "k", "ops/bench")
    integrity = {"signing_key": str(tmp / "k.key"), "segment_max_bytes": segment_bytes}
    config = load_config(
        None,
        {"log": {"dir": str(tmp / "log")}, "integrity": integrity, "retention": {"days": 0, "require_archive": False}},
    )
    cfg = IntegrityConfig(signing_key=str(tmp / "k.key"), segment_max_bytes=segment_bytes)
    c = Chain(tmp / "log", cfg)
    for k in range(0, records, 500):
        c.append([*c.pending_events(), *(record(i) for i in range(k, min(k + 500, records)))])
        c.sync()
        c.after_commit()
    c.close()
    return config, cfg


def _resume(log_dir: Path, cfg: IntegrityConfig, reps: int) -> dict[str, float]:
    wall, cpu = [], []
    seq = 0
    for _ in range(reps):
        t0, p0 = time.perf_counter(), time.process_time()
        c = Chain(log_dir, cfg)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - p0)
        seq = c.next_seq
        for attr in ("_fd", "_cp_fd", "_lock_fd", "_durable_fd"):  # release without appending
            fd = getattr(c, attr)
            if fd >= 0:
                os.close(fd)
                setattr(c, attr, -1)
    return {"wall_ms": statistics.median(wall) * 1000, "cpu_ms": statistics.median(cpu) * 1000, "next_seq": seq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--segment-mb", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    out = {}
    for label, keep in (("no_prune", None), ("pruned_sealed_segment_left", 1), ("pruned_open_tail_only", 0)):
        with tempfile.TemporaryDirectory(prefix="bench-resume-") as d:
            tmp = Path(d)
            config, cfg = _build(tmp, args.records, int(args.segment_mb * 1_000_000))
            if keep is not None:
                decisions = plan(config)
                execute(config, decisions[: len(decisions) - keep], reason="bench")
            out[label] = _resume(tmp / "log", cfg, args.reps)
    print(json.dumps({"records": args.records, "segment_mb": args.segment_mb, **out}, indent=1))


if __name__ == "__main__":
    main()
