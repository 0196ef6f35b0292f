"""``vllm-audit keygen | verify | prove | verify-proof | prove-consistency | verify-consistency``.

Exit codes: 0 intact / done, 1 does not verify, 2 usage or key-file error (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.errors import KeyFileError, VerificationError
from vllm_audit.integrity.keys import load_public_keys, write_keypair

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the integrity sub-commands to the ``vllm-audit`` parser."""
    p = subparsers.add_parser("keygen", help="create an Ed25519 checkpoint signing key pair")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (0600) and PREFIX.pub")
    p.add_argument("--name", help="key name in signatures (default: vllm-audit/<basename of PREFIX>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.key")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("verify", help="verify every writer's chain, checkpoints and segments in a log")
    p.add_argument("log_dir", metavar="LOGDIR")
    _keys_arg(p)
    p.add_argument("--anchor", action="append", default=[], metavar="DIR", help="anchor directory (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("prove", help="write the inclusion proof of one record")
    p.add_argument("request_id", metavar="REQUEST_ID")
    p.add_argument("--log-dir", required=True, metavar="DIR")
    p.add_argument("--out", metavar="FILE", help="default: stdout")
    p.set_defaults(func=cmd_prove)

    p = subparsers.add_parser("verify-proof", help="check an inclusion proof on its own")
    p.add_argument("file", metavar="FILE")
    _keys_arg(p)
    p.set_defaults(func=cmd_verify_proof)

    p = subparsers.add_parser("prove-consistency", help="prove a later checkpoint extends an earlier one")
    p.add_argument("--log-dir", required=True, metavar="DIR")
    p.add_argument("--writer", required=True, metavar="WRITER_ID")
    p.add_argument("--old", required=True, type=int, metavar="N", help="tree size of the earlier checkpoint")
    p.add_argument("--new", required=True, type=int, metavar="M", help="tree size of the later checkpoint")
    p.add_argument("--out", metavar="FILE", help="default: stdout")
    p.set_defaults(func=cmd_prove_consistency)

    p = subparsers.add_parser("verify-consistency", help="check a consistency proof on its own")
    p.add_argument("file", metavar="FILE")
    _keys_arg(p)
    p.set_defaults(func=cmd_verify_consistency)


def _keys_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--public-key",
        action="append",
        required=True,
        metavar="K",
        help=".pub or keyring file (repeatable; lines may carry not-before=/not-after= for rotation)",
    )


def _err(msg: str, code: int) -> int:
    print(f"vllm-audit: {msg}", file=sys.stderr)
    return code


