"""One writer's hash chain, its segment files, its Merkle tree and its signed checkpoints.

Every process that writes records owns one chain (its writer id) in
``LOGDIR/writers/<writer_id>/`` and holds an exclusive ``flock`` on ``writer.lock`` there while
it lives. A process starting up first tries to adopt the chain of a writer that is no longer
alive (its lock is free), so a restarted gateway continues its chain instead of leaving a
trail of one-off writers; otherwise it creates a new writer.

Each entry is one line: ``{"seq":N,"prev":"<hex>","writer_id":"...","org_tag":"<hex>",...}``.
The leaf hash is ``SHA-256(0x00 || header || SHA-256(body))`` over the stored bytes (the codec's
tlog entry); ``prev`` is the previous entry's leaf hash, ``org_tag`` the entry's tenant commitment.
The chain keeps the RFC 6962 tree over its leaves as a compact range (O(log n) hashes), signs a
checkpoint every ``checkpoint_every_records`` entries / ``checkpoint_every_seconds`` and on every
idle heartbeat, seals full segments (read-only + manifest) and records every seal, start,
resume, stop and crash recovery as an ``"event"`` entry in the chain itself. Formats:
``docs/integrity.md``.

Writer-thread protocol (see ``docs/internals.md``)::

    chain.append(chain.pending_events() + entries) -> leaf hashes   # written, not yet durable
    chain.sync()                                                     # one fdatasync per batch
    chain.after_commit()                                             # checkpoint / rotate when due
    chain.heartbeat()                                                # when idle
    chain.close()
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import orjson

from vllm_audit._fs import fsync_dir as _fsync_dir
from vllm_audit._fs import write_all as _write_all
from vllm_audit.errors import KeyFileError, LogWriteError
from vllm_audit.integrity.checkpoint import (
    CHECKPOINTS_FILE,
    Checkpoint,
    note_line,
    parse_body,
    parse_note_line,
    sign_checkpoint,
    split_note,
)
from vllm_audit.integrity.codec import (
    MANIFEST_FORMAT,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    ZERO_HASH,
    EntryInput,
    encode_entries,
    encode_manifest,
    leaf_hash,
    manifest_name,
    parse_header,
    segment_first_seq,
    segment_name,
    split_lines,
    split_torn,
    writer_tail,
)
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import SigningKey, load_signing_key, write_private
from vllm_audit.integrity.merkle import CompactRange
from vllm_audit.integrity.reader import PRUNED_FILE, PrunedRange, list_segments, read_manifest, read_pruned

__all__ = [
    "SEGMENT_PREFIX",
    "SEGMENT_SUFFIX",
    "ZERO_HASH",
    "Chain",
    "leaf_hash",
    "list_segments",
    "manifest_name",
    "segment_first_seq",
    "segment_name",
    "split_torn",
]

log = logging.getLogger("vllm_audit.integrity")

QUARANTINE_DIR = "quarantine"
DURABLE_FILE = "durable"
KEYS_DIR = "keys"
AUTO_KEY = "signing.key"
AUTO_PUB = "signing.pub"
_SAFE_HOST = re.compile(r"[^A-Za-z0-9-]")

_sha256 = hashlib.sha256


def anchor_file(anchor_dir: str | os.PathLike[str], writer_id: str) -> Path:
    return Path(anchor_dir) / f"{writer_id}.{CHECKPOINTS_FILE}"


def new_writer_id() -> str:
    host = _SAFE_HOST.sub("-", socket.gethostname())[:32] or "host"
    return f"{host}-{secrets.token_hex(4)}"


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Chain:
    """Append-only chain of entries for one writer (not thread-safe: one writer thread owns it)."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        config: IntegrityConfig | None = None,
        *,
        signing_key: SigningKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or IntegrityConfig()
        self.clock = clock
        self.log_dir = Path(log_dir)
        self.root = self.log_dir / "writers"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogWriteError(f"Cannot create log directory {str(self.root)!r}: {exc.strerror}.") from None
        try:
            self.key = signing_key or self._load_key()
        except KeyFileError as exc:
            raise LogWriteError(f"Checkpoint signing key unusable: {exc}") from None
        self._signer = self.key.signer()
        self._lock_fd = -1
        self._durable_fd = -1
        self.writer_id = ""
        self.dir = self.root
        self.next_seq = 0
        self.last_hash = ZERO_HASH
        self.tree = CompactRange()
        self._fd = -1
        self._cp_fd = -1
        self._segment_path: Path | None = None
        self._segment_first = 0
        self._segment_bytes = 0
        self._segment_opened = 0.0
        self._segment_sha = _sha256()
        self._broken = False
        self._cp_size = -1
        self._cp_time = 0.0
        self._anchor_failed: set[str] = set()
        #: The last signed checkpoint note written (empty before the first one).
        self.last_checkpoint = ""
        # Tree size right after the last ``checkpoint`` event (see ``checkpoint``); -1: none yet.
        self._embedded_size = -1
        self._recovered: list[dict[str, Any]] = []
        # The pruned range the resumed state was taken from (checked against the signed roots).
        self._bridge: PrunedRange | None = None
        self._claim()

    @property
    def origin(self) -> str:
        return f"{self.config.origin_prefix}/{self.writer_id}"

    # -- key ----------------------------------------------------------------------------------

    def _load_key(self) -> SigningKey:
        if self.config.signing_key:
            return load_signing_key(self.config.signing_key)
        kdir = self.log_dir / KEYS_DIR
        path = kdir / AUTO_KEY
        if path.exists():
            return load_signing_key(path)
        try:
            kdir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(f"Cannot create {str(kdir)!r}: {exc.strerror}.") from None
        host = _SAFE_HOST.sub("-", socket.gethostname())[:32] or "host"
        key = SigningKey.generate(f"{self.config.origin_prefix}/{host}-autogen")
        try:
            write_private(path, key)
        except KeyFileError:
            if path.exists():  # another process won the race: use its key
                return load_signing_key(path)
            raise
        pub = kdir / AUTO_PUB
        pub.write_text(
            f"# auto-generated checkpoint key {key.verifier.label}\n"
            f"# fingerprint sha256:{key.verifier.fingerprint}\n{key.verifier.vkey()}\n",
            "utf-8",
        )
        log.warning(
            "No [integrity] signing_key configured: generated checkpoint signing key %s (public key %s). "
            "Anyone who can write the log directory can read this key; create a real one with "
            "`vllm-audit keygen --out PREFIX`, keep it off the log volume and set [integrity] signing_key.",
            path,
            pub,
        )
        return load_signing_key(path)

    # -- slot claiming ------------------------------------------------------------------------

    def _claim(self) -> None:
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and self._try_lock(d):
                self.writer_id = d.name
                try:
                    self._resume(d)
                except BaseException:
                    self._release()  # a chain that cannot be resumed stays free (and its lock too)
                    raise
                return
        while True:
            d = self.root / new_writer_id()
            try:
                d.mkdir()
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
            if self._try_lock(d):
                self.writer_id = d.name
                self._open_checkpoints()
                self._open_segment(0)
                self._event("writer_started", {"key": self.key.verifier.label})
                return

    def _try_lock(self, d: Path) -> bool:
        try:
            fd = os.open(d / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self.dir = d
        return True

    def _event(self, name: str, detail: Mapping[str, Any] | None = None) -> None:
        ev: dict[str, Any] = {"record_type": "event", "event": name, "timestamp": now_iso(self.clock())}
        if detail:
            ev["detail"] = dict(detail)
        self._recovered.append(ev)

    def _resume(self, d: Path) -> None:
        recovery: dict[str, Any] = {}
        torn_cp = self._open_checkpoints()
        if torn_cp:
            recovery["torn_checkpoints"] = torn_cp
        segments = list_segments(d)
        pruned = read_pruned(d)
        if not segments and pruned:
            self._refuse(f"every segment file is gone, but {PRUNED_FILE} records entries up to {pruned[-1].end - 1}")
        if segments and segments[0][0] > 0 and _pruned_gap(0, segments[0][0], pruned) is None:
            self._missing(0, *segments[0], pruned)  # checked even when the last manifest needs no prefix
        start, distrusted = self._resume_point(segments, pruned)
        if distrusted:
            recovery["manifests_distrusted"] = distrusted
        tail: Path | None = None
        for idx in range(start, len(segments)):
            first, path = segments[idx]
            data = path.read_bytes()
            good, torn = split_torn(data)
            self._continue_at(first, path, good, pruned)
            count = self._absorb(good)
            is_last = idx == len(segments) - 1
            if torn and not count:
                # Nothing but a torn write (a crash right after rotation): the whole file goes to
                # quarantine so the next segment can take its name.
                info = self._quarantine(path, 0, torn)
                path.unlink()
                recovery.setdefault("torn_segments", []).append(info)
                continue
            if torn:
                recovery.setdefault("torn_segments", []).append(self._quarantine(path, len(good), torn))
            if torn or not is_last:
                if count:
                    self._seal(path, first, count, data, torn=len(torn))
            else:
                tail = path
                self._segment_first = first
                self._segment_sha = _sha256(data)
        if self._bridge is not None:
            self._check_bridge(self._bridge)
        self._cp_size = self._last_checkpoint_size()
        if self._cp_size > self.next_seq:
            self._refuse(
                f"entries {self.next_seq}..{self._cp_size - 1} are covered by the last checkpoint in "
                f"{CHECKPOINTS_FILE} (tree size {self._cp_size}) but are not in the segment files"
            )
        if tail is not None and self.next_seq >= self._segment_first:
            self._open_segment(self._segment_first, path=tail)
        else:
            self._open_segment(self.next_seq)
        self._cp_time = self.clock()
        if recovery:
            log.warning("audit chain %s: recovered from a crash: %s", self.writer_id, recovery)
            self._event("recovery", recovery)
        else:
            self._event("writer_resumed", {"key": self.key.verifier.label})

    def _resume_point(self, segments: list[tuple[int, Path]], pruned: list[PrunedRange]) -> tuple[int, list[str]]:
        """Take the chain state from the last sealed segment's manifest, once it proves true.

        The manifest's compact range is what the resumed chain grows from, so it is checked before
        it is trusted: the segment's bytes must match its ``sha256``, size, count and seq range,
        and the compact range recomputed from the state before the segment plus this segment's
        leaves must equal the recorded one (one segment of hashing). The state before the segment
        is the previous manifest's; the empty tree for a segment at seq 0; or, when the entries
        before the segment were removed by retention, the compact range and last leaf of the
        ``pruned.jsonl`` range that ends where the segment starts (so that range is checked too:
        the segment's first ``prev`` must be its last leaf, and it must grow into the manifest's
        compact range). A manifest that fails is named in the recovery event and the state is
        rebuilt from the segments instead. Returns the index of the first segment still to absorb
        and the distrusted manifests.
        """
        distrusted: list[str] = []
        for i in range(len(segments) - 1, -1, -1):
            first, path = segments[i]
            m = _read_manifest(path)
            if m is None:
                continue
            prev = _read_manifest(segments[i - 1][1]) if i > 0 else None
            base: CompactRange | None = None
            base_last = ""
            if i == 0 and first == 0:
                base, base_last = CompactRange(), ZERO_HASH
            elif prev is not None and prev["tree_size"] == first:
                base = CompactRange(first, [bytes.fromhex(h) for h in prev["compact_range"]])
                base_last = prev["last_leaf"]
            elif i == 0 or (prev is not None and prev["tree_size"] < first):
                rng = _pruned_gap(prev["tree_size"] if prev is not None else 0, first, pruned)
                if rng is not None:
                    base, base_last = _pruned_state(rng), rng.last_leaf
                    self._bridge = rng
            if base is not None and _manifest_holds(path, m, first, base, base_last):
                self.tree = CompactRange(m["tree_size"], [bytes.fromhex(h) for h in m["compact_range"]])
                self.last_hash = m["last_leaf"]
                self.next_seq = m["tree_size"]
                return i + 1, distrusted
            if base is not None:
                distrusted.append(path.name)
                log.warning(
                    "audit chain %s: the manifest of %s does not match its segment; not trusted",
                    self.writer_id,
                    path.name,
                )
            # Without a usable previous manifest, rebuild from the start.
            break
        # Rebuild: absorb every sealed segment (their manifests stay as they are), going on after
        # each range that retention removed from the state it recorded (``_continue_at``).
        self._bridge = None
        self.tree = CompactRange()
        self.last_hash = ZERO_HASH
        self.next_seq = 0
        sealed = 0
        for first, path in segments:
            if _read_manifest(path) is None:
                break
            good, _torn = split_torn(path.read_bytes())
            self._continue_at(first, path, good, pruned)
            self._absorb(good)
            sealed += 1
        return sealed, distrusted

    def _continue_at(self, first: int, path: Path, good: bytes, pruned: list[PrunedRange]) -> None:
        """Before absorbing the segment ``path`` (first seq ``first``): bridge a pruned gap, or refuse.

        When entries ``[next_seq, first)`` are not in the segment files, the state at ``first`` is
        the compact range and last leaf of the ``pruned.jsonl`` range ending at ``first``, provided
        ranges cover the whole gap and the segment's first entry links to that last leaf. Anything
        else (no record of the removal, a malformed record, a segment that does not link to it,
        overlapping segments) raises ``LogWriteError``: going on from any other state would fork.
        """
        if first == self.next_seq:
            return
        if first < self.next_seq:
            self._refuse(f"{path.name} starts at {first}, but the segments before it end at {self.next_seq - 1}")
        rng = _pruned_gap(self.next_seq, first, pruned)
        if rng is None:
            self._missing(self.next_seq, first, path, pruned)
        lines = split_lines(good)
        if lines:
            header = parse_header(lines[0], writer_tail(self.writer_id))
            if header is None or header[0] != first or header[1].decode() != rng.last_leaf:
                self._refuse(
                    f"the first entry of {path.name} does not continue the pruned range {rng.start}..{rng.end - 1} "
                    f"recorded in {PRUNED_FILE} (its seq or prev differs from the range's end and last leaf)"
                )
        m = _read_manifest(path)
        if m is not None and not _manifest_holds(path, m, first, _pruned_state(rng), rng.last_leaf):
            self._refuse(
                f"the pruned range {rng.start}..{rng.end - 1} recorded in {PRUNED_FILE} and the manifest of "
                f"{path.name} disagree (the compact range grown from the range is not the manifest's)"
            )
        self.tree = _pruned_state(rng)
        self.last_hash = rng.last_leaf
        self.next_seq = rng.end
        self._bridge = rng

    def _check_bridge(self, rng: PrunedRange) -> None:
        """The state built on a pruned range, against the checkpoints signed over what follows it.

        Recomputes the tree from the range's compact range over every entry after it and compares
        the root at the size of each checkpoint in ``checkpoints.jsonl`` that lies in that span: a
        pruned range whose compact range was changed cannot give the roots signed before the prune
        (the only check there is when no sealed segment is left, just the open tail; a manifest
        forged to agree with a forged range fails it too). The signatures are ``vllm-audit
        verify``'s to check; this keeps the writer from signing new checkpoints over a state its
        earlier ones contradict. Costs one pass over the entries after the range.
        """
        roots = self._checkpoint_roots(rng.end, self.next_seq)
        if not roots:
            return
        tree = _pruned_state(rng)
        bad = -1
        if tree.size in roots and roots[tree.size] != tree.root():
            bad = tree.size
        for first, path in list_segments(self.dir):
            if bad >= 0 or first < rng.end:
                continue
            good, _torn = split_torn(path.read_bytes())
            for line in split_lines(good):
                tree.append(leaf_hash(line))
                want = roots.get(tree.size)
                if want is not None and want != tree.root():
                    bad = tree.size
                    break
        if bad >= 0:
            self._refuse(
                f"the tree grown from the pruned range {rng.start}..{rng.end - 1} in {PRUNED_FILE} does not give "
                f"the root of the checkpoint signed at tree size {bad}"
            )

    def _checkpoint_roots(self, lo: int, hi: int) -> dict[int, bytes]:
        """Roots of the checkpoints in ``checkpoints.jsonl`` whose tree size is in ``[lo, hi]``."""
        out: dict[int, bytes] = {}
        try:
            data = (self.dir / CHECKPOINTS_FILE).read_bytes()
        except OSError:
            return out
        for line in reversed(data.split(b"\n")):  # newest first; sizes never decrease down the file
            if not line:
                continue
            try:
                text, _ = split_note(parse_note_line(line))
                cp = parse_body(text)
            except (ValueError, orjson.JSONDecodeError):
                continue
            if cp.size < lo:
                break
            if cp.size <= hi:
                out.setdefault(cp.size, cp.root)
        return out

    def _missing(self, start: int, first: int, path: Path, pruned: list[PrunedRange]) -> NoReturn:
        """Refuse: entries from ``start`` up to the segment ``path`` are gone and no pruned range says why."""
        holes: list[str] = []
        pos = start
        for a, b in [*((r.start, r.end) for r in pruned), (first, first + 1)]:  # the segment itself last
            if b <= pos:
                continue
            if a > pos:
                holes.append(f"{pos}..{min(a, first) - 1}")
            pos = max(pos, b)
            if pos >= first:
                break
        problem = ""
        try:
            read_pruned(self.dir, strict=True)
        except ValueError as exc:  # name the damaged line: it may be the record that was needed
            problem = f" ({exc})"
        if holes:
            why = (
                f"entries {', '.join(holes)} are missing ({path.name} starts at {first}) and no range in {PRUNED_FILE}"
            )
            self._refuse(f"{why} records their removal{problem}")
        self._refuse(f"{path.name} starts at {first}, inside a range that {PRUNED_FILE} records as pruned{problem}")

    def _refuse(self, why: str) -> NoReturn:
        raise LogWriteError(
            f"Audit chain {self.writer_id} cannot be resumed: {why}. Refusing to append (going on from "
            f"another state would fork the chain); run `vllm-audit verify`."
        )

    def _absorb(self, good: bytes) -> int:
        """Feed complete stored lines into the chain state (resume)."""
        lines = split_lines(good)
        tree = self.tree
        for line in lines:
            tree.append(leaf_hash(line))
        if lines:
            self.last_hash = leaf_hash(lines[-1]).hex()
            header = parse_header(lines[-1], writer_tail(self.writer_id))
            seq = header[0] if header is not None else -1
            if seq != tree.size - 1:
                log.warning("audit chain %s: last entry has seq %s, expected %s", self.writer_id, seq, tree.size - 1)
        self.next_seq = tree.size
        return len(lines)

    def _quarantine(self, path: Path, offset: int, torn: bytes) -> dict[str, Any]:
        """Keep a copy of torn bytes (the segment itself is sealed as it is)."""
        qdir = self.dir / QUARANTINE_DIR
        qdir.mkdir(exist_ok=True)
        q = qdir / f"{path.name}.{offset}.torn"
        q.write_bytes(torn)
        return {
            "segment": path.name,
            "offset": offset,
            "bytes": len(torn),
            "sha256": _sha256(torn).hexdigest(),
            "quarantine": f"{QUARANTINE_DIR}/{q.name}",
        }

    # -- checkpoints file ---------------------------------------------------------------------

    def _open_checkpoints(self) -> dict[str, Any] | None:
        p = self.dir / CHECKPOINTS_FILE
        torn_info = None
        try:
            self._cp_fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            size = os.fstat(self._cp_fd).st_size
            if size:
                data = p.read_bytes()
                good, torn = split_torn(data)
                if torn:
                    torn_info = self._quarantine(p, len(good), torn)
                    os.write(self._cp_fd, b"\n")  # terminate the torn line; later lines stay whole
        except OSError as exc:
            raise LogWriteError(f"Cannot open {str(p)!r}: {exc.strerror}.") from None
        return torn_info

    def _last_checkpoint_size(self) -> int:
        p = self.dir / CHECKPOINTS_FILE
        data = p.read_bytes()
        for line in reversed(data.split(b"\n")):
            if not line:
                continue
            try:
                text, _ = split_note(parse_note_line(line))
                return parse_body(text).size
            except (ValueError, orjson.JSONDecodeError):
                continue
        return -1

    # -- segments -----------------------------------------------------------------------------

    def _open_segment(self, first_seq: int, path: Path | None = None) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        p = path or (self.dir / segment_name(first_seq))
        try:
            self._fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._segment_bytes = os.fstat(self._fd).st_size
        except OSError as exc:
            raise LogWriteError(f"Cannot open segment {str(p)!r}: {exc.strerror}.") from None
        if path is None:
            self._segment_sha = _sha256()
        self._segment_first = first_seq
        self._segment_path = p
        self._segment_opened = self.clock()
        _fsync_dir(self.dir)

    def _seal(self, path: Path, first: int, count: int, data: bytes | None = None, *, torn: int = 0) -> dict[str, Any]:
        """Make a segment read-only and write its manifest (both never change again)."""
        if data is not None:
            sha = _sha256(data).hexdigest()
            size = len(data)
        else:
            sha = self._segment_sha.hexdigest()
            size = self._segment_bytes
        manifest = {
            "format": MANIFEST_FORMAT,
            "writer_id": self.writer_id,
            "segment": path.name,
            "first_seq": first,
            "last_seq": first + count - 1,
            "count": count,
            "bytes": size,
            "sha256": sha,
            "last_leaf": self.last_hash,
            "tree_size": self.tree.size,
            "merkle_root": self.tree.root().hex(),
            "compact_range": [h.hex() for h in self.tree.hashes],
            "torn_bytes": torn,
            "sealed_at": now_iso(self.clock()),
        }
        os.chmod(path, 0o444)
        mpath = path.with_name(manifest_name(path.name))
        tmp = mpath.with_name(mpath.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            _write_all(fd, encode_manifest(manifest))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, mpath)
        _fsync_dir(self.dir)
        self._event(
            "segment_sealed",
            {k: manifest[k] for k in ("segment", "first_seq", "last_seq", "count", "sha256", "merkle_root")},
        )
        return manifest

    def _rotate(self) -> None:
        count = self.next_seq - self._segment_first
        if count <= 0 or self._segment_path is None:
            return
        try:
            os.fsync(self._fd)
            self._seal(self._segment_path, self._segment_first, count)
        except OSError as exc:
            raise LogWriteError(f"Cannot seal segment {str(self._segment_path)!r}: {exc.strerror}.") from None
        self._open_segment(self.next_seq)

    def _rotation_due(self) -> bool:
        if self._segment_bytes >= self.config.segment_max_bytes:
            return True
        age = self.config.segment_max_seconds
        return bool(age) and self.clock() - self._segment_opened >= age

    def pending_events(self) -> list[dict[str, Any]]:
        """Events the chain wants written first (start-up, resume, recovery, segment sealed)."""
        events, self._recovered = self._recovered, []
        return events

    # -- appending ----------------------------------------------------------------------------

    def _recover_from_write_error(self) -> None:
        """After a failed write, seal what is on disk (quarantining partial bytes) and go on."""
        assert self._segment_path is not None
        try:
            size = os.fstat(self._fd).st_size
            if size == self._segment_bytes:
                self._broken = False
                return
            data = self._segment_path.read_bytes()
            good, torn = data[: self._segment_bytes], data[self._segment_bytes :]
            info = self._quarantine(self._segment_path, len(good), torn)
            # The failed write was never acknowledged (its responses failed). Its bytes can hold
            # complete lines of entries that are written again below, so they are cut back to the
            # last committed entry; they stay in quarantine/ and the recovery event names them.
            # Nothing that was ever committed is touched.
            os.ftruncate(self._fd, len(good))
            os.fsync(self._fd)
            info["truncated"] = True
            self._seal(self._segment_path, self._segment_first, self.next_seq - self._segment_first, good)
            self._open_segment(self.next_seq)
        except OSError as exc:
            raise LogWriteError(f"Cannot recover segment {str(self._segment_path)!r}: {exc.strerror}.") from None
        self._broken = False
        self._event("recovery", {"torn_segments": [info], "cause": "write_error"})

    def append(self, entries: Iterable[EntryInput]) -> list[bytes]:
        """Seal and write entries (not yet durable: call ``sync``). Returns their leaf hashes.

        An entry is a mapping, ``(pre-encoded body, org_id)`` or a pre-encoded body alone (see
        :func:`~vllm_audit.integrity.codec.encode_entries`)."""
        if self._broken:
            self._recover_from_write_error()
            entries = [*self.pending_events(), *entries]
        seq = self.next_seq
        buf, leaves = encode_entries(entries, self.writer_id, seq, self.last_hash.encode())
        if not leaves:
            return leaves
        try:
            _write_all(self._fd, buf)
        except OSError as exc:
            self._broken = True
            raise LogWriteError(f"Cannot write segment {str(self._segment_path)!r}: {exc.strerror}.") from None
        # The compact range (inlined CompactRange.append: about one node hash per leaf).
        tree = self.tree
        hashes = tree.hashes
        n = tree.size
        for leaf in leaves:
            m = n
            node = leaf
            while m & 1:
                node = _sha256(b"\x01" + hashes.pop() + node).digest()
                m >>= 1
            hashes.append(node)
            n += 1
        tree.size = n
        self._segment_sha.update(buf)
        self.next_seq = seq + len(leaves)
        self.last_hash = leaves[-1].hex()
        self._segment_bytes += len(buf)
        return leaves

    def sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise LogWriteError(f"Cannot fsync segment {str(self._segment_path)!r}: {exc.strerror}.") from None
        self._publish_durable()

    def _publish_durable(self) -> None:
        """Tell readers in other processes how many entries are durable now (a hint, not fsynced).

        ``writers/<id>/durable`` holds the entry count as a fixed-width decimal, rewritten in place
        after every fsync. It only ever names entries already on disk, so a reader may ship up to
        it without waiting for the next signed checkpoint; a stale or missing hint only adds lag.
        """
        try:
            if self._durable_fd < 0:
                self._durable_fd = os.open(self.dir / DURABLE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._durable_fd, b"%020d\n" % self.next_seq, 0)
        except OSError:  # a hint: readers fall back to the signed checkpoints
            pass

    def after_commit(self) -> None:
        """Called after each durable batch: sign a checkpoint and rotate the segment when due."""
        size = self.tree.size
        if size != self._cp_size and (
            size - self._cp_size >= self.config.checkpoint_every_records
            or self.clock() - self._cp_time >= self.config.checkpoint_every_seconds
        ):
            self.checkpoint()
        if self._rotation_due():
            self._rotate()

    def heartbeat(self) -> None:
        """Called when the writer has been idle: write pending events, rotate by age, checkpoint."""
        if self._rotation_due():
            self._rotate()
        self._flush_pending()
        if self.tree.size != self._cp_size or self.clock() - self._cp_time >= 0.5 * self.config.heartbeat_seconds:
            self.checkpoint()

    def recover(self) -> None:
        """After a failed write: seal what is on disk, write the recovery events, fsync.

        Raises ``LogWriteError`` while the log still cannot be written (the writer probes with
        this when idle, so it becomes ready again without waiting for traffic).
        """
        if self._broken:
            self._recover_from_write_error()
        self._flush_pending()
        self.sync()

    def _flush_pending(self) -> None:
        events = self.pending_events()
        if events:
            self.append(events)
            self.sync()

    def checkpoint(self) -> str:
        """Sign a checkpoint over everything appended so far (call only when it is durable)."""
        now = self.clock()
        cp = Checkpoint(self.origin, self.tree.size, self.tree.root(), int(now * 1000))
        note = sign_checkpoint(cp, self._signer, self.key.name)
        line = note_line(note)
        try:
            _write_all(self._cp_fd, line)
            os.fdatasync(self._cp_fd)
        except OSError as exc:
            raise LogWriteError(f"Cannot write checkpoint for {self.writer_id}: {exc.strerror}.") from None
        for anchor in self.config.anchors:
            self._anchor(anchor, line)
        self._cp_size = cp.size
        self._cp_time = now
        self.last_checkpoint = note
        if self.config.embed_checkpoints and cp.size > self._embedded_size:
            self._embed_checkpoint(note, now)
        return note

    def _embed_checkpoint(self, note: str, now: float) -> None:
        """Append the signed note as a ``checkpoint`` event right after the entries it covers.

        So the chain itself carries its signed checkpoints to everything that reads or ships it
        (the collector checks the note's signature and root against its own compact range when the
        event arrives: the note's tree size is the event's seq). Only when entries other than such
        events were added since the last one, so idle heartbeats do not grow the log; the event is
        fsynced here, so the next checkpoint again covers only durable entries.
        """
        ev = {"record_type": "event", "event": "checkpoint", "timestamp": now_iso(now), "detail": {"note": note}}
        self.append([ev])
        self.sync()
        self._embedded_size = self.tree.size

    def _anchor(self, anchor: str, line: bytes) -> None:
        path = anchor_file(anchor, self.writer_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # an earlier write was torn: keep this checkpoint on its own line
                _write_all(fd, line)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if anchor not in self._anchor_failed:
                log.warning("cannot anchor checkpoint to %s: %s (will retry with every checkpoint)", path, exc)
                self._anchor_failed.add(anchor)
            return
        if anchor in self._anchor_failed:
            log.warning("anchoring checkpoints to %s works again", path)
            self._anchor_failed.discard(anchor)

    def close(self) -> None:
        """Record the stop, sign a final checkpoint, release the files and the lock."""
        try:
            if self._fd >= 0 and self._broken:
                # The last write failed part-way and no append came after it to recover: cut the
                # partial entry back now (quarantined, named by a recovery event), so a stopped
                # log verifies without waiting for the next start to do it.
                try:
                    self._recover_from_write_error()
                except LogWriteError as exc:
                    log.warning("audit chain %s: %s; the next start quarantines the partial entry", self.writer_id, exc)
            if self._fd >= 0 and not self._broken:
                self._event("writer_stopped")
                self._flush_pending()
                self.checkpoint()
                if self.tree.size != self._cp_size:  # sign over the embedded checkpoint event too
                    self.checkpoint()
        finally:
            self._release()

    def _release(self) -> None:
        for attr in ("_fd", "_cp_fd", "_lock_fd", "_durable_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                try:
                    os.close(fd)
                finally:
                    setattr(self, attr, -1)


def _read_manifest(segment: Path) -> dict[str, Any] | None:
    return read_manifest(segment)


def _pruned_state(rng: PrunedRange) -> CompactRange:
    return CompactRange(rng.end, [bytes.fromhex(h) for h in rng.compact_range])


def _covered_until(start: int, pruned: list[PrunedRange]) -> int:
    """How far from ``start`` the pruned ranges (sorted by start) cover the seqs without a hole."""
    pos = start
    for r in pruned:
        if r.start <= pos < r.end:
            pos = r.end
    return pos


def _pruned_gap(start: int, end: int, pruned: list[PrunedRange]) -> PrunedRange | None:
    """The pruned range that ends at ``end`` when pruned ranges cover all of ``[start, end)``."""
    rng = next((r for r in pruned if r.end == end), None)
    if rng is None or _covered_until(start, pruned) < end:
        return None
    return rng


def _manifest_holds(path: Path, m: dict[str, Any], first: int, base: CompactRange, base_last: str) -> bool:
    """Does the manifest describe the segment's bytes, continuing the chain state ``base``?"""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if m.get("sha256") != _sha256(data).hexdigest() or m.get("bytes") != len(data):
        return False
    good, torn = split_torn(data)
    lines = split_lines(good)
    count = len(lines)
    if m.get("torn_bytes", 0) != len(torn) or m.get("count") != count:
        return False
    if m.get("first_seq") != first or m.get("last_seq") != first + count - 1 or m.get("tree_size") != first + count:
        return False
    if not lines:
        return False
    header = parse_header(lines[0], writer_tail(path.parent.name))
    if header is None or header[1].decode() != base_last:
        return False
    tree = CompactRange(base.size, list(base.hashes))
    for line in lines:
        tree.append(leaf_hash(line))
    if [h.hex() for h in tree.hashes] != list(m.get("compact_range") or []):
        return False
    if m.get("merkle_root") != tree.root().hex() or m.get("last_leaf") != leaf_hash(lines[-1]).hex():
        return False
    return m.get("writer_id") in (None, path.parent.name)
