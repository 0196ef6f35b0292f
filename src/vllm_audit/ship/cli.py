"""``vllm-audit ship``: run the projections beside a server (or report their status)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

import orjson

from vllm_audit.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ship",
        help="run the query store, quota charging and every [sinks.*] from the log (beside vLLM)",
        description=(
            "Read the local log and drive every projection from its cursor: the query store, quota "
            "charging and each [sinks.NAME]. Runs until SIGTERM/SIGINT. With several processes on one "
            "log directory, each projection runs in exactly one of them (the others stand by)."
        ),
    )
    p.add_argument("--config", help="TOML configuration file (default: VLLM_AUDIT_CONFIG)")
    p.add_argument("--status", action="store_true", help="print each projection's status and exit")
    p.add_argument("--json", action="store_true", help="with --status: machine-readable output")
    p.add_argument("--once", action="store_true", help="ship what is there now, then exit (0 when caught up)")
    p.add_argument("--timeout", type=float, default=300.0, help="with --once: give up after this many seconds")
    p.set_defaults(func=_ship)


def _load(path: str | None) -> Any:
    from vllm_audit.config import config_from_env, load_config

    return load_config(path) if path else config_from_env()


def _ship(args: argparse.Namespace) -> int:
    from vllm_audit._gc import tune_gc_for_serving
    from vllm_audit.ship.build import build_runner
    from vllm_audit.ship.config import state_dir

    config = _load(args.config)
    sdir = state_dir(config.ship, config.log.dir)
    if args.status:
        return _status(sdir, config, args.json)
    runner = build_runner(config)
    if runner is None:
        raise ConfigError("nothing to ship: no [sinks.*] tables and no query store or quota configured.")
    if args.once:
        ok = runner.run_until_caught_up(args.timeout)
        for st in runner.statuses.values():
            print(f"{st.name}: delivered {st.delivered}, quarantined {st.quarantined}, lag {st.lag_records}")
        return 0 if ok else 1
    tune_gc_for_serving()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    runner.start()
    names = ", ".join(p.name for p in runner.projections)
    print(f"vllm-audit ship: {names} from {config.log.dir}", file=sys.stderr, flush=True)
    done.wait()
    runner.stop()
    return 0


def _status(sdir: Any, config: Any, as_json: bool) -> int:
    from vllm_audit.ship.build import build_projections

    rows = []
    for p in build_projections(config):
        path = sdir / f"{p.name}.status.json"
        try:
            st = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            st = {"name": p.name, "kind": p.kind, "state": "never run"}
        rows.append(st)
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    now = time.time()
    print(
        f"{'sink':<20} {'kind':<14} {'state':<10} {'delivered':>10} {'lag':>8} {'lag s':>7} {'retried':>8} "
        f"{'quar.':>6}  last error"
    )
    for st in rows:
        age = now - float(st.get("updated_at", now))
        state = str(st.get("state", "?")) + ("?" if age > 30 else "")
        print(
            f"{st.get('name', ''):<20} {st.get('kind', ''):<14} {state:<10} {st.get('delivered', 0):>10} "
            f"{st.get('lag_records', 0):>8} {st.get('lag_seconds', 0):>7} {st.get('retried', 0):>8} "
            f"{st.get('quarantined', 0):>6}  {st.get('last_error', '')}"
        )
    return 0
