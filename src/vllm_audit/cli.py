"""The ``vllm-audit`` command. Errors become one line on stderr and an exit code.

Exit codes: 0 success, 1 a check failed (e.g. verification), 2 usage or configuration error.
Area packages add their sub-commands through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "vllm_audit.collect.cli",
    "vllm_audit.archive.cli",
    "vllm_audit.export.cli",
    "vllm_audit.console.cli",
    "vllm_audit.detect.cli",
)
#: Which area module defines each sub-command, so one command imports only its own area (a
#: ``verify`` does not load the HTTP, JWT and redaction stacks). A test keeps it complete.
COMMAND_AREAS = {
    "keygen": "vllm_audit.integrity.cli",
    "verify": "vllm_audit.integrity.cli",
    "prove": "vllm_audit.integrity.cli",
    "verify-proof": "vllm_audit.integrity.cli",
    "prove-consistency": "vllm_audit.integrity.cli",
    "verify-consistency": "vllm_audit.integrity.cli",
    "privacy-keygen": "vllm_audit.privacy.cli",
    "erase": "vllm_audit.privacy.cli",
    "decrypt": "vllm_audit.privacy.cli",
    "redact": "vllm_audit.privacy.cli",
    "keys": "vllm_audit.access.cli",
    "index": "vllm_audit.access.cli",
    "ship": "vllm_audit.ship.cli",
    "collect": "vllm_audit.collect.cli",
    "prune": "vllm_audit.archive.cli",
    "hold": "vllm_audit.archive.cli",
    "archive": "vllm_audit.archive.cli",
    "export": "vllm_audit.export.cli",
    "verify-bundle": "vllm_audit.export.cli",
    "console": "vllm_audit.console.cli",
    "alerts": "vllm_audit.detect.cli",
    "rules": "vllm_audit.detect.cli",
}


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


class _Version(argparse.Action):
    """``--version``: the version and whether the record path's hot modules run compiled (imported
    only when asked: every other command starts without loading the recognizers)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        from vllm_audit import native

        print(f"vllm-audit {__version__} ({native.summary()})")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``command`` given) one with only that command's area loaded."""
    parser = argparse.ArgumentParser(prog="vllm-audit", description="Tamper-evident audit records for LLM servers.")
    parser.add_argument("--version", action=_Version, help="print the version and whether the hot modules run compiled")
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

    area = COMMAND_AREAS.get(command or "")
    if command in ("serve", "schema"):
        areas: tuple[str, ...] = ()  # defined here: no area needed
    else:
        areas = (area,) if area else _AREA_COMMANDS
    for name in areas:
        importlib.import_module(name).register(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
        if arg in ("-h", "--help", "--version"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(args_list))
    args = parser.parse_args(args_list)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except AuditError as exc:
        print(f"vllm-audit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``vllm-audit verify ... | head``): stop quietly, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
