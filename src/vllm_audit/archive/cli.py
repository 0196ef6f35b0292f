"""``vllm-audit prune | hold add|list|release | archive``.

Every prune and every hold change is appended to the chain as a signed event first. Errors print
one line on stderr and return 2; a dry run prints what would go and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys
from typing import Any

import orjson

from vllm_audit.config import Config, config_from_env, load_config
from vllm_audit.errors import AuditError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("prune", help="remove local segments past retention, archived and not held (audited)")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and why, change nothing")
    p.add_argument("--reason", default="scheduled retention", help="why (recorded in the audit event)")
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")
    p.set_defaults(func=_prune)

    p = subparsers.add_parser("hold", help="legal holds: add, list, release (each change is audited)")
    sub = p.add_subparsers(dest="hold_command", metavar="ACTION")
    sub.required = True
    a = sub.add_parser("add", help="place a hold by tenant, user, request id and/or time range")
    _common(a)
    a.add_argument("--org", default="", help="tenant (org_id)")
    a.add_argument("--user", default="", help="user_id")
    a.add_argument("--request-id", default="", help="request_id")
    a.add_argument("--from", dest="time_from", default="", help="records at or after this UTC time (ISO 8601)")
    a.add_argument("--to", dest="time_to", default="", help="records before this UTC time (ISO 8601)")
    a.add_argument("--reason", required=True, help="why (e.g. the case number; recorded)")
    a.add_argument("--by", default="", help="who places it (default: the OS user)")
    a.set_defaults(func=_hold_add)
    ls = sub.add_parser("list", help="list holds")
    _common(ls)
    ls.add_argument("--all", action="store_true", help="include released holds")
    ls.add_argument(
        "--repair", action="store_true", help="rewrite the holds file from the audit chain's hold events first"
    )
    ls.set_defaults(func=_hold_list)
    r = sub.add_parser("release", help="release a hold")
    _common(r)
    r.add_argument("hold_id")
    r.add_argument("--reason", required=True, help="why (recorded)")
    r.add_argument("--by", default="", help="who releases it (default: the OS user)")
    r.set_defaults(func=_hold_release)

    p = subparsers.add_parser("archive", help="upload sealed segments to the WORM archive now, or show it")
    _common(p)
    p.add_argument("--status", action="store_true", help="list what the archive index holds")
    p.set_defaults(func=_archive)
    sub = p.add_subparsers(dest="archive_command", metavar="ACTION")
    r = sub.add_parser("restore", help="restore archived segments into a log directory (each object verified)")
    _common(r)
    r.add_argument("--writer", required=True, help="writer id")
    r.add_argument("--from-seq", type=int, required=True, help="first entry wanted")
    r.add_argument("--to-seq", type=int, default=None, help="entries before this one (default: all sealed)")
    r.add_argument("--into", required=True, help="directory to lay the log out in (must be empty or new)")
    r.add_argument("--public-key", action="append", default=[], help="also verify checkpoint signatures (.pub)")
    r.set_defaults(func=_archive_restore)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--log-dir", help="audit log directory (overrides [log] dir)")


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else config_from_env()
    if args.log_dir:
        config = config.replace(log=dataclasses.replace(config.log, dir=args.log_dir))
    return config


def _fail(message: str) -> int:
    print(f"vllm-audit: error: {message}", file=sys.stderr)
    return 2


def _prune(args: argparse.Namespace) -> int:
    from vllm_audit.archive.holds import HoldMismatch
    from vllm_audit.archive.prune import execute, plan, ranges

    try:
        config = _config(args)
        decisions = plan(config)
    except HoldMismatch as exc:
        return _fail(f"prune refused, nothing was removed: {exc}")
    except (AuditError, OSError, ValueError) as exc:
        return _fail(str(exc))
    if args.json and args.dry_run:
        print(orjson.dumps([d.to_json() for d in decisions], option=orjson.OPT_INDENT_2).decode())
        return 0
    for d in decisions:
        print(
            f"{'PRUNE' if d.prune else 'keep '} {d.writer_id}/{d.segment} entries {d.first_seq}..{d.last_seq}: "
            f"{d.reason}"
        )
    groups = ranges(decisions)
    total = sum(g[-1].last_seq + 1 - g[0].first_seq for _, g in groups)
    if args.dry_run:
        print(f"dry run: {len(groups)} range(s), {total} entries would be removed")
        return 0
    if not groups:
        print("nothing to prune")
        return 0
    try:
        detail = execute(config, decisions, reason=args.reason)
    except (AuditError, OSError, ValueError) as exc:
        return _fail(f"prune failed: {exc}")
    print(f"pruned {detail['entries']} entries in {len(groups)} range(s) ({detail['prune_id']}), recorded in the log")
    return 0


def _append(config: Config, event: dict[str, Any]) -> None:
    from vllm_audit.writer import append_events

    append_events(config, [event])


def _sync_legal_holds(config: Config) -> int:
    """Set or clear the Object Lock legal hold on archived segments to match the active holds."""
    if not config.archive.enabled:
        return 0
    from pathlib import Path

    from vllm_audit.archive.holds import checked_holds
    from vllm_audit.archive.projection import ArchiveIndex, held_by, index_path, scan_records
    from vllm_audit.archive.s3 import ObjectStore
    from vllm_audit.ship.config import state_dir

    holds = checked_holds(config)
    index = ArchiveIndex(index_path(state_dir(config.ship, config.log.dir))).load()
    store = ObjectStore(config.archive)
    changed = 0
    for item in index.all():
        local = Path(config.log.dir) / "writers" / item.writer_id / item.segment
        data = (
            local.read_bytes() if local.exists() else store.get(item.segment_object.key, item.segment_object.version_id)
        )
        want = bool(held_by(scan_records(data), holds))
        for obj in item.objects:
            head = store.head(obj.key, obj.version_id)
            if head is not None and head.legal_hold != want:
                store.set_legal_hold(obj, want)
                changed += 1
    return changed


def _hold_add(args: argparse.Namespace) -> int:
    from vllm_audit.archive.holds import HoldStore, hold_event, holds_path

    try:
        config = _config(args)
        store = HoldStore(holds_path(config))
        hold = store.add(
            reason=args.reason,
            placed_by=args.by or getpass.getuser(),
            org_id=args.org,
            user_id=args.user,
            request_id=args.request_id,
            time_from=args.time_from,
            time_to=args.time_to,
        )
        _append(config, hold_event(hold, "hold.placed"))
        changed = _sync_legal_holds(config)
    except (AuditError, OSError) as exc:
        return _fail(str(exc))
    print(f"placed {hold.describe()}" + (f"; legal hold set on {changed} archive object(s)" if changed else ""))
    return 0


def _hold_list(args: argparse.Namespace) -> int:
    from vllm_audit.archive.holds import HoldStore, holds_path, repair_holds_file

    try:
        config = _config(args)
        if args.repair:
            repair_holds_file(config)
            print(f"rewrote {holds_path(config)} from the audit chain's hold events")
        holds = HoldStore(holds_path(config)).load()
    except (AuditError, OSError) as exc:
        return _fail(str(exc))
    for h in holds:
        if h.active or args.all:
            state = "active" if h.active else f"released {h.released_at} by {h.released_by}"
            print(f"{h.describe()}: placed {h.placed_at} by {h.placed_by}; {state}")
    return 0


def _hold_release(args: argparse.Namespace) -> int:
    from vllm_audit.archive.holds import HoldStore, hold_event, holds_path

    try:
        config = _config(args)
        hold = HoldStore(holds_path(config)).release(args.hold_id, by=args.by or getpass.getuser(), reason=args.reason)
        _append(config, hold_event(hold, "hold.released"))
        changed = _sync_legal_holds(config)
    except (AuditError, OSError) as exc:
        return _fail(str(exc))
    print(f"released {hold.describe()}" + (f"; legal hold cleared on {changed} archive object(s)" if changed else ""))
    return 0


def _archive(args: argparse.Namespace) -> int:
    from vllm_audit.archive.projection import ArchiveIndex, SegmentArchiver, index_path
    from vllm_audit.archive.s3 import ObjectStore
    from vllm_audit.integrity.reader import LogReader
    from vllm_audit.ship.config import state_dir

    try:
        config = _config(args)
        sdir = state_dir(config.ship, config.log.dir)
        if args.status:
            for item in ArchiveIndex(index_path(sdir)).load().all():
                print(
                    f"{item.writer_id}/{item.segment} entries {item.first_seq}..{item.last_seq}: "
                    f"{item.segment_object.key} v{item.segment_object.version_id} locked until {item.retain_until}"
                )
            return 0
        if not config.archive.enabled:
            return _fail("no [archive] bucket is configured")
        store = ObjectStore(config.archive)
        store.ensure_bucket()
        archiver = SegmentArchiver(config, sdir, store)
        reader = LogReader(config.log.dir)
        done = sum(archiver.archive_until(w, reader.signed_size(w)) for w in reader.writer_ids())
    except (AuditError, OSError) as exc:
        return _fail(str(exc))
    print(f"archived {done} segment(s)")
    return 0


def _archive_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vllm_audit.archive.restore import restore
    from vllm_audit.integrity.keys import load_public_keys

    into = Path(args.into)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        return _fail(f"--into {args.into}: not an empty directory")
    try:
        config = _config(args)
        keys = load_public_keys(args.public_key) if args.public_key else []
        res = restore(config, args.writer, args.from_seq, args.to_seq, into, keys=keys)
    except (AuditError, OSError, ValueError) as exc:
        return _fail(str(exc))
    segs = res.segments
    mb = res.archive_bytes / 1e6
    print(
        f"restored {len(segs)} segment(s) of {args.writer}, entries {segs[0].first_seq}..{segs[-1].last_seq} "
        f"({mb:.1f} MB) into {into} in {res.seconds:.2f} s; {res.entries} entries linked, "
        f"{res.checkpoints} checkpoint root(s) recomputed" + (" and signatures verified" if keys else "")
    )
    return 0
