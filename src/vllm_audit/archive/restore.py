"""Restore from the WORM archive: sealed segments back into a log directory ``LogReader`` reads.

``restore(config, writer_id, from_seq, to_seq, into)`` lays out ``<into>/writers/<writer_id>/``
exactly like the live log (segment files, their manifests, ``checkpoints.jsonl``) for every
segment holding an entry of ``[from_seq, to_seq)``, and when the first restored segment does not
start at 0, a ``pruned.jsonl`` line for the entries before it (with the compact range of the tree
there, from the preceding segment's manifest), so that readers and the export go on from it.

Each archived object is refused, by name, unless it is what was recorded:

1. its bytes hash to the SHA-256 the archive index recorded at upload (and the server reports);
2. the segment hashes to its manifest's ``sha256`` and the manifest names that segment and seqs;
3. after the layout, every entry is read back through ``LogReader`` (header, ``seq``, ``prev``
   links across segments, from the leaf before the first one), the Merkle tree is rebuilt from
   the preceding compact range plus every leaf, and must give each manifest's compact range and
   the root of every checkpoint whose size falls in the restored range; with public keys given,
   each of those checkpoints' signatures must verify. The segments up to the first signed
   checkpoint at or after the last restored entry are laid out and checked too, so the last
   segment does not rest on its own manifest.

So an object changed in the archive (or a forged index that points at another version) is named,
and a consistent forgery of segment, manifest and index still fails against the signed roots.

``restore_view(config, into, from_seqs)`` is the export's use: a directory with every writer of the
live log (local files symlinked, not copied) where the pruned segments at or after each writer's
``from_seqs`` entry are restored from the archive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson

from vllm_audit.archive.projection import ArchivedSegment, ArchiveIndex, index_path
from vllm_audit.archive.s3 import ObjectStore, StoredObject
from vllm_audit.config import Config
from vllm_audit.errors import AuditError
from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import (
    CHECKPOINTS_FILE,
    NoteError,
    open_checkpoint,
    parse_body,
    parse_note_line,
    split_note,
)
from vllm_audit.integrity.keys import VerifierKey
from vllm_audit.integrity.merkle import CompactRange
from vllm_audit.integrity.reader import (
    PRUNED_FILE,
    ChainBreak,
    Cursor,
    LogReader,
    PrunedRange,
    list_segments,
    read_manifest,
    read_pruned,
)
from vllm_audit.ship.config import state_dir

#: ``prune_id`` of the pruned.jsonl line a restore writes for the entries before what it restored.
NOT_RESTORED = "not-restored"


class RestoreError(AuditError):
    """A restore cannot be done or an archived object is not what was recorded (the message names it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentRef:
    """One sealed segment of a writer and where its bytes are (local file and/or archive index entry)."""

    segment: str
    first_seq: int
    last_seq: int
    local: Path | None
    archived: ArchivedSegment | None


@dataclasses.dataclass(frozen=True, slots=True)
class RestoredSegment:
    writer_id: str
    segment: str
    first_seq: int
    last_seq: int
    #: "archive" (downloaded and verified) or "local" (linked from the live log).
    source: str
    bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreResult:
    into: Path
    segments: tuple[RestoredSegment, ...]
    #: Entries read back and checked (links and Merkle tree).
    entries: int
    #: Checkpoints whose root was recomputed (and signature verified, when keys were given).
    checkpoints: int
    seconds: float

    @property
    def archive_bytes(self) -> int:
        return sum(s.bytes for s in self.segments if s.source == "archive")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def writer_segments(config: Config, writer_id: str, index: ArchiveIndex) -> list[SegmentRef]:
    """Every sealed segment the writer ever had, local or pruned (pruned ones must be in the index)."""
    wdir = Path(config.log.dir) / "writers" / writer_id
    refs: dict[str, SegmentRef] = {}
    for first, path in list_segments(wdir):
        m = read_manifest(path)
        if m is None:
            continue  # the active segment: not archived, not restorable
        refs[path.name] = SegmentRef(path.name, first, int(m["last_seq"]), path, index.get(writer_id, path.name))
    for item in index.items.get(writer_id, {}).values():
        if item.segment not in refs:
            refs[item.segment] = SegmentRef(item.segment, item.first_seq, item.last_seq, None, item)
    for r in read_pruned(wdir):
        for name in r.segments:
            if name not in refs:
                start = codec.segment_first_seq(name)
                raise RestoreError(
                    f"{writer_id}/{name} (entries from {start}) was pruned but the archive index "
                    f"({index.path}) does not list it: it cannot be restored"
                )
    return sorted(refs.values(), key=lambda s: s.first_seq)


def _checkpoint_lines(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            out.append((parse_body(split_note(parse_note_line(raw))[0]).size, raw))
        except (ValueError, orjson.JSONDecodeError):
            continue
    return out


class _Fetcher:
    """Downloads an archived segment's objects and checks each against what was recorded."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def get(self, obj: StoredObject, what: str) -> bytes:
        data = self.store.get(obj.key, obj.version_id)
        got = _sha(data)
        if got != obj.sha256:
            raise RestoreError(
                f"archive object {obj.key} (version {obj.version_id}, the {what}) has sha256 {got[:16]}..., "
                f"recorded {obj.sha256[:16]}... at upload: refused"
            )
        return data

    def segment(self, writer_id: str, item: ArchivedSegment) -> tuple[bytes, bytes, bytes]:
        seg = self.get(item.segment_object, "segment")
        man = self.get(item.manifest_object, "manifest")
        cps = self.get(item.checkpoints_object, "checkpoints")
        m = codec.parse_manifest(man, item.segment)
        name = f"{writer_id}/{item.segment}"
        if m is None:
            raise RestoreError(f"archive object {item.manifest_object.key} is not the manifest of {name}: refused")
        if m.get("sha256") != _sha(seg) or m.get("sha256") != item.sha256:
            raise RestoreError(
                f"archive object {item.segment_object.key}: the segment does not hash to its manifest's sha256 "
                f"({str(m.get('sha256'))[:16]}...): refused"
            )
        if (int(m["first_seq"]), int(m["last_seq"])) != (item.first_seq, item.last_seq) or m.get(
            "writer_id", writer_id
        ) != writer_id:
            raise RestoreError(f"archive object {item.manifest_object.key} describes other entries than {name}")
        return seg, man, cps


def _link(src: Path, dst: Path) -> None:
    try:
        dst.unlink()
    except FileNotFoundError:
        pass
    os.symlink(src.resolve(), dst)


def _prefix_before(
    config: Config, writer_id: str, refs: Sequence[SegmentRef], first: int, fetch: _Fetcher | None
) -> PrunedRange | None:
    """What precedes the entries from ``first``: ``[0, first)`` with the tree's compact range there."""
    if first == 0:
        return None
    prev = next((r for r in reversed(refs) if r.first_seq < first), None)
    m: Mapping[str, object] | None = None
    if prev is not None and prev.local is not None:
        m = read_manifest(prev.local)
    if m is None and prev is not None and prev.archived is not None and fetch is not None:
        m = codec.parse_manifest(fetch.get(prev.archived.manifest_object, "manifest"), prev.segment)
    if m is not None and int(str(m["tree_size"])) == first:
        cr = m["compact_range"]
        assert isinstance(cr, list)
        return PrunedRange(0, first, str(m["last_leaf"]), tuple(str(h) for h in cr), (), NOT_RESTORED)
    wdir = Path(config.log.dir) / "writers" / writer_id
    for r in read_pruned(wdir):
        if r.end == first:
            return PrunedRange(0, first, r.last_leaf, r.compact_range, (), NOT_RESTORED)
    raise RestoreError(
        f"writer {writer_id}: nothing gives the tree before entry {first} (no manifest of the segment before)"
    )


def restore(
    config: Config,
    writer_id: str,
    from_seq: int,
    to_seq: int | None,
    into: str | os.PathLike[str],
    *,
    store: ObjectStore | None = None,
    keys: Sequence[VerifierKey] = (),
    local: bool = False,
) -> RestoreResult:
    """Restore the sealed segments of ``writer_id`` holding entries ``[from_seq, to_seq)`` into ``into``.

    ``to_seq`` None: up to the last sealed segment (the last archived one, without ``local``).
    ``local``: link segments still on the local disk instead of downloading them (the export's
    view); otherwise every segment comes from the archive and one it does not hold is named.
    """
    t0 = time.perf_counter()
    if from_seq < 0 or (to_seq is not None and to_seq <= from_seq):
        raise RestoreError(f"--from-seq {from_seq} / --to-seq {to_seq}: need 0 <= from-seq < to-seq")
    index = ArchiveIndex(index_path(state_dir(config.ship, config.log.dir))).load()
    refs = writer_segments(config, writer_id, index)
    wanted = [r for r in refs if r.last_seq >= from_seq and (to_seq is None or r.first_seq < to_seq)]
    while to_seq is None and not local and wanted and wanted[-1].archived is None:
        wanted.pop()  # "everything": up to the last archived segment (newer ones are not uploaded yet)
    if not wanted:
        raise RestoreError(f"writer {writer_id}: no sealed segment holds entries from {from_seq}")
    for a, b in zip(wanted, wanted[1:], strict=False):
        if a.last_seq + 1 != b.first_seq:
            raise RestoreError(f"writer {writer_id}: no segment holds entries {a.last_seq + 1}..{b.first_seq - 1}")
    if to_seq is not None and wanted[-1].last_seq + 1 < to_seq:
        raise RestoreError(
            f"writer {writer_id}: sealed segments end at entry {wanted[-1].last_seq}; {to_seq - 1} is not sealed yet"
        )
    need_archive = any(not (local and r.local is not None) for r in wanted)
    if need_archive and store is None:
        if not config.archive.enabled:
            raise RestoreError("no [archive] bucket is configured")
        store = ObjectStore(config.archive)
    fetch = _Fetcher(store) if store is not None else None
    wdir = Path(into) / "writers" / writer_id
    wdir.mkdir(parents=True, exist_ok=True)
    out: list[RestoredSegment] = []
    cps: dict[bytes, int] = {}

    def lay_out(ref: SegmentRef, *, prefer_local: bool, allow_local: bool) -> None:
        if ref.local is not None and (prefer_local or (allow_local and ref.archived is None)):
            _link(ref.local, wdir / ref.segment)
            _link(ref.local.with_name(codec.manifest_name(ref.segment)), wdir / codec.manifest_name(ref.segment))
            out.append(RestoredSegment(writer_id, ref.segment, ref.first_seq, ref.last_seq, "local", 0))
            return
        if ref.archived is None or fetch is None:
            raise RestoreError(f"{writer_id}/{ref.segment} (entries {ref.first_seq}..{ref.last_seq}) is not archived")
        seg, man, cp = fetch.segment(writer_id, ref.archived)
        (wdir / ref.segment).write_bytes(seg)
        (wdir / codec.manifest_name(ref.segment)).write_bytes(man)
        for size, raw in _checkpoint_lines(cp):
            cps.setdefault(raw, size)
        out.append(RestoredSegment(writer_id, ref.segment, ref.first_seq, ref.last_seq, "archive", len(seg)))

    for ref in wanted:
        lay_out(ref, prefer_local=local, allow_local=local)
    live = Path(config.log.dir) / "writers" / writer_id / CHECKPOINTS_FILE
    if local and live.exists():
        for size, raw in _checkpoint_lines(live.read_bytes()):
            cps.setdefault(raw, size)
    # The last restored segment is checked against the first signed checkpoint at or after its
    # end; when that lies further on, the segments up to it are laid out too (archived, or linked
    # from the local disk; the active segment last), so no restored entry rests on its manifest alone.
    checked_refs = list(wanted)
    tail = wanted[-1].last_seq + 1
    cover = min((size for size in cps.values() if size >= tail), default=None)
    if cover is None:
        raise RestoreError(f"writer {writer_id}: no signed checkpoint covers entry {tail - 1} (refused)")
    following = iter([r for r in refs if r.first_seq >= tail])
    while tail < cover:
        nxt = next(following, None)
        if nxt is None or nxt.first_seq != tail:
            active = Path(config.log.dir) / "writers" / writer_id / codec.segment_name(tail)
            if not active.exists():
                raise RestoreError(
                    f"writer {writer_id}: entries {wanted[-1].first_seq}..{tail - 1} cannot be checked against "
                    f"the signed checkpoint of size {cover}: entries from {tail} are neither archived nor local"
                )
            _link(active, wdir / active.name)
            break
        if nxt.archived is None and nxt.local is None:
            raise RestoreError(f"{writer_id}/{nxt.segment} is neither archived nor local")
        lay_out(nxt, prefer_local=local, allow_local=True)
        checked_refs.append(nxt)
        tail = nxt.last_seq + 1
    (wdir / CHECKPOINTS_FILE).write_bytes(b"".join(raw + b"\n" for raw, _ in sorted(cps.items(), key=lambda x: x[1])))
    before = _prefix_before(config, writer_id, refs, wanted[0].first_seq, fetch)
    pruned = wdir / PRUNED_FILE
    pruned.write_bytes(orjson.dumps(before.to_json()) + b"\n" if before is not None else b"")
    entries, checked = _check(wdir.parent.parent, writer_id, checked_refs, before, cps, keys, cover)
    return RestoreResult(Path(into), tuple(out), entries, checked, time.perf_counter() - t0)


def _check(
    root: Path,
    writer_id: str,
    wanted: Sequence[SegmentRef],
    before: PrunedRange | None,
    cps: Mapping[bytes, int],
    keys: Sequence[VerifierKey],
    cover: int,
) -> tuple[int, int]:
    """Read the restored entries back (links) and rebuild the tree (manifests, checkpoint roots) up
    to ``cover``, the size of the first signed checkpoint at or after the last restored entry."""
    first = wanted[0].first_seq
    last = max(wanted[-1].last_seq, cover - 1)
    tree = CompactRange(first, [bytes.fromhex(h) for h in before.compact_range]) if before else CompactRange()
    prev_leaf = before.last_leaf if before else codec.ZERO_HASH
    ends = {}
    for ref in wanted:
        m = read_manifest(root / "writers" / writer_id / ref.segment)
        if m is None:
            raise RestoreError(f"{writer_id}/{ref.segment}: restored manifest is unreadable")
        ends[int(m["tree_size"])] = (ref.segment, m)
    roots: dict[int, list[tuple[bytes, str]]] = {}
    for raw, size in cps.items():
        if first <= size <= last + 1:
            note = parse_note_line(raw)
            if keys:
                try:
                    cp = open_checkpoint(note, keys)
                except NoteError as exc:
                    raise RestoreError(f"writer {writer_id}: restored checkpoint of size {size}: {exc}") from None
            else:
                cp = parse_body(split_note(note)[0])
            roots.setdefault(size, []).append((cp.root, cp.time))
    reader = LogReader(root, limit="all")
    cursor = Cursor(writer_id, first, prev_leaf)
    n = 0
    checked = 0
    for root_hash, when in roots.get(first, ()) if first else ():
        if root_hash != tree.root():
            raise RestoreError(
                f"writer {writer_id}: the tree before entry {first} does not give the signed root of the "
                f"checkpoint of size {first} ({when}): refused"
            )
        checked += 1
    try:
        while cursor.next_seq <= last:
            got = reader.read(cursor, 4096)
            if not got:
                break
            for e in got:
                if e.seq > last:
                    break
                tree.append(e.leaf)
                n += 1
                for root_hash, when in roots.get(tree.size, ()):
                    if root_hash != tree.root():
                        raise RestoreError(
                            f"writer {writer_id}: the restored entries do not give the signed root of the "
                            f"checkpoint of size {tree.size} ({when}): refused"
                        )
                    checked += 1
                end = ends.get(tree.size)
                if end is not None and [h.hex() for h in tree.hashes] != end[1]["compact_range"]:
                    raise RestoreError(
                        f"{writer_id}/{end[0]}: the restored entries do not give its manifest's Merkle tree: refused"
                    )
            cursor = cursor.after(got[-1])
    except ChainBreak as exc:
        seg = next((r.segment for r in wanted if r.first_seq <= exc.seq <= r.last_seq), "?")
        raise RestoreError(f"restored segment {writer_id}/{seg} refused: the chain does not link: {exc}") from None
    if tree.size < last + 1:
        raise RestoreError(
            f"writer {writer_id}: restored entries end at {tree.size - 1}; {last} was expected (the manifests "
            "and the checkpoint after them)"
        )
    return n, checked


def restore_view(
    config: Config,
    into: str | os.PathLike[str],
    from_seqs: Mapping[str, int],
    *,
    store: ObjectStore | None = None,
    keys: Sequence[VerifierKey] = (),
) -> list[RestoreResult]:
    """Every writer of the live log under ``into``; writers in ``from_seqs`` with their pruned
    segments from that entry on restored from the archive (the rest linked from the live log)."""
    src = Path(config.log.dir) / "writers"
    dst = Path(into) / "writers"
    dst.mkdir(parents=True, exist_ok=True)
    results = []
    for wid in LogReader(config.log.dir).writer_ids():
        if wid not in from_seqs:
            os.symlink((src / wid).resolve(), dst / wid, target_is_directory=True)
            continue
        res = restore(config, wid, from_seqs[wid], None, into, store=store, keys=keys, local=True)
        wdir = dst / wid
        sealed = {s.segment for s in res.segments}
        for _first, path in list_segments(src / wid):  # the active segment (and anything unsealed)
            if path.name not in sealed:
                _link(path, wdir / path.name)
        results.append(res)
    return results


def pruned_from(config: Config, t_from: str) -> dict[str, int]:
    """Per writer whose export window for ``t_from`` begins in a pruned range: the window's first entry.

    The window starts at the size of the last checkpoint signed before ``t_from`` (see
    docs/export.md); when that entry was pruned, the export needs a restore from there.
    """
    reader = LogReader(config.log.dir)
    out = {}
    for wid in reader.writer_ids():
        wdir = reader.writer_dir(wid)
        pruned = read_pruned(wdir)
        if not pruned:
            continue
        try:
            lines = _checkpoint_lines((wdir / CHECKPOINTS_FILE).read_bytes())
        except FileNotFoundError:
            continue
        lo = 0
        for _size, raw in lines:
            cp = parse_body(split_note(parse_note_line(raw))[0])
            if cp.time < t_from:
                lo = cp.size
        if any(r.end > lo for r in pruned):
            out[wid] = lo
    return out
