"""The background writer: finalize, redact, seal, group commit.

The request path calls :meth:`AuditWriter.submit` (an enqueue, a few microseconds) and, in
strict durability, awaits the returned future before releasing a response's last byte. One
thread does everything else: it drains a batch from the queue, turns each exchange into a
record (:func:`vllm_audit.capture.finalize`), redacts it, appends the batch to this process's
chain, fsyncs once, and then resolves the whole batch's futures with one call into the event
loop. Throughput grows with load (bigger batches) while each fsync is paid once per batch.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from vllm_audit.capture import Exchange, finalize
from vllm_audit.config import Config
from vllm_audit.errors import LogWriteError
from vllm_audit.integrity.chain import Chain
from vllm_audit.metrics import Metrics
from vllm_audit.record import prompt_sha256

log = logging.getLogger("vllm_audit.writer")
access_log = logging.getLogger("vllm_audit.access")

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
Listener = Callable[[list[dict[str, Any]]], None]
Item = tuple[Exchange | dict[str, Any], "asyncio.Future[None] | None", "asyncio.AbstractEventLoop | None"]

_STOP = object()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def load_redactor(config: Config) -> Redactor:
    from vllm_audit.privacy import build_redactor

    redactor: Redactor = build_redactor(config)
    return redactor


class AuditWriter:
    """Owns this process's chain; one background thread does all the work."""

    def __init__(
        self,
        config: Config,
        *,
        redactor: Redactor | None = None,
        listeners: Iterable[Listener] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.redactor = redactor if redactor is not None else load_redactor(config)
        self.listeners = list(listeners)
        self.metrics = metrics or Metrics()
        self.metrics.queue_depth = self.depth
        self.metrics.log_ok = lambda: self.failure is None
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._submitted = 0  # event-loop side only
        self._processed = 0  # writer thread only
        self.failure: str | None = None
        self.writer_id = ""
        self._chain: Chain | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-audit-writer", daemon=True)
        self._heartbeat_s = float(getattr(config.integrity, "heartbeat_seconds", 1.0))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, wait: float = 10.0) -> None:
        self._thread.start()
        atexit.register(self.stop)
        self._ready.wait(wait)

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, write everything, close the chain. Idempotent."""
        if not self._thread.is_alive() or self._stopped.is_set():
            return
        self._q.put(_STOP)
        self._thread.join(timeout)

    # -- request path -------------------------------------------------------------------------

    def depth(self) -> int:
        return self._submitted - self._processed

    @property
    def accepting(self) -> bool:
        """False when a new record would not be written (log failing or queue full)."""
        return self.failure is None and self.depth() < self.config.log.queue_size and not self._stopped.is_set()

    def submit(self, item: Exchange | dict[str, Any], wait: bool = False) -> asyncio.Future[None] | None:
        """Enqueue one exchange or event. With ``wait``, return a future resolved once durable."""
        fut: asyncio.Future[None] | None = None
        loop: asyncio.AbstractEventLoop | None = None
        if wait:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
        self._submitted += 1
        self.metrics.submitted_total += 1
        self._q.put((item, fut, loop))
        return fut

    def submit_event(self, entry: dict[str, Any]) -> None:
        """Enqueue an event entry (``record_type`` other than inference) without waiting."""
        self._submitted += 1
        self.metrics.submitted_total += 1
        self._q.put((entry, None, None))

    # -- writer thread ------------------------------------------------------------------------

    def _open_chain(self) -> Chain | None:
        try:
            chain = Chain(self.config.log.dir, self.config.integrity)
        except (LogWriteError, OSError) as exc:
            self.failure = str(exc)
            log.error("audit log unavailable: %s", exc)
            return None
        self.writer_id = chain.writer_id
        self.metrics.writer_id = chain.writer_id
        return chain

    def _run(self) -> None:
        chain = self._open_chain()
        self._chain = chain
        if chain is not None:
            self._commit(chain, [], [])  # start-up / recovery events
        self._ready.set()
        q = self._q
        batch_max = self.config.log.batch_max
        stopping = False
        while not stopping:
            try:
                first = q.get(timeout=self._heartbeat_s)
            except queue.Empty:
                if chain is not None:
                    try:
                        chain.heartbeat()
                    except Exception:
                        log.exception("checkpoint heartbeat failed")
                elif chain is None:
                    chain = self._chain = self._open_chain()
                continue
            items: list[Item] = []
            if first is _STOP:
                stopping = True
            else:
                items.append(first)
            while len(items) < batch_max:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    continue
                items.append(nxt)
            if chain is None:
                chain = self._chain = self._open_chain()
            self._handle(chain, items)
        if chain is not None:
            try:
                chain.close()
            except Exception:
                log.exception("closing the chain failed")
        self._stopped.set()

    def _handle(self, chain: Chain | None, items: list[Item]) -> None:
        entries: list[dict[str, Any]] = []
        for item, _fut, _loop in items:
            entries.append(self._prepare(item))
        if chain is None:
            self._fail(items, LogWriteError(self.failure or "audit log unavailable"))
            return
        self._commit(chain, entries, items)

    def _prepare(self, item: Exchange | dict[str, Any]) -> dict[str, Any]:
        if isinstance(item, Exchange):
            rec = finalize(item)
            try:
                rec = self.redactor(rec)
            except Exception as exc:  # fail safe: never let unredacted text through
                log.error("redaction failed for request %s: %s", rec.get("request_id"), type(exc).__name__)
                for field in ("input_prompt", "output_response", "error_message"):
                    if rec.get(field) is not None:
                        rec[field] = "<UNREDACTABLE>"
                rec["redaction"] = {"error": type(exc).__name__}
            if rec.get("prompt_sha256") is None:
                rec["prompt_sha256"] = prompt_sha256(rec.get("input_prompt"))
            return rec
        entry = dict(item)
        entry.setdefault("record_type", "event")
        entry.setdefault("timestamp", _now_iso())
        return entry

    def _commit(self, chain: Chain, entries: list[dict[str, Any]], items: list[Item]) -> None:
        t0 = time.perf_counter()
        pending = chain.pending_events()
        for ev in pending:
            ev.setdefault("timestamp", _now_iso())
        try:
            if pending or entries:
                chain.append(pending + entries)
                chain.sync()
        except LogWriteError as exc:
            self.metrics.write_errors_total += 1
            if self.failure is None:
                log.error("audit log write failed: %s", exc)
            self.failure = str(exc)
            self._fail(items, exc)
            return
        self.failure = None
        self._processed += len(items)
        m = self.metrics
        m.records_written_total += len(entries)
        m.batches_total += 1
        m.batch_size_last = len(entries)
        m.write_seconds.observe(time.perf_counter() - t0)
        _resolve(items, None)
        if self.config.log.access_log:
            for rec in entries:
                if rec.get("record_type") == "inference":
                    access_log.info(
                        "%s %s %s %s status=%s req_bytes=%s resp_bytes=%s tokens=%s latency_ms=%s ttft_ms=%s",
                        rec.get("request_id"),
                        rec.get("method"),
                        rec.get("route"),
                        rec.get("http_status"),
                        rec.get("status"),
                        rec.get("request_bytes"),
                        rec.get("response_bytes"),
                        rec.get("total_tokens"),
                        rec.get("latency_ms"),
                        rec.get("ttft_ms"),
                    )
        try:
            chain.after_commit()
        except Exception:
            log.exception("after-commit step (checkpoint/rotation) failed")
        for listener in self.listeners:
            try:
                listener(entries)
            except Exception:
                log.exception("post-commit listener failed")

    def _fail(self, items: list[Item], exc: Exception) -> None:
        self._processed += len(items)
        self.metrics.dropped_total += len(items)
        _resolve(items, exc)


def _resolve(items: list[Item], exc: Exception | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _item, fut, loop in items:
        if fut is not None and loop is not None:
            by_loop.setdefault(loop, []).append(fut)
    for loop, futs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, futs, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _set_all(futs: list[asyncio.Future[None]], exc: Exception | None) -> None:
    for fut in futs:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)


def append_events(config: Config, events: list[dict[str, Any]]) -> str:
    """Append events durably from a short-lived process (CLI); returns the writer id used."""
    chain = Chain(config.log.dir, config.integrity)
    try:
        pending = chain.pending_events()
        entries = []
        for ev in [*pending, *events]:
            e = dict(ev)
            e.setdefault("record_type", "event")
            e.setdefault("timestamp", _now_iso())
            entries.append(e)
        chain.append(entries)
        chain.sync()
        chain.after_commit()
        return chain.writer_id
    finally:
        chain.close()
