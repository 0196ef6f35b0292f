"""The one reader of the local log: link-checked entries from a cursor, across segments and writers.

Everything downstream of the writer (query store, quota charging, sinks, archive, detector,
proofs, ingest) reads the log through :class:`LogReader`; the entry layout itself is known only to
:mod:`vllm_audit.integrity.codec`. A reader:

- lists the writers of a log directory on every call, so new writers (a restarted process, a new
  worker) are followed without a restart;
- reads one writer's entries from a :class:`Cursor` ``(writer_id, next_seq, last_leaf)`` across
  its segments, the live (unsealed) tail included, remembering where it stopped so tailing the
  active segment costs only the new bytes;
- checks every link: each entry's header must be well formed, carry the next ``seq`` and the
  previous entry's leaf hash as ``prev``. A break raises :class:`ChainBreak` (nothing after it is
  returned: a projection never ships an entry that does not chain);
- goes on over ranges removed by retention (``pruned.jsonl``, see :func:`pruned_run`): from the
  last of the ranges that lead, one after the other, to the next local segment, with that range's
  last leaf as the link (a cursor inside or before them starts at that segment);
- by default returns only entries covered by a signed checkpoint (``limit="signed"``): those are
  durable, so a projection never delivers an entry that a crash or a failed write could still
  take back. In the writing process the writer's own durable position is a tighter bound (see
  :meth:`LogReader.set_limit`).

Torn tails (an unterminated last line: a write in progress) are never returned.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, parse_body, parse_note_line, split_note


@dataclasses.dataclass(frozen=True, slots=True)
class Cursor:
    """How far a consumer has read one writer's chain: entries ``< next_seq`` are consumed.

    ``last_leaf`` is the leaf hash (hex) of entry ``next_seq - 1`` (``ZERO_HASH`` at the start;
    empty when unknown, e.g. a cursor kept by a store that records only the seq: then the first
    entry read is not link-checked against it).
    """

    writer_id: str
    next_seq: int = 0
    last_leaf: str = codec.ZERO_HASH

    def after(self, entry: codec.Entry) -> Cursor:
        return Cursor(self.writer_id, entry.seq + 1, entry.leaf_hex)

    def to_json(self) -> dict[str, object]:
        return {"writer_id": self.writer_id, "next_seq": self.next_seq, "last_leaf": self.last_leaf}

    @classmethod
    def from_json(cls, data: object) -> Cursor:
        if not isinstance(data, dict):
            raise ValueError("a cursor must be an object")
        wid, seq, leaf = data.get("writer_id"), data.get("next_seq"), data.get("last_leaf", "")
        if not isinstance(wid, str) or not isinstance(seq, int) or seq < 0 or not isinstance(leaf, str):
            raise ValueError(f"malformed cursor {data!r}")
        return cls(wid, seq, leaf)


class ChainBreak(Exception):
    """The chain does not continue as it must at ``seq`` (a modified, missing or foreign entry)."""

    def __init__(self, writer_id: str, seq: int, message: str) -> None:
        super().__init__(f"writer {writer_id} entry {seq}: {message} (run `vllm-audit verify`)")
        self.writer_id = writer_id
        self.seq = seq


@dataclasses.dataclass(slots=True)
class _Pos:
    """Where the last read of a writer stopped: segment path, byte offset, next seq, last leaf."""

    path: Path
    offset: int
    next_seq: int
    last_leaf: str


Limit = Callable[[str], int | None]


class LogReader:
    """Reads a log directory's chains (thread-compatible: one reader per consumer thread)."""

    def __init__(self, log_dir: str | os.PathLike[str], *, limit: str | Limit = "signed") -> None:
        self.log_dir = Path(log_dir)
        self.root = self.log_dir / "writers"
        self._pos: dict[str, _Pos] = {}
        self._extra: dict[str, Callable[[], int]] = {}
        if limit == "signed":
            self._limit: Limit = self.signed_size
        elif limit == "durable":
            self._limit = self.durable_size
        elif limit == "all":
            self._limit = lambda _wid: None
        elif callable(limit):
            self._limit = limit
        else:
            raise ValueError(f"limit must be 'signed', 'durable', 'all' or a callable, not {limit!r}")

    # -- directory ------------------------------------------------------------------------------

    def writer_ids(self) -> list[str]:
        """Every writer in the log directory now (new ones appear on the next call)."""
        try:
            return sorted(d.name for d in self.root.iterdir() if d.is_dir())
        except FileNotFoundError:
            return []

    def writer_dir(self, writer_id: str) -> Path:
        return self.root / writer_id

    def segments(self, writer_id: str) -> list[tuple[int, Path]]:
        """``(first_seq, path)`` of a writer's segment files, in order."""
        return list_segments(self.writer_dir(writer_id))

    def manifest(self, segment: Path) -> dict[str, Any] | None:
        return read_manifest(segment)

    # -- bounds ---------------------------------------------------------------------------------

    def set_limit(self, writer_id: str, durable: Callable[[], int]) -> None:
        """Bound ``writer_id`` by ``durable()`` (entries known durable) instead of its checkpoints."""
        self._extra[writer_id] = durable

    def limit(self, writer_id: str) -> int | None:
        """How many of a writer's entries may be returned (None: every complete line)."""
        extra = self._extra.get(writer_id)
        if extra is not None:
            return extra()
        return self._limit(writer_id)

    def durable_size(self, writer_id: str) -> int:
        """Entries known durable: the writer's published hint (``writers/<id>/durable``, rewritten
        after every fsync) or the last signed checkpoint, whichever is further."""
        signed = self.signed_size(writer_id)
        try:
            with open(self.writer_dir(writer_id) / "durable", "rb") as f:
                raw = f.read(64)
        except OSError:
            return signed
        digits = raw.strip()
        return max(signed, int(digits)) if digits.isdigit() else signed

    def signed_size(self, writer_id: str) -> int:
        """The tree size of the writer's last signed checkpoint (0 when none), signatures unchecked.

        Checkpoints are written after the entries they cover are fsynced, so this many entries are
        durable. (The verifier checks the signatures; a reader only needs the bound.)
        """
        path = self.writer_dir(writer_id) / CHECKPOINTS_FILE
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - 4096))
                data = f.read()
        except FileNotFoundError:
            return 0
        for line in reversed(data.split(b"\n")[:-1]):  # the unterminated last piece is in progress
            try:
                text, _ = split_note(parse_note_line(line))
                return parse_body(text).size
            except (ValueError, orjson.JSONDecodeError):
                continue
        return 0

    # -- reading --------------------------------------------------------------------------------

    def read(self, cursor: Cursor, max_entries: int = 1000) -> list[codec.Entry]:
        """Up to ``max_entries`` link-checked entries of ``cursor.writer_id`` from ``cursor.next_seq``.

        Returns ``[]`` when nothing new is readable yet. Raises :class:`ChainBreak` when the entry
        at the cursor (or one after it) does not chain.
        """
        wid = cursor.writer_id
        bound = self.limit(wid)
        if bound is not None:
            max_entries = min(max_entries, bound - cursor.next_seq)
        if max_entries <= 0:
            return []
        pos = self._position(cursor)
        if pos is None:
            return []
        tail = codec.writer_tail(wid)
        out: list[codec.Entry] = []
        segs = self.segments(wid)
        idx = next((i for i, (_, p) in enumerate(segs) if p == pos.path), None)
        if idx is None:
            self._pos.pop(wid, None)
            return []
        expect, last = pos.next_seq, pos.last_leaf
        while len(out) < max_entries and idx < len(segs):
            first, path = segs[idx]
            offset = pos.offset if path == pos.path else 0
            # Read what this call can use, not the rest of the segment: a reader catching up
            # would otherwise cut the same megabytes into lines once per batch.
            want = min(_READ_MAX, max(_READ_MIN, (max_entries - len(out)) * 4096))
            while True:
                data = _read_from(path, offset, want)
                good, _torn = codec.split_torn(data)
                more = len(data) == want  # stopped at the limit: what follows is unread, not torn
                if good or not more:
                    break
                want *= 2  # a line longer than the limit
            for line in codec.split_lines(good):
                offset += len(line) + 1
                try:
                    entry = self._check(line, tail, wid, expect, last)
                except ChainBreak:
                    if out:  # hand over what chains; the next call raises at the break
                        return out
                    raise
                if entry.seq < cursor.next_seq:  # before the cursor: skip (link kept for the next)
                    expect, last = entry.seq + 1, entry.leaf_hex
                    if expect == cursor.next_seq and cursor.last_leaf and last != cursor.last_leaf:
                        raise ChainBreak(wid, expect - 1, "the entry differs from the one the cursor was taken at")
                    self._pos[wid] = _Pos(path, offset, expect, last)
                    continue
                out.append(entry)
                expect, last = entry.seq + 1, entry.leaf_hex
                self._pos[wid] = _Pos(path, offset, expect, last)
                if len(out) >= max_entries:
                    break
            if len(out) >= max_entries:
                break
            if more:  # the rest of this segment, from where these lines ended
                pos = self._pos[wid]
                continue
            # At the end of this segment's complete lines: move on only when a later segment exists.
            if idx + 1 < len(segs):
                nxt_first, nxt_path = segs[idx + 1]
                if _torn:
                    break  # a torn sealed segment: the writer recovered; the next segment goes on
                if nxt_first != expect:
                    run = pruned_run(read_pruned(self.writer_dir(wid)), expect, nxt_first)
                    if run:  # ranges removed by retention, one after the other: go on after the last
                        expect, last = run[-1].end, run[-1].last_leaf
                if nxt_first != expect:
                    raise ChainBreak(wid, expect, f"segment {nxt_path.name} starts at {nxt_first}, expected {expect}")
                idx += 1
                self._pos[wid] = _Pos(nxt_path, 0, expect, last)
                pos = self._pos[wid]
                continue
            break
        return out

    def _check(self, line: bytes, tail: bytes, wid: str, expect: int, last: str) -> codec.Entry:
        try:
            entry = codec.decode(line, tail, wid)
        except codec.EntryError as exc:
            raise ChainBreak(wid, expect, str(exc)) from None
        if entry.seq != expect:
            raise ChainBreak(wid, expect, f"found seq {entry.seq}")
        if last and entry.prev != last:
            raise ChainBreak(wid, expect, "prev does not match the previous entry's leaf hash")
        return entry

    def _position(self, cursor: Cursor) -> _Pos | None:
        """Where to start reading for ``cursor`` (a remembered position, or a segment lookup)."""
        wid = cursor.writer_id
        pos = self._pos.get(wid)
        if pos is not None and pos.next_seq == cursor.next_seq:
            return pos
        segs = self.segments(wid)
        if not segs:
            return None
        pruned = read_pruned(self.writer_dir(wid))
        hole = next((r for r in pruned if r.start <= cursor.next_seq < r.end), None)
        after = next(((first, p) for first, p in segs if first > cursor.next_seq), None)
        if hole is not None and after is not None:
            # Entries from the cursor on were pruned (retention), possibly by several prunes whose
            # ranges follow one another: go on from the first kept segment, with the last range's state.
            run = pruned_run(pruned, hole.start, after[0])
            if run:
                pos = _Pos(after[1], 0, run[-1].end, run[-1].last_leaf)
                self._pos[wid] = pos
                return pos
        cands = [(first, p) for first, p in segs if first <= cursor.next_seq]
        if not cands:
            first, path = segs[0]
            raise ChainBreak(wid, cursor.next_seq, f"the log starts at {first} ({path.name}): entries before are gone")
        first, path = cands[-1]
        # Start at the segment's first entry; ``read`` skips entries before the cursor.
        prev = cursor.last_leaf if first == cursor.next_seq else ""
        if first == 0:
            prev = codec.ZERO_HASH
        pos = _Pos(path, 0, first, prev)
        self._pos[wid] = pos
        return pos

    def entries(self, writer_id: str, start: int = 0, *, batch: int = 4096) -> Iterator[codec.Entry]:
        """Every readable entry of a writer from ``start`` (link-checked), in order."""
        cur = Cursor(writer_id, start, codec.ZERO_HASH if start == 0 else "")
        while True:
            got = self.read(cur, batch)
            if not got:
                return
            yield from got
            cur = cur.after(got[-1])

    def entries_all(self, writer_id: str) -> Iterator[codec.Entry]:
        """Every complete entry of a writer, signed or not (for offline tools on a quiet log)."""
        saved = self._extra.get(writer_id)
        self._extra[writer_id] = lambda: 1 << 62
        try:
            yield from self.entries(writer_id)
        finally:
            if saved is None:
                self._extra.pop(writer_id, None)
            else:
                self._extra[writer_id] = saved


