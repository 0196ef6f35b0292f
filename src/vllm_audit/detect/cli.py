"""``vllm-audit alerts list|show`` and ``vllm-audit rules test|sigma``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.errors import ConfigError


def register(sub: Any) -> None:
    alerts = sub.add_parser("alerts", help="list or show the alerts in a log")
    asub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION")
    asub.required = True
    lst = asub.add_parser("list", help="one line per alert: time, rule, severity, key, reason")
    lst.add_argument("--log-dir", required=True)
    lst.add_argument("--rule", help="only this rule id")
    lst.set_defaults(func=_alerts_list)
    show = asub.add_parser("show", help="one alert as JSON (with the records that triggered it)")
    show.add_argument("--log-dir", required=True)
    show.add_argument("alert_id")
    show.set_defaults(func=_alerts_show)

    rules = sub.add_parser("rules", help="test rules over an existing log offline, or export them as Sigma")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    test = rsub.add_parser("test", help="run a rules file over a log (in memory: no Redis, nothing written)")
    test.add_argument("file", nargs="?", help="rules file (default: the packaged rules)")
    test.add_argument("--log-dir", required=True)
    test.add_argument("--json", action="store_true", help="print the alerts as JSON lines")
    test.set_defaults(func=_rules_test)
    sig = rsub.add_parser("sigma", help="print the rules as Sigma YAML, or converted with --backend")
    sig.add_argument("file", nargs="?", help="rules file (default: the packaged rules)")
    sig.add_argument("--backend", choices=("lucene", "esql", "splunk", "loki"))
    sig.set_defaults(func=_rules_sigma)


def _log_alerts(log_dir: str) -> list[dict[str, Any]]:
    from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader

    if not (Path(log_dir) / "writers").is_dir():
        raise ConfigError(f"{log_dir!r} is not an audit log directory (no writers/).")
    reader = LogReader(log_dir, limit="all")
    out = []
    for wid in reader.writer_ids():
        cur = Cursor(wid)
        while True:
            try:
                batch = reader.read(cur, 5000)
            except ChainBreak as exc:
                print(f"vllm-audit: warning: {exc}", file=sys.stderr)
                break
            if not batch:
                break
            out += [e.record() for e in batch if e.record_type == "alert"]
            cur = cur.after(batch[-1])
    return sorted(out, key=lambda a: str(a.get("timestamp", "")))


def _alerts_list(args: argparse.Namespace) -> int:
    for a in _log_alerts(args.log_dir):
        rule = a.get("rule", {}).get("id", "?") if isinstance(a.get("rule"), dict) else "?"
        if args.rule and rule != args.rule:
            continue
        print(f"{a.get('timestamp', '')}  {a.get('alert_id', '')}  {rule}  {a.get('severity', '')}  "
              f"{a.get('group_by', '')}={a.get('group_value', '')}  {a.get('reason', '')}")
    return 0


def _alerts_show(args: argparse.Namespace) -> int:
    for a in _log_alerts(args.log_dir):
        if a.get("alert_id") == args.alert_id:
            print(orjson.dumps(a, option=orjson.OPT_INDENT_2).decode())
            return 0
    print(f"vllm-audit: no alert {args.alert_id} in {args.log_dir}", file=sys.stderr)
    return 1


def _rules_test(args: argparse.Namespace) -> int:
    import tempfile

    from vllm_audit.detect.projection import Detector
    from vllm_audit.detect.rules import load_rules
    from vllm_audit.detect.state import MemoryState
    from vllm_audit.ship.runner import Runner

    rules = load_rules(args.file)
    if not (Path(args.log_dir) / "writers").is_dir():
        raise ConfigError(f"{args.log_dir!r} is not an audit log directory (no writers/).")
    got: list[dict[str, Any]] = []
    state = MemoryState()
    det = Detector(rules, args.log_dir, state=lambda: state, emit=got.extend, instance="rules-test")
    with tempfile.TemporaryDirectory() as tmp:
        Runner(args.log_dir, Path(tmp), [det]).run_until_caught_up(3600)
    for a in got:
        if args.json:
            print(orjson.dumps(a).decode())
        else:
            print(f"{a['window_start']}  {a['rule']['id']}  {a['severity']}  {a['group_by']}={a['group_value']}  "
                  f"{a['reason']}")
    print(f"{det.records} records, {len(got)} alerts", file=sys.stderr)
    return 0


def _rules_sigma(args: argparse.Namespace) -> int:
    from vllm_audit.detect import sigma
    from vllm_audit.detect.rules import load_rules

    text = sigma.export_yaml(load_rules(args.file))
    if args.backend:
        try:
            queries = sigma.convert(text, args.backend)
        except ImportError:
            raise ConfigError("converting needs the 'sigma' extra: pip install 'vllm-audit[sigma]'") from None
        print("\n".join(queries))
    else:
        print(text, end="")
    return 0
