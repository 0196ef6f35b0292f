"""Retention as an audited operation: ``vllm-audit prune`` removes old local segments, honestly.

A sealed segment goes only when all of these hold (otherwise it stays, and the dry run says why):

1. it was sealed more than ``[retention] days`` ago;
2. its bytes still match its manifest (SHA-256);
3. it is archived (``[retention] require_archive``): the archive index names its three objects and
   each is present in the bucket, with the same SHA-256, under Object Lock until a date still to
   come;
4. no active legal hold matches any record in it. The holds are those the chain's
   ``hold.placed`` / ``hold.released`` events (and earlier prune events) state; the holds file must
   agree with them, or prune refuses and names the hold (see :mod:`vllm_audit.archive.holds`).

The newest segment of a writer is never removed. Consecutive removable segments form a range
``[start, end)``. Before deleting anything, one ``retention.pruned`` event is appended to the chain
(signed by the next checkpoint): per range, the writer, the entries, each segment's SHA-256 and
Merkle root, where its archive copy is (key and version), and the compact range of the writer's
tree at ``end`` (from the last pruned segment's manifest). The event also carries forward every
range the chain's earlier prune events record (``earlier_ranges``, of every writer), so the newest
prune event records all pruned ranges, even once a later prune removed the segment that held an
earlier event. Then the range is added to ``writers/<id>/pruned.jsonl`` and the segment and manifest
files are unlinked. ``vllm-audit verify`` goes on from ``end`` with that compact range (across
ranges that follow one another with no local segment between them) — so every later signed root is
still recomputed — and reports the range as pruned, not missing; a range no signed event records is
reported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import orjson

from vllm_audit._fs import fsync_dir, write_all
from vllm_audit.archive.holds import chain_holds, checked_holds
from vllm_audit.archive.projection import ArchiveIndex, index_path, parse_time, scan_records
from vllm_audit.archive.s3 import ObjectStore
from vllm_audit.config import Config
from vllm_audit.integrity import codec
from vllm_audit.integrity.reader import PRUNED_FILE, PrunedRange, list_segments, read_manifest
from vllm_audit.ship.config import state_dir

EVENT = "retention.pruned"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Whether one sealed segment goes, and why."""

    writer_id: str
    segment: str
    first_seq: int
    last_seq: int
    prune: bool
    reason: str
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    archive: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "segment": self.segment,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "prune": self.prune,
            "reason": self.reason,
        }


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(config: Config, *, now: dt.datetime | None = None, store: ObjectStore | None = None) -> list[Decision]:
    """The decision for every sealed segment of every writer (nothing is changed)."""
    now = now or dt.datetime.now(dt.UTC)
    days = config.retention.days
    need_archive = config.retention.require_archive
    index = ArchiveIndex(index_path(state_dir(config.ship, config.log.dir))).load()
    holds = checked_holds(config)  # from the chain's hold events; the holds file must agree
    if need_archive and config.archive.enabled and store is None:
        store = ObjectStore(config.archive)
    root = Path(config.log.dir) / "writers"
    out: list[Decision] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        wid = d.name
        segs = list_segments(d)
        for _first, path in segs[:-1]:  # the newest segment of a writer always stays
            m = read_manifest(path)
            if m is None:
                out.append(Decision(wid, path.name, _first, -1, False, "not sealed (no manifest)"))
                continue
            first, last = int(m["first_seq"]), int(m["last_seq"])

            def keep(why: str, first: int = first, last: int = last, path: Path = path, wid: str = wid) -> None:
                out.append(Decision(wid, path.name, first, last, False, why))

            sealed = str(m.get("sealed_at") or "")
            try:
                expires = parse_time(sealed) + dt.timedelta(days=days)
            except ValueError:
                keep(f"manifest has no readable sealed_at ({sealed!r})")
                continue
            if expires > now:
                keep(f"within retention ({days:g} days) until {_iso(expires)}")
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != m.get("sha256"):
                keep("the segment does not match its manifest (run vllm-audit verify)")
                continue
            archive: dict[str, Any] = {}
            if need_archive:
                item = index.get(wid, path.name)
                if not config.archive.enabled or store is None:
                    keep("no [archive] is configured and [retention] require_archive is on")
                    continue
                if item is None:
                    keep("not archived yet")
                    continue
                if item.sha256 != m.get("sha256"):
                    keep("the archived copy differs from the local segment")
                    continue
                problem = next((p for p in (store.verify_stored(o, now=now) for o in item.objects) if p), "")
                if problem:
                    keep(f"archive copy not verified: {problem}")
                    continue
                archive = {
                    "bucket": config.archive.bucket,
                    "objects": [o.to_json() for o in item.objects],
                    "retain_until": item.retain_until,
                }
            matching = [h for h in holds if any(h.matches(r) for r in scan_records(data))] if holds else []
            if matching:
                keep("under legal hold: " + "; ".join(h.describe() for h in matching))
                continue
            where = f"archived as {archive['objects'][0]['key']}" if archive else "not archived (not required)"
            out.append(
                Decision(wid, path.name, first, last, True, f"past retention (sealed {sealed}); {where}", m, archive)
            )
    return out


