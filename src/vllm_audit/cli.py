"""The ``vllm-audit`` command. Errors become one line on stderr and an exit code.

Exit codes: 0 success, 1 a check failed (e.g. verification), 2 usage or configuration error.
Area packages add their sub-commands through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from vllm_audit import __version__
from vllm_audit.errors import AuditError

_AREA_COMMANDS = (
    "vllm_audit.integrity.cli",
    "vllm_audit.privacy.cli",
    "vllm_audit.access.cli",
    "vllm_audit.ship.cli",
)


def _serve(args: argparse.Namespace) -> int:
    from vllm_audit.gateway import run

    gateway: dict[str, Any] = {}
    if args.upstream is not None:
        gateway["upstream"] = args.upstream
    if args.host is not None:
        gateway["host"] = args.host
    if args.port is not None:
        gateway["port"] = args.port
    if args.workers is not None:
        gateway["workers"] = args.workers
    overrides: dict[str, Any] = {"gateway": gateway} if gateway else {}
    if args.log_dir is not None:
        overrides["log"] = {"dir": args.log_dir}
    run(args.config, overrides)
    return 0


def _schema(args: argparse.Namespace) -> int:
    import json

    from vllm_audit.record import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-audit", description="Tamper-evident audit records for LLM servers.")
    parser.add_argument("--version", action="version", version=f"vllm-audit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser("serve", help="run the audited gateway (demo engine when no --upstream)")
    serve.add_argument("--upstream", help="URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8011")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes, each with its own chain (default 1)")
    serve.add_argument("--log-dir", help="audit log directory (overrides [log] dir)")
    serve.set_defaults(func=_serve)

    schema = sub.add_parser("schema", help="print the published JSON Schema of an audit record")
    schema.set_defaults(func=_schema)

    for name in _AREA_COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except AuditError as exc:
        print(f"vllm-audit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
