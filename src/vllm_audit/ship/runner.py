"""The runner: one thread per projection, each reading the log at its own pace from its own cursor.

Nothing here is called by the writer or the event loop. The writing process may call
:meth:`Runner.notify` after a commit (it only sets an event) so projections wake at once instead of
at the next poll. A slow or failing projection slows only its own thread: the others, the writer
and the request path never wait for it (back-pressure is the cursor: a projection that is behind
reads older entries from disk, nothing piles up in memory).

A failed batch is retried from the committed cursor with capped exponential backoff and full
jitter; the projection is reopened after a failure. Each projection takes an exclusive lock in
the state directory, so with several processes on one log directory (gateway workers, vLLM API
processes, `vllm-audit ship` beside them) exactly one runs it and the others stand by, taking
over when the holder exits.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import orjson

from vllm_audit._fs import replace_file
from vllm_audit.integrity.reader import ChainBreak, Cursor, LogReader
from vllm_audit.ship.base import Context, ProcessLock, Projection, Quarantine, Status
from vllm_audit.ship.config import ShipConfig

log = logging.getLogger("vllm_audit.ship")


class Runner:
    """Drives projections over one log directory until :meth:`stop`."""

    def __init__(
        self,
        log_dir: str | Path,
        state_dir: Path,
        projections: Sequence[Projection],
        config: ShipConfig | None = None,
        *,
        durable: tuple[str, Callable[[], int]] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.state_dir = state_dir
        self.config = config or ShipConfig()
        self.projections = list(projections)
        names = [p.name for p in self.projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names must be unique: {names}")
        self.durable = durable
        self.statuses = {p.name: Status(p.name, p.kind) for p in self.projections}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for p in self.projections:
            t = threading.Thread(target=self._run, args=(p,), name=f"vllm-audit-ship-{p.name}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 10.0, drain_s: float = 5.0) -> None:
        """Stop the projection threads, then give each projection that was not failing one last
        drain in this thread (at most ``drain_s`` in all, plus one delivery's own timeout): what
        was written since its last pass — a stopping writer's ``writer_stopped`` event and final
        checkpoint — ships now, not at the next start."""
        failing = {p.name for p in self.projections if self.statuses[p.name].state == "retrying"}
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if drain_s <= 0 or any(t.is_alive() for t in self._threads):
            return
        if self.durable is not None:
            # The writer has stopped (it stops first): its published durable count covers its
            # final entries, which its in-process count may not.
            wid, count = self.durable
            hint = LogReader(self.log_dir, limit="durable").durable_size
            self.durable = (wid, lambda: max(count(), hint(wid)))
        end = time.monotonic() + drain_s
        for p in self.projections:
            if p.name in failing or time.monotonic() >= end:
                continue
            try:
                self._drain_once(p, end)
            except Exception as exc:
                log.warning("projection %s: last drain at stop failed: %s", p.name, exc)

    def notify(self) -> None:
        """New entries are durable (cheap; safe from any thread)."""
        self._wake.set()

    def run_until_caught_up(self, timeout: float = 60.0) -> bool:
        """Run every projection in this thread until none has anything left (tests, `ship --once`)."""
        deadline = time.monotonic() + timeout
        ok = True
        for p in self.projections:
            ok &= self._drain_once(p, deadline)
        return ok

    # -- one projection -----------------------------------------------------------------------

    def _reader(self) -> LogReader:
        reader = LogReader(self.log_dir, limit="durable")
        if self.durable is not None:
            reader.set_limit(*self.durable)
        return reader

    def _lock(self, p: Projection) -> ProcessLock:
        return ProcessLock(self.state_dir / f"{p.name}.lock")

    def _run(self, p: Projection) -> None:
        status = self.statuses[p.name]
        lock = self._lock(p)
        while not self._stop.is_set():
            try:
                if lock.try_acquire():
                    break
                status.state = "standby"
            except OSError as exc:  # the state directory cannot be made (the log dir is unusable)
                status.state = "retrying"
                status.last_error = f"cannot take the projection lock: {exc.strerror or exc}"
                status.last_error_at = time.time()
            self._write_status(status)
            self._stop.wait(max(1.0, self.config.poll_interval_s * 4))
        try:
            if not self._stop.is_set():
                self._loop(p, status)
        except Exception:  # pragma: no cover - a bug in the runner itself
            log.exception("projection %s stopped on an unexpected error", p.name)
        finally:
            status.state = "stopped"
            self._write_status(status)
            try:
                p.close()
            except Exception:
                log.exception("closing projection %s failed", p.name)
            lock.release()

    def _loop(self, p: Projection, status: Status) -> None:
        cfg = self.config
        reader = self._reader()
        quarantine = Quarantine(self.state_dir / p.name / "quarantine.jsonl")
        ctx = Context(quarantine, status)
        cursors: dict[str, Cursor] | None = None
        known: dict[str, Cursor] = {}  # the last committed positions seen (for lag while failing)
        failures = 0
        caught_up_at = time.monotonic()
        next_status = 0.0
        while not self._stop.is_set():
            try:
                if cursors is None:  # (re)open; while retrying, the state stays "retrying"
                    if not failures:
                        status.state = "starting"
                    p.open()
                    cursors = p.load_cursors()
                    if not failures:
                        status.state = "running"
                known = cursors
                before = status.delivered
                progressed, lag = self._pass(p, reader, cursors, ctx, status)
                failures = 0
                status.state = "running"  # a pass went through
            except Exception as exc:
                failures += 1
                status.retried += 1
                status.last_error = f"{type(exc).__name__}: {exc}"[:500]
                status.last_error_at = time.time()
                status.state = "retrying"
                if failures == 1 or failures % 20 == 0:
                    log.warning("projection %s failed (attempt %d), retrying: %s", p.name, failures, status.last_error)
                try:
                    p.close()
                except Exception:
                    pass
                cursors = None  # reload committed cursors after reopening
                reader = self._reader()
                status.lag_records = self._lag(reader, known)
                status.lag_seconds = round(time.monotonic() - caught_up_at, 3)
                self._write_status(status)
                delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * (2 ** min(failures - 1, 30)))
                wait = random.uniform(0, delay) + cfg.backoff_initial_s / 2
                # A server's Retry-After (an exception's ``retry_after`` seconds) is a floor, capped.
                retry_after = getattr(exc, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > 0:
                    wait = max(wait, min(float(retry_after), cfg.backoff_max_s))
                self._stop.wait(wait)
                continue
            now = time.monotonic()
            status.lag_records = lag
            if lag == 0:
                caught_up_at = now
            status.lag_seconds = round(now - caught_up_at, 3)
            if now >= next_status:
                self._write_status(status)
                next_status = now + cfg.status_interval_s
            if not progressed:
                self._wake.wait(cfg.poll_interval_s)
                self._wake.clear()
            elif cfg.linger_s and status.delivered - before < min(self.config.batch_max, p.batch_max) // 2:
                self._stop.wait(cfg.linger_s)  # a small batch: let the next one grow

    @staticmethod
    def _lag(reader: LogReader, cursors: dict[str, Cursor]) -> int:
        """Durable entries not yet delivered, from the positions last known committed."""
        lag = 0
        try:
            for wid in reader.writer_ids():
                bound = reader.limit(wid)
                if bound is not None:
                    lag += max(0, bound - (cursors[wid].next_seq if wid in cursors else 0))
        except OSError:
            return 0
        return lag

    def _pass(
        self, p: Projection, reader: LogReader, cursors: dict[str, Cursor], ctx: Context, status: Status
    ) -> tuple[bool, int]:
        """One round over every writer: at most one batch each (fair between writers)."""
        progressed = False
        lag = 0
        batch = min(self.config.batch_max, p.batch_max)
        for wid in reader.writer_ids():
            cur = cursors.get(wid) or Cursor(wid)
            try:
                entries = reader.read(cur, batch)
            except ChainBreak as exc:
                if status.broken.get(wid) != str(exc):
                    log.error("projection %s: not shipping writer %s past a chain break: %s", p.name, wid, exc)
                status.broken[wid] = str(exc)
                continue
            status.broken.pop(wid, None)
            if entries:
                p.apply(wid, entries, ctx)
                cursors[wid] = cur.after(entries[-1])
                status.delivered += len(entries)
                status.batches += 1
                status.last_delivery_at = time.time()
                progressed = True
            bound = reader.limit(wid)
            if bound is not None:
                lag += max(0, bound - cursors.get(wid, cur).next_seq)
        return progressed, lag

    def _drain_once(self, p: Projection, deadline: float) -> bool:
        status = self.statuses[p.name]
        reader = self._reader()
        ctx = Context(Quarantine(self.state_dir / p.name / "quarantine.jsonl"), status)
        lock = self._lock(p)
        if not lock.try_acquire():
            return False
        try:
            p.open()
            cursors = p.load_cursors()
            while time.monotonic() < deadline:
                progressed, lag = self._pass(p, reader, cursors, ctx, status)
                status.lag_records = lag
                if not progressed:
                    return lag == 0
            return False
        finally:
            self._write_status(status)
            p.close()
            lock.release()

    # -- status -------------------------------------------------------------------------------

    def _write_status(self, status: Status) -> None:
        try:
            path = self.state_dir / f"{status.name}.status.json"
            replace_file(path, orjson.dumps({**status.to_json(), "updated_at": time.time()}), durable=False)
        except OSError as exc:
            log.debug("cannot write status of %s: %s", status.name, exc)

    def render_metrics(self) -> list[str]:
        """Prometheus lines for every projection this process runs (those on standby included),
        plus each projection's own (``render_metrics()``, e.g. the detector's alert counts)."""
        lines = render_status_metrics(self.statuses.values())
        for p in self.projections:
            own = getattr(p, "render_metrics", None)
            if callable(own):
                lines += own()
        return lines


def render_status_metrics(statuses: Iterable[Status]) -> list[str]:
    rows = list(statuses)
    out = [
        "# HELP vllm_audit_sink_delivered_total Entries delivered by a projection (sink, store, quota).",
        "# TYPE vllm_audit_sink_delivered_total counter",
    ]
    fields = (
        ("delivered", "counter", "vllm_audit_sink_delivered_total", None),
        ("retried", "counter", "vllm_audit_sink_retried_total", "Failed batches retried."),
        ("failed", "counter", "vllm_audit_sink_failed_total", "Batches given up on (never, by design)."),
        ("quarantined", "counter", "vllm_audit_sink_quarantined_total", "Entries rejected for good, quarantined."),
        ("lag_records", "gauge", "vllm_audit_sink_lag_records", "Durable entries not yet delivered."),
        ("lag_seconds", "gauge", "vllm_audit_sink_lag_seconds", "Seconds since the projection was caught up."),
        ("last_error_at", "gauge", "vllm_audit_sink_last_error_timestamp_seconds", "Time of the last failure."),
    )
    for attr, kind, metric, help_ in fields:
        if help_ is not None:
            out += [f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}"]
        for s in rows:
            out.append(f'{metric}{{sink="{s.name}",kind="{s.kind}"}} {getattr(s, attr)}')
    out += [
        "# HELP vllm_audit_sink_up 1 while the projection runs here without errors, 0 otherwise.",
        "# TYPE vllm_audit_sink_up gauge",
    ]
    for s in rows:
        up = int(s.state == "running")
        out.append(f'vllm_audit_sink_up{{sink="{s.name}",kind="{s.kind}",state="{s.state}"}} {up}')
    return out