def ranges(decisions: list[Decision]) -> list[tuple[str, list[Decision]]]:
    """Consecutive removable segments of one writer, grouped: ``[(writer_id, [decision, ...]), ...]``."""
    out: list[tuple[str, list[Decision]]] = []
    prev: Decision | None = None
    for dec in decisions:
        if not dec.prune:
            prev = None
            continue
        if prev is not None and prev.writer_id == dec.writer_id and prev.last_seq + 1 == dec.first_seq:
            out[-1][1].append(dec)
        else:
            out.append((dec.writer_id, [dec]))
        prev = dec
    return out


def execute(config: Config, decisions: list[Decision], *, reason: str = "", operator: str = "") -> dict[str, Any]:
    """Append the signed event, record the ranges, delete the files. Returns the event's detail."""
    from vllm_audit.writer import append_events

    groups = ranges(decisions)
    prune_id = "prune-" + secrets.token_hex(4)
    detail_ranges: list[dict[str, Any]] = []
    marks: list[tuple[Path, PrunedRange]] = []
    root = Path(config.log.dir) / "writers"
    for wid, decs in groups:
        end_m = decs[-1].manifest
        start, end = decs[0].first_seq, decs[-1].last_seq + 1
        if int(end_m["tree_size"]) != end:
            raise ValueError(f"{wid}/{decs[-1].segment}: manifest tree_size {end_m['tree_size']} != {end}")
        pr = PrunedRange(
            start, end, end_m["last_leaf"], tuple(end_m["compact_range"]), tuple(d.segment for d in decs), prune_id
        )
        marks.append((root / wid, pr))
        detail_ranges.append(
            {
                "writer_id": wid,
                "start": start,
                "end": end,
                "last_leaf": pr.last_leaf,
                "compact_range": list(pr.compact_range),
                "segments": [
                    {
                        "segment": d.segment,
                        "first_seq": d.first_seq,
                        "last_seq": d.last_seq,
                        "sha256": d.manifest["sha256"],
                        "merkle_root": d.manifest["merkle_root"],
                        "sealed_at": d.manifest.get("sealed_at"),
                        "archive": d.archive,
                    }
                    for d in decs
                ],
            }
        )
    chain = chain_holds(config)  # what the chain's events state (up to each writer's durable position)
    detail = {
        "prune_id": prune_id,
        "operator": operator or getpass.getuser(),
        "reason": reason,
        "retention_days": config.retention.days,
        # Every hold known (active or released) when this ran: what was honoured, and what a
        # rescan still finds if the segments holding the hold events are pruned later.
        "holds": [h.to_json() for h in sorted(chain.holds.values(), key=lambda h: h.hold_id)],
        "ranges": detail_ranges,
        # Every range the chain's earlier prune events record (their own and what they carried):
        # taken from the signed events, not from pruned.jsonl, so a line added to that file is
        # never signed into the chain by a later prune.
        "earlier_ranges": [dict(r.to_json(), writer_id=w) for w, r in chain.pruned_ranges()],
        "entries": sum(int(r["end"]) - int(r["start"]) for r in detail_ranges),
    }
    if not groups:
        return detail
    append_events(config, [{"record_type": "event", "event": EVENT, "detail": detail}])
    for wdir, pr in marks:
        fd = os.open(wdir / PRUNED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(fd, orjson.dumps(pr.to_json()) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        for seg in pr.segments:
            for name in (seg, codec.manifest_name(seg)):
                try:
                    (wdir / name).unlink()
                except FileNotFoundError:
                    pass
        fsync_dir(wdir)
    return detail