#: Per writer directory: the ranges whose segments retention removed, one JSON object per line
#: (written by ``vllm-audit prune`` before it deletes them; a signed event in the chain says the same).
PRUNED_FILE = "pruned.jsonl"


@dataclasses.dataclass(frozen=True, slots=True)
class PrunedRange:
    """Entries ``[start, end)`` of a writer were removed by retention (``vllm-audit prune``).

    ``last_leaf`` (hex) is the leaf hash of entry ``end - 1`` and ``compact_range`` the RFC 6962
    compact range of the writer's tree at size ``end`` (from the last pruned segment's manifest):
    what a reader and the verifier need to go on from ``end`` as if the entries were there.
    """

    start: int
    end: int
    last_leaf: str
    compact_range: tuple[str, ...]
    segments: tuple[str, ...] = ()
    prune_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "last_leaf": self.last_leaf,
            "compact_range": list(self.compact_range),
            "segments": list(self.segments),
            "prune_id": self.prune_id,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PrunedRange:
        if not isinstance(obj, dict):
            raise ValueError("a pruned range must be an object")
        start, end, leaf, cr = obj.get("start"), obj.get("end"), obj.get("last_leaf"), obj.get("compact_range")
        segs, pid = obj.get("segments", []), obj.get("prune_id", "")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise ValueError("a pruned range needs integers 0 <= start < end")
        if not isinstance(leaf, str) or len(leaf) != 64 or not isinstance(cr, list) or len(cr) != bin(end).count("1"):
            raise ValueError("a pruned range needs last_leaf and the compact range at its end")
        if not all(isinstance(h, str) and len(h) == 64 for h in cr) or not isinstance(pid, str):
            raise ValueError("malformed pruned range")
        if not isinstance(segs, list) or not all(isinstance(x, str) for x in segs):
            raise ValueError("malformed pruned range segments")
        return cls(start, end, leaf, tuple(cr), tuple(segs), pid)


