"""Projections: everything downstream of the local log, each with its own durable cursor.

A projection turns link-checked log entries (:class:`~vllm_audit.integrity.codec.Entry`) into
something outside the log — rows of the query store, quota counters, messages in Kafka, lines in
a SIEM — and remembers, per writer, how far it got (a :class:`~vllm_audit.integrity.reader.Cursor`).
The protocol, driven by one :class:`~vllm_audit.ship.runner.Runner` thread per projection:

1. ``open()`` connects (raise to have the runner retry with backoff);
2. ``load_cursors()`` returns the committed positions, ``{writer_id: Cursor}``;
3. ``apply(writer_id, entries, ctx)`` delivers one batch of one writer's consecutive entries and
   commits the cursor after the last of them *atomically with its output*: in the same
   transaction for a database; for an external system, after the system acknowledged, keyed
   so that a replay after a crash does not duplicate downstream where the system can dedupe
   (each entry's :attr:`~vllm_audit.integrity.codec.Entry.key` / leaf hash is its idempotency key).
   Raise on a transient failure: the runner retries the same batch from the cursor with capped
   exponential backoff and jitter. An entry the system rejects *permanently* (too large, refused
   by schema) goes to ``ctx.quarantine(entry, reason)`` and the batch goes on: it never blocks
   the entries behind it;
4. ``close()``.

External sinks subclass :class:`Sink`, which keeps the cursor in a small JSON file (written
atomically after the system acknowledged) and asks only for ``deliver``.

Projections read only sealed entries: redaction happened before a line was written (invariant 3),
and the reader returns only entries that are durable.
"""

from __future__ import annotations

import abc
import dataclasses
import fcntl
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from vllm_audit._fs import replace_file, write_all
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor


class Rejected(Exception):
    """An entry the downstream system refuses for good (the message is the reason)."""


@dataclasses.dataclass(slots=True)
class Status:
    """What a projection has done; the runner updates it, ``/metrics`` and ``ship --status`` show it."""

    name: str
    kind: str
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    quarantined: int = 0
    batches: int = 0
    lag_records: int = 0
    #: Seconds since the projection was last fully caught up (0 while it is).
    lag_seconds: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0
    last_delivery_at: float = 0.0
    #: "starting", "running", "retrying", "standby" (another process holds the lock), "stopped".
    state: str = "starting"
    #: Writers whose chain does not continue (nothing after the break is shipped), with why.
    broken: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Context:
    """What the runner gives a projection while applying a batch."""

    def __init__(self, quarantine: Quarantine, status: Status) -> None:
        self._quarantine = quarantine
        self.status = status

    def quarantine(self, entry: Entry, reason: str) -> None:
        """Record ``entry`` as permanently rejected by this projection (durably), and count it."""
        self._quarantine.add(entry, reason)
        self.status.quarantined += 1


class Projection(abc.ABC):
    """One consumer of the log with its own cursor (see the module docstring for the protocol)."""

    #: Unique name (the ``[sinks.NAME]`` key, or the built-in projection's name).
    name: str = ""
    #: The kind shown in status and metrics (``kafka``, ``query_store`` ...).
    kind: str = ""
    #: Most entries per ``apply`` (the runner never gives more).
    batch_max: int = 1000

    def open(self) -> None:  # noqa: B027 - optional hook
        """Connect to the downstream system (raise to be retried)."""

    @abc.abstractmethod
    def load_cursors(self) -> dict[str, Cursor]:
        """The committed positions: ``{writer_id: cursor}`` (missing writers start at 0)."""

    @abc.abstractmethod
    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        """Deliver one batch of one writer's consecutive entries and commit the cursor after it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (called once, also after errors)."""


class CursorFile:
    """Per-writer cursors in one JSON file, replaced atomically (write, fsync, rename, fsync dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cursors: dict[str, Cursor] | None = None

    def load(self) -> dict[str, Cursor]:
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            raw = {}
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"cursor file {str(self.path)!r} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"cursor file {str(self.path)!r} must hold an object")
        self._cursors = {wid: Cursor.from_json(c) for wid, c in raw.items()}
        return dict(self._cursors)

    def commit(self, cursor: Cursor) -> None:
        if self._cursors is None:
            self.load()
        assert self._cursors is not None
        self._cursors[cursor.writer_id] = cursor
        replace_file(self.path, orjson.dumps({w: c.to_json() for w, c in sorted(self._cursors.items())}))


class Quarantine:
    """Entries a projection rejected for good: one JSON line each (ids and reason, no content)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, entry: Entry, reason: str) -> None:
        line = orjson.dumps(
            {
                "writer_id": entry.writer_id,
                "seq": entry.seq,
                "leaf_hash": entry.leaf_hex,
                "record_type": entry.record_type,
                "bytes": len(entry.line),
                "reason": reason[:2000],
                "at": time.time(),
            }
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                write_all(fd, line + b"\n")
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, object]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.splitlines():
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out


class Sink(Projection):
    """An external system: ``deliver`` sends a batch and returns once the system acknowledged it.

    The cursor lives in ``<state_dir>/<name>/cursors.json`` and is committed after ``deliver``
    returns, so a crash between the acknowledgement and the commit replays the batch: systems that
    dedupe by the entry's key (NATS ``Nats-Msg-Id``, Elasticsearch ``_id``, a webhook receiver
    honouring ``Idempotency-Key``) see it once; others may see it twice (each sink says which).
    """

    def __init__(
        self,
        name: str,
        state_dir: Path,
        *,
        record_types: Sequence[str] = ("inference", "event", "alert"),
        batch_max: int = 500,
    ) -> None:
        self.name = name
        self.state_dir = state_dir / name
        self.cursor_file = CursorFile(self.state_dir / "cursors.json")
        self.record_types = frozenset(record_types)
        self.batch_max = batch_max

    def load_cursors(self) -> dict[str, Cursor]:
        return self.cursor_file.load()

    @abc.abstractmethod
    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        """Send ``entries`` and wait for the acknowledgement; return those rejected for good, with why.

        Raise (any exception) when the batch could not be delivered: it is retried as a whole.
        """

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        wanted = [e for e in entries if e.record_type in self.record_types]
        if wanted:
            for entry, reason in self.deliver(writer_id, wanted):
                ctx.quarantine(entry, reason)
        last = entries[-1]
        self.cursor_file.commit(Cursor(writer_id, last.seq + 1, last.leaf_hex))


class ProcessLock:
    """An exclusive ``flock`` so one process per log directory runs a given projection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def try_acquire(self) -> bool:
        if self._fd >= 0:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
