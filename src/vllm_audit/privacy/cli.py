"""``vllm-audit privacy-keygen | erase | decrypt | redact``.

Erasure and every decryption are recorded as audit events in the log (``writer.append_events``).
Errors print one line to stderr and return 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm_audit.config import Config, config_from_env, load_config
from vllm_audit.errors import AuditError
from vllm_audit.privacy.keystore import FileKeyStore, KeyErasedError, KeyNotFoundError, generate_master_key
from vllm_audit.privacy.redactor import build_keystore, decrypt_field, redact_text, resolve_path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the privacy sub-commands to the ``vllm-audit`` parser."""
    p = subparsers.add_parser("privacy-keygen", help="create the privacy master key file (mode 0600)")
    p.add_argument("--config", help="TOML configuration file (uses [privacy] key_file)")
    p.add_argument("--key-file", help="where to write the key (overrides the config)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file (destroys all content!)")
    p.set_defaults(func=_keygen)

    p = subparsers.add_parser("erase", help="crypto-shred a tenant's (or one user's) data keys")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--org", required=True, help="tenant (org_id) whose keys are destroyed")
    p.add_argument("--user", help="only this user's keys (needs key_scope = \"user\")")
    p.add_argument("--reason", default="", help="why (recorded in the audit event)")
    p.add_argument("--log-dir", help="audit log directory (overrides [log] dir)")
    p.set_defaults(func=_erase)

    p = subparsers.add_parser("decrypt", help="decrypt an encrypted field of one record (audited)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--log-dir", help="audit log directory (overrides [log] dir)")
    p.add_argument("--request-id", required=True, help="request_id of the record")
    p.add_argument("--field", default="input_prompt", help="field to decrypt (default input_prompt)")
    p.add_argument("--auditor", help="who decrypts (recorded; default: the OS user)")
    p.set_defaults(func=_decrypt)

    p = subparsers.add_parser("redact", help="redact stdin to stdout with the default tag policy")
    p.set_defaults(func=_redact)


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if getattr(args, "config", None) else config_from_env()
    log_dir = getattr(args, "log_dir", None)
    if log_dir:
        config = config.replace(log=_replace(config.log, dir=log_dir))
    return config


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _fail(message: str) -> int:
    print(f"vllm-audit: error: {message}", file=sys.stderr)
    return 2


def _keystore(config: Config) -> FileKeyStore:
    store = build_keystore(config)
    if store is None:
        raise AuditError("no [privacy] key_file is configured (pass --config).")
    return store


def _keygen(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        path = args.key_file or (str(resolve_path(config, config.privacy.key_file)) if config.privacy.key_file else "")
        if not path:
            return _fail("give --key-file or a config with [privacy] key_file.")
        kid = generate_master_key(path, overwrite=args.force)
    except AuditError as exc:
        return _fail(str(exc))
    print(f"wrote master key {kid} to {path} (mode 0600)")
    return 0


def _append(config: Config, event: dict[str, Any]) -> None:
    from vllm_audit.writer import append_events

    append_events(config, [event])


def _erase(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        store = _keystore(config)
        tombs = store.erase(args.org, args.user)
    except AuditError as exc:
        return _fail(str(exc))
    event = {
        "record_type": "event",
        "event": "privacy.erase",
        "org_id": args.org,
        "detail": {
            "org_id": args.org,
            "user_id": args.user,
            "kids": [t.kid for t in tombs],
            "reason": args.reason,
            "operator": getpass.getuser(),
        },
    }
    try:
        _append(config, event)
    except (AuditError, OSError) as exc:
        return _fail(f"keys were erased ({len(tombs)}) but the erasure event could not be logged: {exc}")
    print(f"erased {len(tombs)} key(s) of org {args.org!r}" + (f" user {args.user!r}" if args.user else ""))
    return 0


def _records(log_dir: Path) -> Iterator[dict[str, Any]]:
    """Every inference record of every writer, read (and link-checked) through the one reader."""
    from vllm_audit.integrity.reader import ChainBreak, LogReader

    reader = LogReader(log_dir, limit="all")
    for wid in reader.writer_ids():
        try:
            for entry in reader.entries_all(wid):
                if entry.record_type == "inference":
                    yield entry.record()
        except ChainBreak:
            continue  # the records before the break were searched; `vllm-audit verify` says why


def find_record(log_dir: str | os.PathLike[str], request_id: str) -> dict[str, Any] | None:
    """The inference record with this request id in a log directory, or None."""
    for entry in _records(Path(log_dir)):
        if entry.get("request_id") == request_id and entry.get("record_type", "inference") == "inference":
            return entry
    return None


def _decrypt(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        store = _keystore(config)
    except AuditError as exc:
        return _fail(str(exc))
    record = find_record(config.log.dir, args.request_id)
    if record is None:
        return _fail(f"no record with request_id {args.request_id!r} in {config.log.dir!r}.")
    env = record.get(f"{args.field}_enc")
    outcome, text = "ok", ""
    try:
        text = decrypt_field(record, args.field, store)
    except KeyErasedError:
        outcome = "erased"
    except KeyNotFoundError:
        outcome = "key_not_found"
    except LookupError:
        return _fail(f"record {args.request_id!r} has no encrypted field {args.field!r}.")
    except Exception as exc:  # InvalidTag, malformed envelope
        outcome = f"failed:{type(exc).__name__}"
    event = {
        "record_type": "event",
        "event": "privacy.decrypt",
        "org_id": record.get("org_id"),
        "detail": {
            "request_id": args.request_id,
            "field": args.field,
            "kid": env.get("kid") if isinstance(env, dict) else None,
            "auditor": args.auditor or getpass.getuser(),
            "outcome": outcome,
        },
    }
    try:
        _append(config, event)
    except (AuditError, OSError) as exc:
        return _fail(f"refusing to show plaintext: the decryption could not be logged: {exc}")
    if outcome != "ok":
        return _fail(f"cannot decrypt {args.field!r} of {args.request_id!r}: {outcome}.")
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    return 0


def _redact(args: argparse.Namespace) -> int:
    sys.stdout.write(redact_text(sys.stdin.read()))
    return 0