def _write_json(obj: Any, out: str | None) -> None:
    data = orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n"
    if out:
        Path(out).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _read_json(path: str) -> Any:
    try:
        return orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise _Usage(f"cannot read {path!r}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise VerificationError(f"{path!r} is not JSON") from None


class _Usage(Exception):
    pass


def cmd_keygen(args: argparse.Namespace) -> int:
    name = args.name or f"vllm-audit/{os.path.basename(str(args.out)) or 'key'}"
    try:
        Path(str(args.out)).parent.mkdir(parents=True, exist_ok=True)  # --out DIR/prefix with a new DIR
        key = write_keypair(args.out, name, force=args.force)
    except KeyFileError as exc:
        return _err(str(exc), EXIT_USAGE)
    v = key.verifier
    print(f"wrote {args.out}.key (private, mode 0600) and {args.out}.pub")
    print(f"key id {v.label}  fingerprint sha256:{v.fingerprint}")
    print(f"set [integrity] signing_key = {str(Path(f'{args.out}.key').resolve())!r}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from vllm_audit.integrity.verify import tune_malloc, verify_log

    try:
        keys = load_public_keys(args.public_key)
    except KeyFileError as exc:
        return _err(str(exc), EXIT_USAGE)
    if not Path(args.log_dir).is_dir():
        return _err(f"log directory {args.log_dir!r} does not exist", EXIT_USAGE)
    tune_malloc()
    report = verify_log(args.log_dir, keys, args.anchor)
    if args.json:
        _write_json(report.to_dict(), None)
        return EXIT_OK if report.intact else EXIT_BAD
    first, last = report.time_span
    head = "INTACT" if report.intact else f"NOT INTACT ({len(report.problems)} problem(s))"
    print(f"{args.log_dir}: {head}")
    print(
        f"  writers: {len(report.writers)}  records: {report.records}  entries: {report.entries}  "
        f"checkpoints: {report.checkpoints}  time span: {first or '-'} .. {last or '-'}"
    )
    for w in report.writers:
        flags = " (live)" if w.live else ""
        print(
            f"  writer {w.writer_id}{flags}: {w.entries} entries in {w.segments} segment(s) "
            f"({w.sealed_segments} sealed), {w.checkpoints} checkpoint(s)"
            + (f" + {w.anchored_checkpoints} anchored" if w.anchored_checkpoints else "")
            + f", signed size {w.signed_size}"
        )
        for warn in w.warnings[:5]:
            print(f"    note: {warn}")
        for r in w.pruned:
            print(
                f"    pruned: entries {r['start']}..{r['end'] - 1} ({len(r['segments'])} segment(s)) "
                "removed by retention (recorded by a signed retention.pruned event)"
            )
        if w.consequential_mismatches:
            print(
                f"    note: {w.consequential_mismatches} signed root(s) no longer match because of the problems below"
            )
    for period in report.settings_periods():
        weak = f"  WEAKER: {'; '.join(period.weaker)}" if period.weaker else ""
        print(f"  settings from {period.since} (writer {period.writer_id}): sha256 {period.sha256[:16]}{weak}")
    if not report.intact:
        print(f"FIRST PROBLEM: {report.problems[0]}")
        for p in report.problems[1:]:
            print(f"  {p}")
    return EXIT_OK if report.intact else EXIT_BAD


def cmd_prove(args: argparse.Namespace) -> int:
    from vllm_audit.integrity.proofs import build_inclusion_proof

    try:
        proof = build_inclusion_proof(args.log_dir, args.request_id)
    except VerificationError as exc:
        return _err(str(exc), EXIT_BAD)
    if proof is None:
        return _err(f"no record with request id {args.request_id!r} in {args.log_dir!r}", EXIT_BAD)
    _write_json(proof, args.out)
    if args.out:
        print(
            f"wrote inclusion proof of {args.request_id} (writer {proof['writer_id']}, entry {proof['leaf_index']}, "
            f"tree size {proof['tree_size']}) to {args.out}"
        )
    return EXIT_OK


def cmd_verify_proof(args: argparse.Namespace) -> int:
    from vllm_audit.integrity.proofs import verify_inclusion_proof

    try:
        keys = load_public_keys(args.public_key)
        proof = _read_json(args.file)
        cp = verify_inclusion_proof(proof, keys)
    except (KeyFileError, _Usage) as exc:
        return _err(str(exc), EXIT_USAGE)
    except VerificationError as exc:
        return _err(f"proof does NOT verify: {exc}", EXIT_BAD)
    print(
        f"OK: entry {proof['leaf_index']} of writer {proof['writer_id']} is in the log "
        f"{cp.origin} of size {cp.size} signed by {cp.key_label} at {cp.time}"
    )
    return EXIT_OK


def cmd_prove_consistency(args: argparse.Namespace) -> int:
    from vllm_audit.integrity.proofs import build_consistency_proof

    try:
        proof = build_consistency_proof(args.log_dir, args.writer, args.old, args.new)
    except VerificationError as exc:
        return _err(str(exc), EXIT_BAD)
    _write_json(proof, args.out)
    return EXIT_OK


def cmd_verify_consistency(args: argparse.Namespace) -> int:
    from vllm_audit.integrity.proofs import verify_consistency_proof

    try:
        keys = load_public_keys(args.public_key)
        a, b = verify_consistency_proof(_read_json(args.file), keys)
    except (KeyFileError, _Usage) as exc:
        return _err(str(exc), EXIT_USAGE)
    except VerificationError as exc:
        return _err(f"consistency proof does NOT verify: {exc}", EXIT_BAD)
    print(f"OK: {b.origin} at size {b.size} ({b.time}) extends size {a.size} ({a.time})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m vllm_audit.integrity.cli``), same sub-commands."""
    parser = argparse.ArgumentParser(prog="vllm-audit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
