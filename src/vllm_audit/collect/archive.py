"""The central copy of every writer's log: the received lines written back into a LOGDIR layout.

``<archive_dir>/writers/<writer_id>/`` gets the writer's entries byte for byte, split into the
same segments as on the replica (a ``segment_sealed`` event names where a segment ended), a
manifest for each sealed segment whose seal the collector verified, and ``checkpoints.jsonl``
holding every signed note the chain carried as a ``checkpoint`` event. `vllm-audit verify
<archive_dir>` then checks the central copy exactly as it checks a replica's own log.

The archive's files are the truth about what it holds: on first use of a writer it reads the
last line of the last segment (a torn tail from a crash is cut off, it was never acknowledged),
and entries it already holds are skipped, so a batch redelivered after a crash is written once.
Writes happen under the collector's per-writer database lock, so collectors sharing one archive
directory never interleave a writer's lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from vllm_audit._fs import fsync_dir, write_all
from vllm_audit.integrity import codec
from vllm_audit.integrity.checkpoint import CHECKPOINTS_FILE, note_line
from vllm_audit.integrity.merkle import CompactRange
from vllm_audit.integrity.reader import list_segments

log = logging.getLogger("vllm_audit.collect")


@dataclasses.dataclass(slots=True)
class _Seg:
    path: Path
    first: int
    next_seq: int
    sha: Any  # hashlib object over the file's bytes
    size: int


class Archive:
    """Writes received entries under ``root/writers/<id>/`` (single-threaded use)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root) / "writers"
        self.root.mkdir(parents=True, exist_ok=True)
        self._segs: dict[str, _Seg] = {}
        self._dirty: set[Path] = set()
        self._gaps: set[str] = set()

    def _dir(self, wid: str) -> Path:
        return self.root / wid

    def _open(self, wid: str) -> _Seg:
        seg = self._segs.get(wid)
        d = self._dir(wid)
        if seg is not None:
            # Another collector sharing this directory may have written since: then re-read.
            segs = list_segments(d)
            if segs and segs[-1][1] == seg.path and _size(seg.path) == seg.size:
                return seg
            del self._segs[wid]
        d.mkdir(exist_ok=True)
        segs = list_segments(d)
        if not segs:
            path = d / codec.segment_name(0)
            path.touch()
            seg = _Seg(path, 0, 0, hashlib.sha256(), 0)
        else:
            first, path = segs[-1]
            data = path.read_bytes()
            good, torn = codec.split_torn(data)
            if torn:
                os.truncate(path, len(good))
            lines = codec.split_lines(good)
            seg = _Seg(path, first, first + len(lines), hashlib.sha256(good), len(good))
            if lines and path.with_name(codec.manifest_name(path.name)).exists():
                seg = self._new_segment(d, seg.next_seq)  # the last one is sealed: go on in a new one
        self._segs[wid] = seg
        return seg

    def _new_segment(self, d: Path, first: int) -> _Seg:
        path = d / codec.segment_name(first)
        with open(path, "ab"):
            pass
        self._dirty.add(d)
        return _Seg(path, first, first, hashlib.sha256(), 0)

    def next_seq(self, wid: str) -> int:
        return self._open(wid).next_seq

    def write(
        self,
        wid: str,
        lines: Sequence[tuple[int, bytes]],
        checkpoints: Sequence[str],
        sealed_trees: dict[int, CompactRange],
    ) -> None:
        """Append verified entries ``(seq, line)`` (skipping those already held) and their notes.

        ``sealed_trees`` maps the seq of a ``segment_sealed`` event that directly follows its
        segment to the compact range at the end of that segment (for the manifest).
        """
        seg = self._open(wid)
        todo = [(s, ln) for s, ln in lines if s >= seg.next_seq]
        if not todo:
            return
        if todo[0][0] != seg.next_seq:
            if wid not in self._gaps:
                log.warning(
                    "archive of writer %s holds entries up to %d but the next one received is %d: "
                    "the central copy has a gap",
                    wid,
                    seg.next_seq - 1,
                    todo[0][0],
                )
                self._gaps.add(wid)
            seg = self._new_segment(self._dir(wid), todo[0][0])
            self._segs[wid] = seg
        buf = bytearray()
        tail = codec.writer_tail(wid)
        for seq, line in todo:
            header = codec.parse_header(line, tail)
            body = header[2] if header is not None else len(line)
            if codec.record_type_at(line, body) == b"event" and b'"event":"segment_sealed"' in line:
                self._flush(seg, buf)
                buf.clear()
                seg = self._seal(wid, seg, seq, line, sealed_trees.get(seq))
            buf += line
            buf += b"\n"
            seg.next_seq = seq + 1
        self._flush(seg, buf)
        held = {s for s, _ in todo}
        new_notes = [n for n in checkpoints if _note_size(n) in held]  # a note's size is its event's seq
        if new_notes:
            p = self._dir(wid) / CHECKPOINTS_FILE
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                write_all(fd, b"".join(note_line(n) for n in new_notes))
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def _flush(self, seg: _Seg, buf: bytearray) -> None:
        if not buf:
            return
        fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(fd, buf)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        seg.sha.update(buf)
        seg.size += len(buf)

    def _seal(self, wid: str, seg: _Seg, seq: int, line: bytes, tree: CompactRange | None) -> _Seg:
        """The ``segment_sealed`` event at ``seq``: end the current segment where it says."""
        d = self._dir(wid)
        try:
            detail = orjson.loads(line).get("detail") or {}
        except (orjson.JSONDecodeError, AttributeError):
            detail = {}
        name, last = detail.get("segment"), detail.get("last_seq")
        if not isinstance(last, int) or name != seg.path.name or not seg.first <= last < seg.next_seq:
            return seg  # not about this segment (or already split): nothing to do
        if last < seg.next_seq - 1:
            # Entries after the segment's end were written into it already: move them to the next.
            data = seg.path.read_bytes()
            kept = codec.split_lines(data)
            cut = last - seg.first + 1
            head = b"".join(ln + b"\n" for ln in kept[:cut])
            rest = b"".join(ln + b"\n" for ln in kept[cut:])
            os.truncate(seg.path, len(head))
            nxt = self._new_segment(d, last + 1)
            nxt.next_seq = seg.next_seq
            self._flush(nxt, bytearray(rest))
            seg.sha, seg.size, seg.next_seq = hashlib.sha256(head), len(head), last + 1
            self._manifest(wid, seg, detail, None)
            self._segs[wid] = nxt
            return nxt
        self._manifest(wid, seg, detail, tree)
        nxt = self._new_segment(d, seq)
        self._segs[wid] = nxt
        return nxt

    def _manifest(self, wid: str, seg: _Seg, detail: dict[str, Any], tree: CompactRange | None) -> None:
        sha = seg.sha.hexdigest()
        os.chmod(seg.path, 0o444)
        if tree is None or detail.get("sha256") != sha:
            return  # not verifiable here (or the replica's segment ended torn): left unsealed
        lines = codec.split_lines(seg.path.read_bytes()[-65536:]) if seg.size else []
        last_leaf = codec.leaf_hash(lines[-1]).hex() if lines else codec.ZERO_HASH
        manifest = {
            "format": codec.MANIFEST_FORMAT,
            "writer_id": wid,
            "segment": seg.path.name,
            "first_seq": seg.first,
            "last_seq": seg.next_seq - 1,
            "count": seg.next_seq - seg.first,
            "bytes": seg.size,
            "sha256": sha,
            "last_leaf": last_leaf,
            "tree_size": tree.size,
            "merkle_root": tree.root().hex(),
            "compact_range": [h.hex() for h in tree.hashes],
            "torn_bytes": 0,
            "sealed_at": detail.get("sealed_at") or "",
        }
        mpath = seg.path.with_name(codec.manifest_name(seg.path.name))
        tmp = mpath.with_name(mpath.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            write_all(fd, codec.encode_manifest(manifest))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, mpath)
        fsync_dir(mpath.parent)

    def sync_dirs(self) -> None:
        for d in self._dirty:
            fsync_dir(d)
        self._dirty.clear()


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _note_size(note: str) -> int:
    parts = note.split("\n", 2)
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return -1