def prune_event_ranges(detail: object) -> list[tuple[str, PrunedRange]]:
    """The ranges a ``retention.pruned`` event's ``detail`` records, as ``(writer_id, range)``.

    Its own ranges (``ranges``: segments as objects, ``prune_id`` from the event) and the earlier
    ones it carries forward (``earlier_ranges``: :meth:`PrunedRange.to_json` plus ``writer_id``), so
    the newest prune event still records a range whose first event was pruned since. A malformed
    range is left out (it records nothing).
    """
    if not isinstance(detail, dict):
        return []
    out: list[tuple[str, PrunedRange]] = []
    own, earlier = (detail.get(k) for k in ("ranges", "earlier_ranges"))
    listed = [(r, False) for r in own] if isinstance(own, list) else []
    listed += [(r, True) for r in earlier] if isinstance(earlier, list) else []
    for r, carried in listed:
        if not isinstance(r, dict) or not isinstance(r.get("writer_id"), str):
            continue
        obj = r
        if not carried:
            segs = r.get("segments")
            names = [x.get("segment") for x in segs if isinstance(x, dict)] if isinstance(segs, list) else []
            obj = dict(r, segments=[n for n in names if isinstance(n, str)], prune_id=detail.get("prune_id", ""))
        try:
            out.append((r["writer_id"], PrunedRange.from_json(obj)))
        except ValueError:
            continue
    return out


