"""The WORM archive: a projection that copies every sealed segment to S3 under Object Lock.

For each writer, once the log has been read past a segment's last entry (so the segment is
sealed and its manifest written) and a signed checkpoint covers it, three objects are stored:

- ``<prefix>/<writer_id>/seg-<first>.jsonl``: the segment's bytes as they are on disk;
- ``<prefix>/<writer_id>/seg-<first>.checkpoints.jsonl``: every checkpoint line whose tree size
  falls in the segment, up to and including the first one that covers its last entry;
- ``<prefix>/<writer_id>/seg-<first>.manifest.json``: the manifest, written last (an archived
  segment is one whose manifest object exists).

Each object is locked (``[archive] lock_mode``) until the segment's sealing time plus the
retention, checked on upload (Content-MD5 and SHA-256) and read back. The projection's cursor is
committed only after every segment the batch completed is archived, and the archive index
(``<state dir>/archive/index.json``, what ``vllm-audit prune`` consults) is written after each
segment, so a crash at any point re-uploads at most one segment, and an identical object already
in the bucket is recognised rather than stored again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit._fs import replace_file
from vllm_audit.archive.holds import Hold, HoldStore, holds_path
from vllm_audit.archive.s3 import ArchiveError, ObjectStore, StoredObject
from vllm_audit.config import Config
from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, parse_body, parse_note_line, split_note
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor, list_segments, read_manifest
from vllm_audit.ship.base import Context, CursorFile, Projection

NAME = "archive"


class NotCoveredYet(Exception):
    """A sealed segment waits for a signed checkpoint covering its last entry (retried)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ArchivedSegment:
    """What the archive holds for one sealed segment (an entry of the archive index)."""

    writer_id: str
    segment: str
    first_seq: int
    last_seq: int
    sha256: str
    sealed_at: str
    retain_until: str
    archived_at: str
    segment_object: StoredObject
    manifest_object: StoredObject
    checkpoints_object: StoredObject
    #: Tenants, users and the record time range in the segment (for holds and exports).
    orgs: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    first_time: str = ""
    last_time: str = ""

    @property
    def objects(self) -> tuple[StoredObject, StoredObject, StoredObject]:
        return (self.segment_object, self.checkpoints_object, self.manifest_object)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["orgs"], d["users"] = list(self.orgs), list(self.users)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArchivedSegment:
        d = dict(d)
        for k in ("segment_object", "manifest_object", "checkpoints_object"):
            d[k] = StoredObject(**d[k])
        d["orgs"], d["users"] = tuple(d.get("orgs", ())), tuple(d.get("users", ()))
        return cls(**d)


class ArchiveIndex:
    """``{writer_id: {segment: ArchivedSegment}}`` in one JSON file, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, dict[str, ArchivedSegment]] = {}

    def load(self) -> ArchiveIndex:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            raw = {}
        except orjson.JSONDecodeError as exc:
            raise ArchiveError(f"archive index {str(self.path)!r} is not valid JSON: {exc}") from None
        try:
            self.items = {
                wid: {seg: ArchivedSegment.from_json(v) for seg, v in segs.items()} for wid, segs in raw.items()
            }
        except (TypeError, KeyError, AttributeError) as exc:
            raise ArchiveError(f"archive index {str(self.path)!r} is malformed: {exc}") from None
        return self

    def get(self, writer_id: str, segment: str) -> ArchivedSegment | None:
        return self.items.get(writer_id, {}).get(segment)

    def add(self, item: ArchivedSegment) -> None:
        self.items.setdefault(item.writer_id, {})[item.segment] = item
        replace_file(
            self.path,
            orjson.dumps(
                {w: {s: v.to_json() for s, v in sorted(segs.items())} for w, segs in sorted(self.items.items())}
            ),
        )

    def all(self) -> list[ArchivedSegment]:
        return [v for segs in self.items.values() for v in segs.values()]


def index_path(state_dir: Path) -> Path:
    return state_dir / NAME / "index.json"


def parse_time(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def covering_checkpoints(writer_dir: Path, first: int, last: int) -> bytes | None:
    """Checkpoint lines with ``first < size``, up to the first with ``size > last``; None if none covers."""
    try:
        data = (writer_dir / CHECKPOINTS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    out = []
    for raw in data.split(b"\n")[:-1]:
        try:
            size = parse_body(split_note(parse_note_line(raw))[0]).size
        except (ValueError, orjson.JSONDecodeError):
            continue
        if size > first:
            out.append(raw + b"\n")
        if size > last:
            return b"".join(out)
    return None


def scan_records(data: bytes) -> list[dict[str, Any]]:
    """The parsed inference and event entries of a segment's bytes (torn tail ignored)."""
    good, _torn = codec.split_torn(data)
    out = []
    for line in codec.split_lines(good):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def held_by(records: Sequence[dict[str, Any]], holds: Sequence[Hold]) -> list[Hold]:
    return [h for h in holds if any(h.matches(r) for r in records)]


