"""``vllm-audit keys add|list|revoke`` and ``vllm-audit index [--rebuild]`` (drives the query-store projection).

Key changes are audit events: after the key file is updated, a ``key_added`` / ``key_revoked``
event is appended durably to the log (``vllm_audit.writer.append_events``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import socket
import sys
from typing import Any

from vllm_audit.access.apikeys import KeyStore, utcnow
from vllm_audit.access.auth import resolve_path
from vllm_audit.config import Config, config_from_env, load_config
from vllm_audit.errors import AuditError, ConfigError


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys (stored as hashes)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    ksub.required = True

    add = ksub.add_parser("add", help="issue a key (printed once)")
    _config_arg(add)
    add.add_argument("--user", required=True, help="user id")
    add.add_argument("--org", required=True, help="org (tenant) id")
    add.add_argument("--role", action="append", default=[], help="role (repeatable): user, org_auditor, ...")
    add.add_argument("--expires-days", type=float, help="days until the key expires (default: never)")
    add.add_argument("--description", default="", help="free text")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=_keys_add)

    ls = ksub.add_parser("list", help="list keys (never their secrets)")
    _config_arg(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_keys_list)

    rv = ksub.add_parser("revoke", help="revoke a key (takes effect at once on running gateways)")
    _config_arg(rv)
    rv.add_argument("key_id", help="the key id (12 hex digits)")
    rv.set_defaults(func=_keys_revoke)

    idx = subparsers.add_parser("index", help="bring the audit query store up to date from the log")
    _config_arg(idx)
    idx.add_argument(
        "--rebuild", action="store_true", help="empty the store and its cursors, then project the whole log again"
    )
    idx.set_defaults(func=_index)


def _config_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: never overwrite a --config given to a parent parser.
    p.add_argument("--config", default=argparse.SUPPRESS, help="TOML configuration file")


def _config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None)
    return load_config(path) if path else config_from_env()


def _store(config: Config) -> KeyStore:
    if not config.access.api_keys.file:
        raise ConfigError("[access.api_keys] file is not set in the configuration.")
    return KeyStore(resolve_path(config, config.access.api_keys.file))


def _fail(msg: str) -> int:
    print(f"vllm-audit: error: {msg}", file=sys.stderr)
    return 2


def _actor() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"via": "cli", "os_user": user, "host": socket.gethostname()}


def _record(config: Config, event: dict[str, Any]) -> None:
    from vllm_audit.writer import append_events

    append_events(config, [{"record_type": "event", **event}])


def _keys_add(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _store(config)
    if args.expires_days is not None and not 0 < args.expires_days <= 36500:
        return _fail("--expires-days must be in (0, 36500].")
    expires = utcnow() + dt.timedelta(days=args.expires_days) if args.expires_days is not None else None
    try:
        key, entry = store.add(args.user, args.org, tuple(args.role), expires, args.description)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        _record(config, {"event": "key_added", "actor": _actor(), "key": entry.public()})
    except (AuditError, OSError) as exc:
        return _fail(f"key {entry.key_id} issued but the audit event could not be written: {exc}")
    if args.json:
        print(json.dumps({"key": key, **entry.public()}))
    else:
        print(key)
        print(f"key_id {entry.key_id}  user {entry.user_id}  org {entry.org_id}  roles {','.join(entry.roles) or '-'}")
        print("Store the key now: only its hash is kept.", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    keys = _store(_config(args)).keys()
    if args.json:
        print(json.dumps([k.public() for k in keys]))
        return 0
    print(f"{'KEY_ID':12}  {'STATUS':8}  {'ORG':16}  {'USER':16}  {'ROLES':24}  EXPIRES")
    for k in keys:
        roles = ",".join(k.roles) or "-"
        print(f"{k.key_id:12}  {k.status():8}  {k.org_id:16}  {k.user_id:16}  {roles:24}  {k.expires or '-'}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    config = _config(args)
    store = _store(config)
    try:
        entry = store.revoke(args.key_id)
    except KeyError:
        return _fail(f"no key with id {args.key_id!r}.")
    try:
        _record(config, {"event": "key_revoked", "actor": _actor(), "key": entry.public()})
    except (AuditError, OSError) as exc:
        return _fail(f"key {entry.key_id} revoked but the audit event could not be written: {exc}")
    print(f"revoked {entry.key_id} ({entry.user_id}@{entry.org_id})")
    return 0


def _index(args: argparse.Namespace) -> int:
    """Drive the query-store projection until it has caught up with the log's signed entries."""
    from vllm_audit.access.projection import QueryStoreProjection
    from vllm_audit.access.store import open_store
    from vllm_audit.ship.base import ProcessLock
    from vllm_audit.ship.config import state_dir
    from vllm_audit.ship.runner import Runner

    config = _config(args)
    proj = QueryStoreProjection(open_store(config), batch_max=config.ship.batch_max)
    states = state_dir(config.ship, config.log.dir)
    runner = Runner(config.log.dir, states, [proj], config.ship)
    lock = ProcessLock(states / f"{proj.name}.lock")
    try:
        if not lock.try_acquire():
            return _fail(
                "another process (a gateway or `vllm-audit ship`) runs the query-store projection on this log; "
                "it keeps the store up to date (stop it first to rebuild)."
            )
        try:
            if args.rebuild:
                proj.reset()
        finally:
            lock.release()
        status = runner.statuses[proj.name]
        while not runner.run_until_caught_up(timeout=60.0):
            if status.broken:
                break
            if status.last_error:
                return _fail(f"cannot update the query store: {status.last_error}")
    except (OSError, ImportError) as exc:
        return _fail(f"cannot update the query store: {exc}")
    except Exception as exc:  # database errors (sqlite3 / psycopg) become one line
        return _fail(f"cannot update the query store: {type(exc).__name__}: {exc}")
    for wid, why in sorted(status.broken.items()):
        print(f"vllm-audit: warning: writer {wid} not indexed past a chain break: {why}", file=sys.stderr)
    print(f"{'rebuilt' if args.rebuild else 'updated'} the query store: {status.delivered} log entries read")
    return 1 if status.broken else 0
