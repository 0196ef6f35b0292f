"""Compliance export: every record of one tenant in a time range, with the proof that it is all of them.

``build_bundle(config, org, t_from, t_to, out)`` writes a directory (or a ``.tar``) holding, per
writer of the log, a *window* ``[start, end)`` of its chain between two signed checkpoints — the
last one signed before ``t_from`` and the first one signed at least ``grace`` after ``t_to`` — as
the header and body digest of every entry (its tlog entry: enough to recompute its leaf, follow
the ``prev`` links and compare its ``org_tag`` with the tenant's), every entry whose tag is the
tenant's in full (as stored: the records of the range, the tenant's other entries in the windows
as context, its events), the compact range of the tree before ``start``, both checkpoint notes and
the RFC 6962 consistency proof between them; one C2SP ``tlog-proof`` per record; the public keys,
a C2SP ``tlog-policy`` file, a summary, the single-file verifier, and a manifest of every file's
SHA-256. docs/export.md explains why this proves completeness and what it does not prove.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.config import Config
from vllm_audit.errors import AuditError
from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, Checkpoint, parse_body, parse_note_line, split_note
from vllm_audit.integrity.keys import VerifierKey
from vllm_audit.integrity.merkle import CompactRange, decompose_starts, node_hash
from vllm_audit.integrity.reader import LogReader, read_manifest, read_pruned

FORMAT = "vllm-audit-export/v2"
REVEALED_EVENTS = frozenset({"settings.effective", "privacy.erase", "hold.placed", "hold.released"})


class ExportError(AuditError):
    """The export cannot be built (the message says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportResult:
    out: Path
    records: int
    writers: int
    bytes: int
    summary: dict[str, Any]


def _notes(writer_dir: Path) -> list[tuple[str, Checkpoint]]:
    out: list[tuple[str, Checkpoint]] = []
    try:
        data = (writer_dir / CHECKPOINTS_FILE).read_bytes()
    except FileNotFoundError:
        return out
    for raw in data.split(b"\n")[:-1]:
        try:
            note = parse_note_line(raw)
            out.append((note, parse_body(split_note(note)[0])))
        except (ValueError, orjson.JSONDecodeError):
            continue
    return out


def _prefix_at(reader: LogReader, wid: str, first: int) -> CompactRange:
    """The compact range at the start of the segment beginning at ``first``."""
    if first == 0:
        return CompactRange()
    segs = reader.segments(wid)
    prev = [p for f, p in segs if f < first]
    m = read_manifest(prev[-1]) if prev else None
    if m is not None and m["tree_size"] == first:
        return CompactRange(first, [bytes.fromhex(h) for h in m["compact_range"]])
    for r in read_pruned(reader.writer_dir(wid)):
        if r.end == first:
            return CompactRange(first, [bytes.fromhex(h) for h in r.compact_range])
    raise ExportError(f"writer {wid}: no manifest or pruned range gives the tree at entry {first}")


class _Tree:
    """Subtree hashes of a tree whose leaves before ``lo`` are known only as a compact range."""

    def __init__(self, prefix: CompactRange, lo: int, leaves: list[bytes]) -> None:
        self.lo = lo
        self.leaves = leaves
        self.memo: dict[tuple[int, int], bytes] = {
            (b, b + (1 << lv)): h for (b, lv), h in zip(decompose_starts(0, lo), prefix.hashes, strict=True)
        }

    def sub(self, a: int, b: int) -> bytes:
        got = self.memo.get((a, b))
        if got is not None:
            return got
        if b - a == 1:
            if a < self.lo:
                raise ExportError(f"entry {a} is before the exported window")
            return self.leaves[a - self.lo]
        k = 1 << ((b - a - 1).bit_length() - 1)
        h = node_hash(self.sub(a, a + k), self.sub(a + k, b))
        self.memo[(a, b)] = h
        return h

    def inclusion(self, m: int, size: int) -> list[bytes]:
        out: list[bytes] = []
        lo, hi = 0, size
        stack = []
        while hi - lo > 1:
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if m < lo + k:
                stack.append((lo + k, hi))
                hi = lo + k
            else:
                stack.append((lo, lo + k))
                lo = lo + k
        for a, b in reversed(stack):
            out.append(self.sub(a, b))
        return out

    def consistency(self, m: int, n: int) -> list[bytes]:
        if m == 0 or m == n:
            return []

        def subproof(m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
            if m == hi - lo:
                return [] if whole else [self.sub(lo, hi)]
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if m <= k:
                return [*subproof(m, lo, lo + k, whole), self.sub(lo + k, hi)]
            return [*subproof(m - k, lo + k, hi, False), self.sub(lo, lo + k)]

        return subproof(m, 0, n, True)


def tlog_proof(index: int, path: list[bytes], note: str) -> str:
    """A C2SP ``tlog-proof@v1`` text."""
    lines = ["c2sp.org/tlog-proof@v1", f"index {index}", *(base64.b64encode(h).decode() for h in path), ""]
    return "\n".join(lines) + "\n" + note


def _status(rec: dict[str, Any]) -> str:
    st = rec.get("status")
    if isinstance(st, dict):
        return str(st.get("outcome") or st.get("http") or "?")
    return str(st if st is not None else rec.get("http_status", "?"))


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def build_bundle(
    config: Config,
    org: str,
    t_from: str,
    t_to: str,
    out: str | Path,
    *,
    keys: list[VerifierKey],
    grace_seconds: float = 3600.0,
    erased: Callable[[str], bool] | None = None,
) -> ExportResult:
    """Write the bundle for tenant ``org``, records with ``t_from <= timestamp < t_to`` (ISO 8601 UTC)."""
    if not org:
        raise ExportError("--org must name a tenant (an empty org id is the tag of entries without one)")
    for arg, value in (("--from", t_from), ("--to", t_to)):
        try:
            dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ExportError(f"{arg} {value!r} is not an ISO 8601 time (e.g. 2026-03-01T00:00:00.000Z)") from None
    if not t_from < t_to:
        raise ExportError(f"--from {t_from} must be before --to {t_to}")
    until = _iso(dt.datetime.fromisoformat(t_to.replace("Z", "+00:00")) + dt.timedelta(seconds=grace_seconds))
    reader = LogReader(config.log.dir, limit="signed")
    files: dict[str, bytes] = {}
    records_out: list[bytes] = []
    context_out: list[bytes] = []
    events_out: list[bytes] = []
    proofs_out: list[bytes] = []
    summary_writers = []
    by_user: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    encrypted = 0
    erase_events: list[dict[str, Any]] = []
    settings_events: list[dict[str, Any]] = []
    org_needle = b'"org_id":' + orjson.dumps(org)
    org_b = org.encode()
    writers = reader.writer_ids()
    if not writers:
        raise ExportError(f"no writers in {config.log.dir!r}")
    for wid in writers:
        notes = _notes(reader.writer_dir(wid))
        if not notes:
            continue
        before = [(n, cp) for n, cp in notes if cp.time < t_from]
        start_note, start_cp = before[-1] if before else ("", None)
        lo = start_cp.size if start_cp is not None else 0
        after = [(n, cp) for n, cp in notes if cp.time >= until and cp.size >= lo]
        end_note, end_cp = after[0] if after else notes[-1]
        hi = end_cp.size
        if hi < lo:
            raise ExportError(f"writer {wid}: checkpoints go backwards (run vllm-audit verify)")
        segs = [f for f, _ in reader.segments(wid) if f <= lo]
        if not segs:
            raise ExportError(
                f"writer {wid}: entries from {lo} are no longer in the local log (pruned); "
                "restore the segments from the archive first"
            )
        seg_first = segs[-1]
        prefix = _prefix_at(reader, wid, seg_first)
        leaves: list[bytes] = []
        lines: list[bytes] = []
        wanted: list[int] = []
        context = 0
        # org_tag(wid, seq, org) without re-hashing the fixed prefix for every entry
        tag_seed = hashlib.sha256(codec.ORG_TAG_DOMAIN + wid.encode() + b"\x00")
        for e in reader.entries(wid, seg_first) if hi > seg_first else ():
            if e.seq >= hi:
                break
            if e.seq < lo:
                prefix.append(e.leaf)
                continue
            leaves.append(e.leaf)
            header = e.header
            t = tag_seed.copy()
            t.update(b"%d\x00%b" % (e.seq, org_b))
            mine = header[-codec.TAG_HEX - 2 : -2] == t.hexdigest()[: codec.TAG_HEX].encode()
            flag = b"-"
            rec: dict[str, Any] | None = None
            if mine or org_needle in e.line:
                rec = e.record()
                if (codec.org_of(rec) == org) != mine:
                    raise ExportError(
                        f"writer {wid} entry {e.seq}: its org_tag does not match its org_id (sealed by a faulty "
                        "writer); the export cannot prove completeness for this tenant"
                    )
            elif e.record_type == "event":
                rec = e.record()
            if rec is not None and e.record_type == "event":
                name = rec.get("event")
                if mine or (name in REVEALED_EVENTS and (name == "settings.effective" or not codec.org_of(rec))):
                    flag = b"E"
                    events_out.append(e.line)
                    if name == "privacy.erase":
                        erase_events.append(rec)
                    elif name == "settings.effective":
                        settings_events.append(rec)
            elif mine and rec is not None:
                ts = rec.get("timestamp")
                if e.record_type in ("inference", "alert") and isinstance(ts, str) and t_from <= ts < t_to:
                    flag = b"R"
                    records_out.append(e.line)
                    wanted.append(e.seq)
                    by_user[str(rec.get("user_id"))] += 1
                    by_model[str(rec.get("model_name"))] += 1
                    by_status[_status(rec)] += 1
                    if any(k.endswith("_enc") and v for k, v in rec.items()):
                        encrypted += 1
                else:  # the tenant's, inside the window but not a record of the range: shown as context
                    flag = b"C"
                    context_out.append(e.line)
                    context += 1
            lines.append(b"%b %b %b" % (flag, e.body_digest().hex().encode(), header))
        if prefix.size != lo or len(leaves) != hi - lo:
            raise ExportError(f"writer {wid}: the local log has fewer entries ({lo + len(leaves)}) than signed ({hi})")
        tree = _Tree(prefix, lo, leaves)
        for seq in wanted:
            proof = tlog_proof(seq, tree.inclusion(seq, hi), end_note)
            proofs_out.append(orjson.dumps({"writer_id": wid, "seq": seq, "proof": proof}))
        files[f"windows/{wid}.entries"] = b"\n".join(lines) + (b"\n" if lines else b"")
        window = {
            "writer_id": wid,
            "start": lo,
            "end": hi,
            "prefix": [h.hex() for h in prefix.hashes],
            "start_checkpoint": start_note,
            "end_checkpoint": end_note,
            "consistency_proof": [h.hex() for h in tree.consistency(lo, hi)] if start_cp is not None else [],
        }
        files[f"windows/{wid}.json"] = orjson.dumps(window, option=orjson.OPT_INDENT_2)
        summary_writers.append(
            {
                "writer_id": wid,
                "start": lo,
                "end": hi,
                "start_time": start_cp.time if start_cp is not None else "",
                "end_time": end_cp.time,
                "records": len(wanted),
                "context_entries": context,
                "complete_to_range_end": end_cp.time >= t_to,
            }
        )
    from vllm_audit.evidence import settings_periods

    periods = [p.to_dict() for p in settings_periods(settings_events)]
    erased_flag = bool(erase_events) or (erased(org) if erased is not None else False)
    summary = {
        "org_id": org,
        "from": t_from,
        "to": t_to,
        "records": len(records_out),
        "context_entries": len(context_out),
        "by_user": dict(sorted(by_user.items())),
        "by_model": dict(sorted(by_model.items())),
        "by_status": dict(sorted(by_status.items())),
        "encrypted_records": encrypted,
        "erased": erased_flag,
        "erasures": [{"timestamp": e.get("timestamp"), "detail": e.get("detail")} for e in erase_events],
        "settings_periods": periods,
        "writers": summary_writers,
    }
    files["records.jsonl"] = b"".join(line + b"\n" for line in records_out)
    files["context.jsonl"] = b"".join(line + b"\n" for line in context_out)
    files["events.jsonl"] = b"".join(line + b"\n" for line in events_out)
    files["proofs.jsonl"] = b"".join(line + b"\n" for line in proofs_out)
    files["summary.json"] = orjson.dumps(summary, option=orjson.OPT_INDENT_2)
    files["SUMMARY.md"] = _summary_md(summary).encode()
    for k in keys:
        files[f"keys/{k.name.replace('/', '_')}+{k.key_id.hex()}.pub"] = (k.vkey() + "\n").encode()
    files["policy.tlog-policy"] = _policy(keys).encode()
    files["verify_bundle.py"] = (Path(__file__).parent / "standalone.py").read_bytes()
    manifest = {
        "format": FORMAT,
        "org_id": org,
        "from": t_from,
        "to": t_to,
        "grace_seconds": grace_seconds,
        "created_at": _iso(dt.datetime.now(dt.UTC)),
        "writers": [w["writer_id"] for w in summary_writers],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    files["MANIFEST.json"] = orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
    size = _write(Path(out), files)
    return ExportResult(Path(out), len(records_out), len(summary_writers), size, summary)


def _policy(keys: list[VerifierKey]) -> str:
    lines = [
        "# C2SP tlog-policy (c2sp.org/tlog-policy) for this bundle's checkpoints.",
        "# Each writer is its own log with origin <prefix>/<writer_id>, all signed with the keys below;",
        "# no witness cosignatures are required (add witness lines and a quorum when you use witnesses).",
    ]
    lines += [f"log {k.vkey()}" for k in keys]
    lines.append("quorum none")
    return "\n".join(lines) + "\n"


def _summary_md(s: dict[str, Any]) -> str:
    out = [
        f"# Audit export: tenant `{s['org_id']}`, {s['from']} to {s['to']}",
        "",
        f"Records: **{s['records']}**, from {len(s['writers'])} writer chain(s). Verify with "
        "`python verify_bundle.py . --public-key KEY.pub` (needs only `cryptography`).",
        "",
        "| writer | entries | first checkpoint | last checkpoint | records |",
        "|---|---|---|---|---|",
    ]
    for w in s["writers"]:
        note = "" if w["complete_to_range_end"] else " (coverage ends before the range end)"
        out.append(
            f"| {w['writer_id']} | {w['start']}..{w['end'] - 1} | {w['start_time'] or '(log start)'} | "
            f"{w['end_time']}{note} | {w['records']} |"
        )
    for title, key in (("By user", "by_user"), ("By model", "by_model"), ("By status", "by_status")):
        out += ["", f"## {title}", ""] + [f"- `{k}`: {v}" for k, v in s[key].items()]
    out += ["", "## Erasure", ""]
    if s["erased"]:
        out.append(
            f"The tenant was erased by crypto-shredding: {s['encrypted_records']} record(s) hold ciphertext whose "
            "key is destroyed. It is exported as stored; it verifies, and it cannot be decrypted."
        )
    else:
        out.append(f"No erasure recorded. {s['encrypted_records']} record(s) hold encrypted fields (as stored).")
    out += ["", "## Settings in force", ""]
    for p in s["settings_periods"] or []:
        weak = ("  **Weaker:** " + "; ".join(p["weaker"])) if p["weaker"] else ""
        out.append(f"- from {p['since']} (writer {p['writer_id']}): settings sha256 `{p['sha256'][:16]}`{weak}")
    if not s["settings_periods"]:
        out.append("- no settings event inside the exported windows")
    return "\n".join(out) + "\n"


def _write(out: Path, files: dict[str, bytes]) -> int:
    total = sum(len(b) for b in files.values())
    if out.suffix == ".tar":
        out.parent.mkdir(parents=True, exist_ok=True)
        root = out.stem
        with tarfile.open(out, "w") as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{root}/{name}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return out.stat().st_size
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {str(out)!r} is not empty")
    for name, data in files.items():
        p = out / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return total