def read_pruned(writer_dir: Path, *, strict: bool = False) -> list[PrunedRange]:
    """A writer's pruned ranges, in order (malformed lines skipped, or ``ValueError`` when ``strict``)."""
    try:
        data = (writer_dir / PRUNED_FILE).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for n, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            out.append(PrunedRange.from_json(orjson.loads(raw)))
        except (ValueError, orjson.JSONDecodeError) as exc:
            if strict:
                raise ValueError(f"{writer_dir.name}/{PRUNED_FILE} line {n + 1}: {exc}") from None
    return sorted(out, key=lambda r: r.start)


def pruned_run(pruned: Sequence[PrunedRange], start: int, end: int) -> list[PrunedRange]:
    """The pruned ranges that, one after the other, cover exactly ``[start, end)`` (``[]`` if none do).

    A second prune usually removes the segments right after the first one's range, so two (or more)
    ranges meet with no local segment between them: ``[0, a)``, ``[a, b)``, the first segment at
    ``b``. Each range of the run starts where the previous one ends (the first at ``start``); the
    state at ``end`` (compact range, last leaf) is the last one's. A hole anywhere gives ``[]``.
    """
    run: list[PrunedRange] = []
    pos = start
    while pos < end:
        nxt = max((r for r in pruned if r.start == pos and r.end <= end), key=lambda r: r.end, default=None)
        if nxt is None:
            return []
        run.append(nxt)
        pos = nxt.end
    return run


_READ_MIN = 64 * 1024
_READ_MAX = 4 * 1024 * 1024


def _read_from(path: Path, offset: int, size: int = -1) -> bytes:
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read(size)


def list_segments(d: Path) -> list[tuple[int, Path]]:
    """``(first_seq, path)`` of the segment files in a writer directory, in order."""
    out = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    for name in names:
        first = codec.segment_first_seq(name)
        if first is not None:
            out.append((first, d / name))
    out.sort()
    return out


def read_manifest(segment: Path) -> dict[str, Any] | None:
    """A sealed segment's manifest when present and well formed (None otherwise)."""
    try:
        data = segment.with_name(codec.manifest_name(segment.name)).read_bytes()
    except OSError:
        return None
    return codec.parse_manifest(data, segment.name)
