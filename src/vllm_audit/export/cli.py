"""``vllm-audit export`` and ``vllm-audit verify-bundle``.

The export is itself an audited event (``export.created``, with who, what and the bundle's
manifest hash). When the window of a writer begins in a range that retention pruned and the
configuration has an ``[archive]``, the pruned segments are first restored from it into a temporary
directory (:func:`vllm_audit.archive.restore.restore_view`, every object verified) and the bundle
is built from there; ``--no-archive`` refuses instead. ``verify-bundle`` runs the same single-file
verifier that is written into every bundle (:mod:`vllm_audit.export.standalone`): exit 0 intact,
1 a problem (each one named), 2 usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import hashlib
import sys
import tempfile
from pathlib import Path

from vllm_audit.config import Config, config_from_env, load_config
from vllm_audit.errors import AuditError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("export", help="compliance export of one tenant's records in a time range (audited)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--log-dir", help="audit log directory (overrides [log] dir)")
    p.add_argument("--org", required=True, help="tenant (org_id)")
    p.add_argument("--from", dest="time_from", required=True, help="first instant, ISO 8601 UTC (inclusive)")
    p.add_argument("--to", dest="time_to", required=True, help="last instant, ISO 8601 UTC (exclusive)")
    p.add_argument("--out", required=True, help="output directory, or FILE.tar")
    p.add_argument("--public-key", action="append", default=[], help="checkpoint key(s) to include (.pub)")
    p.add_argument(
        "--grace-seconds",
        type=float,
        default=3600.0,
        help="the window ends at the first checkpoint this long after --to (long requests are sealed late)",
    )
    p.add_argument("--reason", default="", help="why (recorded in the audit event)")
    p.add_argument(
        "--no-archive",
        action="store_true",
        help="refuse a range that retention pruned instead of restoring it from the [archive] (the default)",
    )
    p.set_defaults(func=_export)

    p = subparsers.add_parser("verify-bundle", help="verify an export bundle offline")
    p.add_argument("bundle", help="bundle directory or .tar")
    p.add_argument("--public-key", action="append", required=True, help="trusted checkpoint key (.pub), repeatable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_verify_bundle)


def _fail(message: str) -> int:
    print(f"vllm-audit: error: {message}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else config_from_env()
    if args.log_dir:
        config = config.replace(log=dataclasses.replace(config.log, dir=args.log_dir))
    return config


def _keys(config: Config, paths: list[str]) -> list[object]:
    from vllm_audit.integrity.keys import load_public_keys, load_signing_key

    if paths:
        return list(load_public_keys(paths))
    if config.integrity.signing_key:
        return [load_signing_key(config.integrity.signing_key).verifier]
    auto = Path(config.log.dir) / "keys" / "signing.pub"
    if auto.exists():
        return list(load_public_keys([auto]))
    raise AuditError("no public key to include: pass --public-key")


def _erased(config: Config) -> object:
    key_dir = config.privacy.key_dir
    if not key_dir:
        return None
    from vllm_audit.privacy.redactor import resolve_path

    tombs = resolve_path(config, key_dir) / "tombstones"

    def erased(org: str) -> bool:
        import orjson

        for t in tombs.glob("*.json") if tombs.is_dir() else ():
            try:
                if orjson.loads(t.read_bytes()).get("org_id") == org:
                    return True
            except (OSError, orjson.JSONDecodeError):
                continue
        return False

    return erased


def _export(args: argparse.Namespace) -> int:
    from vllm_audit.export.bundle import build_bundle
    from vllm_audit.writer import append_events

    restored: list[dict[str, object]] = []
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        config = _config(args)
        keys = _keys(config, args.public_key)
        source = config
        need = {}
        if config.archive.enabled and not args.no_archive:
            from vllm_audit.archive.restore import pruned_from, restore_view

            need = pruned_from(config, args.time_from)
        if need:
            tmp = tempfile.TemporaryDirectory(prefix="vllm-audit-restore-")
            for r in restore_view(config, tmp.name, need, keys=keys):  # type: ignore[arg-type]
                got = [s for s in r.segments if s.source == "archive"]
                if got:
                    restored.append(
                        {
                            "writer_id": got[0].writer_id,
                            "first_seq": got[0].first_seq,
                            "last_seq": got[-1].last_seq,
                            "segments": len(got),
                            "bytes": sum(s.bytes for s in got),
                        }
                    )
            source = config.replace(log=dataclasses.replace(config.log, dir=tmp.name))
        res = build_bundle(
            source,
            args.org,
            args.time_from,
            args.time_to,
            args.out,
            keys=keys,  # type: ignore[arg-type]
            grace_seconds=args.grace_seconds,
            erased=_erased(config),  # type: ignore[arg-type]
        )
        manifest = _manifest_bytes(Path(args.out))
        append_events(
            config,
            [
                {
                    "record_type": "event",
                    "event": "export.created",
                    "org_id": args.org,
                    "detail": {
                        "org_id": args.org,
                        "from": args.time_from,
                        "to": args.time_to,
                        "records": res.records,
                        "writers": res.writers,
                        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                        "operator": getpass.getuser(),
                        "reason": args.reason,
                        "restored_from_archive": restored,
                    },
                }
            ],
        )
    except (AuditError, OSError, ValueError) as exc:
        return _fail(str(exc))
    finally:
        if tmp is not None:
            tmp.cleanup()
    for done in restored:
        print(
            f"restored {done['segments']} pruned segment(s) of {done['writer_id']} "
            f"(entries {done['first_seq']}..{done['last_seq']}) from the archive, each verified"
        )
    print(
        f"exported {res.records} record(s) of {args.org!r} from {res.writers} writer(s) to {args.out} "
        f"({res.bytes} bytes); the export is recorded in the log"
    )
    return 0


def _manifest_bytes(out: Path) -> bytes:
    if out.suffix == ".tar":
        import tarfile

        with tarfile.open(out) as tar:
            fh = tar.extractfile(f"{out.stem}/MANIFEST.json")
            return fh.read() if fh is not None else b""
    return (out / "MANIFEST.json").read_bytes()


def _verify_bundle(args: argparse.Namespace) -> int:
    from vllm_audit.export import standalone

    argv = [args.bundle, *(x for k in args.public_key for x in ("--public-key", k))]
    if args.json:
        argv.append("--json")
    return standalone.main(argv)
