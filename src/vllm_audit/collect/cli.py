"""``vllm-audit collect``: run the collector, or report what the central store holds per writer."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson


def register(sub: Any) -> None:
    p = sub.add_parser(
        "collect",
        help="consume every replica's shipped entries (NATS JetStream / Kafka), verify, store centrally",
        description=(
            "Consume the entries every replica ships ([collect] source), verify each writer's chain as "
            "it arrives (links, signed checkpoints against the Merkle tree), store the records in the "
            "PostgreSQL query store of [access.store], copy the lines into [collect] archive_dir, and "
            "raise an alert record on a gap, a fork or a bad signature. Run several for availability."
        ),
    )
    p.add_argument("--config", help="TOML configuration file (default: VLLM_AUDIT_CONFIG)")
    p.add_argument("--report", action="store_true", help="print per writer what the central store holds, exit")
    p.add_argument("--json", action="store_true", help="with --report: machine-readable output")
    p.add_argument(
        "--status-file", metavar="FILE", help="write the collector's counters here every [collect] status_interval_s"
    )
    p.set_defaults(func=_collect)


def _collect(args: argparse.Namespace) -> int:
    from vllm_audit.config import config_from_env, load_config

    config = load_config(args.config) if args.config else config_from_env()
    if args.report:
        return _report(config, args.json)
    from vllm_audit._gc import tune_gc_for_serving
    from vllm_audit.collect.collector import Collector

    collector = Collector(config)
    tune_gc_for_serving()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"vllm-audit collect: from {config.collect.source} into {config.access.store.table_prefix}", file=sys.stderr)
    try:
        collector.run(done.is_set, status_path=Path(args.status_file) if args.status_file else None)
    finally:
        collector.close()
    return 0


def _report(config: Any, as_json: bool) -> int:
    from vllm_audit.collect.collector import report
    from vllm_audit.collect.store import CentralStore

    store = CentralStore(config.access.store)
    try:
        rows = report(store)
    finally:
        store.close()
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    for r in rows:
        state = "broken: " + r["broken"] if r["broken"] else ("stopped" if r["stopped"] else "open")
        print(
            f"{r['writer_id']}: stored through seq {r['stored_through']} (signed {r['signed_size']} "
            f"at {r['signed_at'] or '-'}), {state}"
        )
        for a, b in r["gaps"]:
            print(f"  gap: entries {a}..{b} never arrived")
        if r["waiting_for"]:
            a, b = r["waiting_for"]
            print(f"  waiting for entries {a}..{b} (later ones arrived)")
        if r["missing_if_gone"]:
            m = r["missing_if_gone"]
            print(
                f"  if this writer is gone: ({m['writer_id']}, {m['from_seq']}..) is missing centrally "
                f"(from seq {m['from_seq']} on, end unknown: entries written after {m['after_time'] or '-'})"
            )
    return 0