class SegmentArchiver:
    """Uploads sealed segments of a log directory (used by the projection and by tests/tools)."""

    def __init__(self, config: Config, state_dir: Path, store: ObjectStore | None = None) -> None:
        self.config = config
        self.log_dir = Path(config.log.dir)
        self.store = store or ObjectStore(config.archive)
        self.index = ArchiveIndex(index_path(state_dir)).load()
        self.holds = HoldStore(holds_path(config))
        self.retain_days = config.archive.retain_days or config.retention.days

    def archive_until(self, writer_id: str, end: int) -> int:
        """Archive every sealed segment of ``writer_id`` whose entries all lie below ``end``; returns how many."""
        d = self.log_dir / "writers" / writer_id
        done = 0
        for _first, path in list_segments(d):
            if self.index.get(writer_id, path.name) is not None:
                continue
            m = read_manifest(path)
            if m is None or m["last_seq"] >= end:
                break
            self.archive_segment(writer_id, path, m)
            done += 1
        return done

    def archive_segment(self, writer_id: str, path: Path, m: dict[str, Any]) -> ArchivedSegment:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != m.get("sha256"):
            raise ArchiveError(f"{writer_id}/{path.name} does not match its manifest's sha256: not archived (verify)")
        first, last = int(m["first_seq"]), int(m["last_seq"])
        cps = covering_checkpoints(path.parent, first, last)
        if cps is None:
            raise NotCoveredYet(f"{writer_id}/{path.name} waits for a signed checkpoint covering entry {last}")
        records = scan_records(data)
        holds = held_by(records, self.holds.active())
        sealed_at = str(m.get("sealed_at") or _iso(dt.datetime.now(dt.UTC)))
        now = dt.datetime.now(dt.UTC)
        until = max(parse_time(sealed_at) + dt.timedelta(days=self.retain_days), now + dt.timedelta(days=1))
        until = until.replace(microsecond=0)
        store = self.store
        manifest_bytes = path.with_name(codec.manifest_name(path.name)).read_bytes()
        stem = path.name[: -len(codec.SEGMENT_SUFFIX)]
        seg_obj = store.put(store.key(writer_id, path.name), data, until, legal_hold=bool(holds))
        cp_obj = store.put(store.key(writer_id, stem + ".checkpoints.jsonl"), cps, until, legal_hold=bool(holds))
        man_obj = store.put(
            store.key(writer_id, codec.manifest_name(path.name)), manifest_bytes, until, legal_hold=bool(holds)
        )
        times = sorted(t for r in records if isinstance(t := r.get("timestamp"), str))
        item = ArchivedSegment(
            writer_id,
            path.name,
            first,
            last,
            sha,
            sealed_at,
            _iso(until),
            _iso(now),
            seg_obj,
            man_obj,
            cp_obj,
            tuple(sorted({o for r in records if isinstance(o := r.get("org_id"), str)})),
            tuple(sorted({u for r in records if isinstance(u := r.get("user_id"), str)})),
            times[0] if times else "",
            times[-1] if times else "",
        )
        self.index.add(item)
        return item


class ArchiveProjection(Projection):
    """Drives :class:`SegmentArchiver` from the runner: the log read past a segment means it is sealed."""

    name = NAME
    kind = "archive"
    batch_max = 100_000

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.cursor_file = CursorFile(state_dir / NAME / "cursors.json")
        self.archiver: SegmentArchiver | None = None

    def open(self) -> None:
        store = ObjectStore(self.config.archive)
        store.ensure_bucket()
        self.archiver = SegmentArchiver(self.config, self.state_dir, store)

    def load_cursors(self) -> dict[str, Cursor]:
        return self.cursor_file.load()

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        if self.archiver is None:
            self.open()
        assert self.archiver is not None
        last = entries[-1]
        self.archiver.archive_until(writer_id, last.seq + 1)
        self.cursor_file.commit(Cursor(writer_id, last.seq + 1, last.leaf_hex))

    def close(self) -> None:
        self.archiver = None
