"""Verifier throughput and chaining cost, on a log written by the real ``Chain``.

    .venv/bin/python bench/verify/run.py [--records 300000] [--record-bytes 1000] [--dir DIR [--reuse]]

Writes ~1 KB inference records in batches of 256 (one fdatasync each, like the writer thread),
then times ``vllm-audit verify`` (in-process ``verify_log``) over the whole log and reports
records/s, MB/s and CPU seconds of all processes (parent user+sys plus the verifier worker
processes' from ``os.times()``, which counts children once they are reaped) per record, split
into parent and workers. ``--dir DIR --reuse`` verifies the log a previous ``--dir DIR`` run left
(same records) without writing it again. It also times ``Chain.append`` alone per record (serialise + chain + Merkle),
and the same serialisation without chain/Merkle, so the integrity cost per record is visible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import orjson

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.verify import tune_malloc, verify_log


def make_record(i: int, size: int) -> dict[str, object]:
    rec: dict[str, object] = {
        "record_type": "inference",
        "schema_version": 1,
        "timestamp": "2026-07-01T12:00:00.123Z",
        "request_id": f"0197b5a4-7c3e-7000-8000-{i:012x}",
        "client_ip": "203.0.113.7",
        "user_id": "u-42",
        "org_id": "acme",
        "auth_status": "authenticated",
        "model_name": "demo-model",
        "route": "/v1/chat/completions",
        "prompt_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "prompt_tokens": 120,
        "completion_tokens": 240,
        "total_tokens": 360,
        "latency_ms": 812.5,
        "status": {"http": 200, "outcome": "ok"},
        "finish_reason": "stop",
    }
    base = len(orjson.dumps(rec)) + 195  # + chain header (seq, prev, writer_id, org_tag)
    pad = max(0, size - base)
    rec["input_prompt"] = ("lorem ipsum " * (pad // 24 + 1))[: pad // 2]
    rec["output_response"] = ("dolor sit amet " * (pad // 30 + 1))[: pad - pad // 2]
    return rec


def write_log(log_dir: Path, key: Path, records: list[dict[str, object]], total: int, batch: int) -> dict[str, float]:
    """Write ``total`` records with the real Chain; CPU cost of append vs serialisation alone."""
    write_keypair(key, "bench/key")
    cfg = IntegrityConfig(signing_key=f"{key}.key")
    chain = Chain(log_dir, cfg)
    append_s = 0.0
    t0 = time.perf_counter()
    written = 0
    while written < total:
        n = min(batch, total - written)
        chunk = chain.pending_events() + records[:n]
        t = time.process_time()
        chain.append(chunk)
        append_s += time.process_time() - t
        chain.sync()
        chain.after_commit()
        written += n
    chain.close()
    write_s = time.perf_counter() - t0

    # serialisation alone (what any JSON-lines writer pays) vs append (chain + Merkle + write)
    # (CPU time, so other load on the machine does not inflate it; includes os.write for append)
    fd = os.open(log_dir.parent / "plain.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t = time.process_time()
    for _ in range(20):
        buf = bytearray()
        for r in records:
            buf += orjson.dumps(r)
            buf += b"\n"
        os.write(fd, buf)
    ser_us = (time.process_time() - t) / (20 * len(records)) * 1e6
    os.close(fd)
    append_us = append_s / total * 1e6
    return {
        "write_total_s": round(write_s, 2),
        "append_cpu_us_per_record": round(append_us, 2),
        "serialize_write_only_cpu_us_per_record": round(ser_us, 2),
        "integrity_cpu_us_per_record": round(append_us - ser_us, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--record-bytes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default="")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="with --dir: verify the log already there, do not write one")
    ap.add_argument("--runs", type=int, default=3, help="verify runs (the fastest is reported)")
    ap.add_argument("--workers", type=int, default=None, help="verifier processes (default: one per CPU)")
    args = ap.parse_args()
    if args.reuse and not args.dir:
        ap.error("--reuse needs --dir (the directory of an earlier run)")
    base = Path(args.dir or tempfile.mkdtemp(prefix="vllm-audit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    log_dir = base / "log"
    key = base / "bench"
    out: dict[str, object] = {}
    if args.reuse:
        if not (log_dir / "writers").is_dir() or not os.path.exists(f"{key}.pub"):
            ap.error(f"--reuse: no log and key of an earlier run under {str(base)!r}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
        for p in (f"{key}.key", f"{key}.pub"):
            if os.path.exists(p):
                os.unlink(p)
        records = [make_record(i, args.record_bytes) for i in range(args.batch)]
        out.update(write_log(log_dir, key, records, args.records, args.batch))
    size = sum(p.stat().st_size for p in log_dir.rglob("seg-*.jsonl"))

    keys = load_public_keys([f"{key}.pub"])
    tune_malloc()  # as `vllm-audit verify` does
    best = float("inf")
    cpu = parent_cpu = 0.0
    report = None
    for _ in range(args.runs):
        t = time.perf_counter()
        c0 = os.times()
        report = verify_log(log_dir, keys, workers=args.workers)
        dt = time.perf_counter() - t
        c1 = os.times()  # the worker processes are reaped by verify_log: their CPU is in children_*
        if dt < best:
            best = dt
            parent_cpu = (c1.user + c1.system) - (c0.user + c0.system)
            cpu = parent_cpu + (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
    assert report is not None
    assert report.intact, [str(p) for p in report.problems]
    out.update(
        {
            "records": report.records,
            "entries": report.entries,
            "checkpoints": report.checkpoints,
            "log_mb": round(size / 1e6, 1),
            "avg_line_bytes": round(size / report.entries),
            "verify_s": round(best, 3),
            "verify_records_per_s": round(report.entries / best),
            "verify_mb_per_s": round(size / 1e6 / best, 1),
            "verify_cpu_us_per_record": round(cpu / report.entries * 1e6, 2),
            "verify_parent_cpu_us_per_record": round(parent_cpu / report.entries * 1e6, 2),
            "verify_cpu_bound_records_per_s_on_2_cores": round(2 * report.entries / cpu) if cpu else None,
            "verify_workers": args.workers or f"auto ({os.cpu_count()} CPUs)",
            "load_average": os.getloadavg(),
        }
    )
    print(json.dumps(out, indent=2))
    if not args.keep and not args.dir:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
