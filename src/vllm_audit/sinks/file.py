"""The ``file`` sink: JSON lines in Elastic Common Schema, rotated, for Filebeat / Fluent Bit tail.

One object per line (:func:`vllm_audit.sinks.ecs.to_ecs`, or the stored line as is with
``format = "stored"``), appended to ``<directory>/<file_name>``. Each batch is written with one
``write`` and made durable (``fdatasync``) before ``deliver`` returns, so the cursor is committed
only after the lines are on disk.

Exactly once: a crash after the write but before the cursor commit replays that batch. The runner
commits after every batch, so only the last batch written can be unacknowledged, and it is at the
end of the active file. On open the sink cuts a torn last line (a write the crash interrupted:
those entries are written again), reads the last complete line's ``writer_id`` / ``seq``
(``vllm_audit.writer_id`` / ``vllm_audit.seq`` in ECS) and skips entries of that writer up to that
seq. Nothing is written twice, nothing is lost.

Rotation (rename, as tail readers expect): before a batch, when the active file would pass
``max_bytes``, or when ``rotate_every_s`` is set and the wall-clock period (aligned to the epoch,
e.g. every hour on the hour) of the file's last write has ended, the active file is renamed to
``<stem>-<UTC time>.<ext>`` and a new one is started; the oldest rotated files beyond
``max_files`` are deleted. Rotation happens only when a batch arrives (an idle sink does not
rotate). If the active file is moved or deleted by someone else, the next batch starts it again
(the lines already written stay where they were moved).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson

from vllm_audit._fs import fsync_dir, write_all
from vllm_audit.integrity.codec import Entry
from vllm_audit.ship.base import Sink
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

#: How many bytes from the end of a file are read to find its last complete line (more are read
#: when one line is longer).
_TAIL_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "file"``: ECS JSON lines in a directory (tailed by Filebeat / Fluent Bit)."""

    #: Directory the files are written to (created when missing; relative to the config file).
    directory: str = ""
    #: Name of the active file; rotated files are ``<stem>-<UTC time><suffix>`` beside it.
    file_name: str = "vllm-audit.ecs.jsonl"
    #: "ecs": one Elastic Common Schema object per line; "stored": the stored log line as is.
    format: Literal["ecs", "stored"] = "ecs"
    #: Rotate before the active file would grow past this many bytes (0: no size rotation).
    max_bytes: int = 256 * 1024 * 1024
    #: Rotate when this many seconds' wall-clock period of the active file has ended (aligned
    #: to the epoch: 3600 rotates on the hour; 0: no time rotation).
    rotate_every_s: float = 0.0
    #: Rotated files kept (the oldest beyond this are deleted; 0: keep them all).
    max_files: int = 10
    #: Lines longer than this many bytes are quarantined instead of written (Filebeat's default
    #: ``max_bytes`` is 10 MiB; longer lines would be cut by the reader).
    max_line_bytes: int = 10 * 1024 * 1024
    #: ``fdatasync`` each batch before its cursor is committed (off: faster, and a power loss
    #: may lose lines the cursor already passed).
    fsync: bool = True

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.directory:
            raise ValueError("directory is required")
        if not self.file_name or "/" in self.file_name or self.file_name in (".", ".."):
            raise ValueError(f"file_name {self.file_name!r} must be a plain file name")
        for name in ("max_bytes", "max_files", "max_line_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.rotate_every_s < 0:
            raise ValueError("rotate_every_s must not be negative")


class FileSink(Sink):
    """Appends ECS JSON lines to a rotated file; exactly once across crashes (module docstring)."""

    kind = "file"

    def __init__(self, name: str, options: Options, directory: Path, state_dir: Path) -> None:
        super().__init__(name, state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        self.directory = directory
        self.path = directory / options.file_name
        stem, dot, ext = options.file_name.rpartition(".")
        self._stem, self._ext = (stem, dot + ext) if stem else (options.file_name, "")
        self._fd = -1
        self._size = 0
        self._period = -1
        #: ``writer_id`` and seq of the last line already in the file at open (the one batch that
        #: may be replayed); entries of that writer up to it are skipped.
        self._written: tuple[str, int] | None = None
        #: Entries skipped because they were already written (a replay after a crash).
        self.skipped = 0

    # -- files --------------------------------------------------------------------------------

    def open(self) -> None:
        if self._fd >= 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is being written by another process") from None
        try:
            self._size = _cut_torn_tail(fd)
            last = _last_line(fd, self._size)
            if last is None:
                newest = self.rotated_files()[-1:]
                if newest:
                    with open(newest[0], "rb") as f:
                        last = _last_line(f.fileno(), os.fstat(f.fileno()).st_size)
            self._written = _position(last) if last is not None else None
            if self._size and self.options.rotate_every_s:
                self._period = int(os.fstat(fd).st_mtime // self.options.rotate_every_s)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def rotated_files(self) -> list[Path]:
        """Rotated files, oldest first."""
        prefix = self._stem + "-"
        names = [
            n
            for n in os.listdir(self.directory)
            if n.startswith(prefix) and n.endswith(self._ext) and n != self.options.file_name
        ]
        return [self.directory / n for n in sorted(names)]

    def _rotate(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.directory / f"{self._stem}-{stamp}{self._ext}"
        n = 1
        while target.exists():
            target = self.directory / f"{self._stem}-{stamp}-{n}{self._ext}"
            n += 1
        os.replace(self.path, target)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(self._fd)
        self._fd = fd
        self._size = 0
        self._period = -1
        keep = self.options.max_files
        if keep:
            for old in self.rotated_files()[:-keep]:
                old.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def _rotation_due(self, incoming: int, now: float) -> bool:
        if not self._size:
            return False
        if self.options.max_bytes and self._size + incoming > self.options.max_bytes:
            return True
        every = self.options.rotate_every_s
        return bool(every) and self._period >= 0 and int(now // every) != self._period

    # -- delivery -----------------------------------------------------------------------------

    def _still_ours(self) -> bool:
        """The active path is still the file we hold open (not moved or deleted by someone else)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        if self._fd >= 0 and not self._still_ours():
            self.close()  # moved away (an outside rotation) or deleted: start the file again
        if self._fd < 0:
            self.open()
        written = self._written
        if written is not None and written[0] == writer_id:
            fresh = [e for e in entries if e.seq > written[1]]
            self.skipped += len(entries) - len(fresh)
            if fresh or entries[-1].seq >= written[1]:
                self._written = None
            entries = fresh
        rejected: list[tuple[Entry, str]] = []
        buf = bytearray()
        limit = self.options.max_line_bytes
        ecs = self.options.format == "ecs"
        dumps = orjson.dumps
        for entry in entries:
            if ecs:
                try:
                    line = dumps(to_ecs(entry))
                except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                    rejected.append((entry, f"not a JSON record: {exc}"))
                    continue
            else:
                line = entry.line
            if limit and len(line) > limit:
                rejected.append((entry, f"line of {len(line)} bytes is over max_line_bytes ({limit})"))
                continue
            buf += line
            buf += b"\n"
        if not buf:
            return rejected
        now = time.time()
        if self._rotation_due(len(buf), now):
            self._rotate()
        write_all(self._fd, buf)
        self._size += len(buf)
        if self.options.rotate_every_s and self._period < 0:
            self._period = int(now // self.options.rotate_every_s)
        if self.options.fsync:
            os.fdatasync(self._fd)
        return rejected


def _cut_torn_tail(fd: int) -> int:
    """Truncate an unterminated last line (a write a crash interrupted); the file's new size."""
    size = os.fstat(fd).st_size
    if not size:
        return 0
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return size
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            good = start + cut + 1
            os.ftruncate(fd, good)
            os.fsync(fd)
            return good
        end = start
    os.ftruncate(fd, 0)
    os.fsync(fd)
    return 0


def _last_line(fd: int, size: int) -> bytes | None:
    """The last complete line of a file that ends with a newline (None when it has none)."""
    if size <= 1:
        return None
    end = size - 1  # the final newline
    pieces: list[bytes] = []
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            pieces.append(chunk[cut + 1 :])
            break
        pieces.append(chunk)
        end = start
    line = b"".join(reversed(pieces))
    return line or None


def _position(line: bytes) -> tuple[str, int] | None:
    """``(writer_id, seq)`` of a line this sink wrote (ECS or stored), or None."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    meta = obj.get("vllm_audit", obj)
    if not isinstance(meta, dict):
        return None
    wid, seq = meta.get("writer_id"), meta.get("seq")
    if isinstance(wid, str) and isinstance(seq, int) and not isinstance(seq, bool):
        return wid, seq
    return None


def build(name: str, options: Options, env: SinkEnv) -> FileSink:
    return FileSink(name, options, env.path(options.directory), env.state_dir)
