"""Feed the query store from the local log (the source of truth).

The ingester reads ``LOGDIR/writers/*/seg-*.jsonl`` and keeps one cursor per writer (the last
``seq`` ingested) *in the store*, advanced in the same transaction as the rows, so ingestion is
idempotent, resumes after a crash, and ``rebuild`` (forget everything, read again) recreates the
store from the log. An unterminated last line (a write in progress or a torn tail) is left for
later. In memory it remembers how far into each segment it has read, so polling the active segment
costs only the new bytes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from vllm_audit.access.store import Store, open_store, row_from_entry

if TYPE_CHECKING:
    from vllm_audit.config import Config

log = logging.getLogger(__name__)

BATCH = 1000


def log_dir(config: Config) -> Path:
    """The log directory exactly as the writer opens it (``[log] dir``, relative to the cwd)."""
    return Path(config.log.dir)


def _first_seq(p: Path) -> int:
    try:
        return int(p.name[4:-6])
    except ValueError:
        return -1


class Ingester:
    def __init__(self, log_dir: str | Path, store: Store) -> None:
        self.root = Path(log_dir) / "writers"
        self.store = store
        self._cursors: dict[str, int] | None = None
        self._offsets: dict[Path, int] = {}

    def forget(self) -> None:
        self._cursors = None
        self._offsets.clear()

    def run_once(self) -> int:
        """Ingest what is new; returns how many entries were consumed."""
        if self._cursors is None:
            self._cursors = self.store.load_cursors()
        if not self.root.is_dir():
            return 0
        total = 0
        for wdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            total += self._writer(wdir)
        return total

    def _writer(self, wdir: Path) -> int:
        assert self._cursors is not None
        wid = wdir.name
        last = self._cursors.get(wid, -1)
        segs = sorted(
            (p for p in wdir.glob("seg-*.jsonl") if _first_seq(p) >= 0),
            key=_first_seq,
        )
        consumed = 0
        for i, seg in enumerate(segs):
            if i + 1 < len(segs) and _first_seq(segs[i + 1]) <= last + 1:
                continue  # every entry of this segment is already in the store
            offset = self._offsets.get(seg, 0)
            try:
                with seg.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError as exc:
                log.warning("cannot read %s: %s", seg, exc)
                break
            end = data.rfind(b"\n") + 1
            if end == 0:
                continue
            rows: list[tuple[Any, ...]] = []
            batch_last = last
            pos = 0
            for line in data[:end].splitlines():
                pos += len(line) + 1
                if not line.strip():
                    continue
                try:
                    entry = orjson.loads(line)
                    seq = int(entry["seq"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("unparseable entry in %s at byte %d", seg, offset + pos - len(line) - 1)
                    continue
                if seq <= last:
                    continue
                if entry.get("writer_id") != wid:
                    log.warning("entry seq %d in %s names writer %r", seq, seg, entry.get("writer_id"))
                if entry.get("record_type") == "inference":
                    rows.append(row_from_entry(entry))
                batch_last = max(batch_last, seq)
                consumed += 1
                if len(rows) >= BATCH:
                    self.store.ingest(wid, rows, batch_last)
                    rows = []
                    last = batch_last
                    self._cursors[wid] = last
            if batch_last > last or rows:
                self.store.ingest(wid, rows, batch_last)
                last = batch_last
                self._cursors[wid] = last
            self._offsets[seg] = offset + end
        return consumed


def rebuild(config: Config) -> int:
    """Empty the store and ingest the whole log again; returns the entries read."""
    store = open_store(config)
    store.init()
    store.reset()
    ing = Ingester(log_dir(config), store)
    total = 0
    while n := ing.run_once():
        total += n
    return total


def catch_up(config: Config) -> int:
    store = open_store(config)
    store.init()
    ing = Ingester(log_dir(config), store)
    total = 0
    while n := ing.run_once():
        total += n
    return total


async def run_ingester(config: Config, stop: asyncio.Event) -> None:
    """Keep the query store up to date until ``stop`` is set (a gateway background task)."""
    interval = config.access.store.poll_interval_s
    ing: Ingester | None = None
    while not stop.is_set():
        try:
            if ing is None:
                store = open_store(config)
                await asyncio.to_thread(store.init)
                ing = Ingester(log_dir(config), store)
            await asyncio.to_thread(ing.run_once)
        except Exception as exc:  # the store being down must never stop the gateway
            log.warning("audit index ingestion failed: %s", exc)
            if ing is not None:
                ing.forget()
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
