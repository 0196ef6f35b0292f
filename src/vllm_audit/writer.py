"""The background writer: finalize, redact, seal, group commit.

The request path calls :meth:`AuditWriter.submit` (an enqueue, a few microseconds) and, in
strict durability, awaits the returned future before releasing a response's last byte. One
thread does everything else: it drains a batch from the queue, turns each exchange into a
record (:func:`vllm_audit.finalize.finalize`), redacts it, appends the batch to this process's
chain, fsyncs once, and then resolves the whole batch's futures with one call into the event
loop. Throughput grows with load (bigger batches) while each fsync is paid once per batch.

Heavy exchanges (captured bodies over ``[log] heavy_record_bytes``) are finalized and redacted
in a separate process (``[log] heavy_workers``), so one client's multi-megabyte prompts never
hold up everyone else's group commit: their records are committed when ready, in a later batch.

Nothing downstream runs here. After each commit the writer publishes how far its chain is durable
(:attr:`AuditWriter.durable_seq`) and wakes the projection runner (an event set, nothing more);
the runner's own threads feed the query store, quota charging and the sinks.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from vllm_audit._gc import tune_gc_for_serving
from vllm_audit.capture import Exchange
from vllm_audit.config import Config
from vllm_audit.errors import LogWriteError
from vllm_audit.finalize import finalize
from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.codec import body_digest
from vllm_audit.metrics import Metrics
from vllm_audit.record import prompt_sha256

log = logging.getLogger("vllm_audit.writer")
access_log = logging.getLogger("vllm_audit.access")

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
Item = tuple[
    "Exchange | dict[str, Any] | _Prepared | _Inline", "asyncio.Future[None] | None", "asyncio.AbstractEventLoop | None"
]


class _Prepared:
    """A record finalized and redacted elsewhere (the heavy lane), ready to be sealed."""

    __slots__ = ("record",)

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record


class _Inline:
    """A heavy exchange the heavy lane could not take: finalize and redact it in the writer."""

    __slots__ = ("exchange",)

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange


_worker_redactor: Redactor | None = None


def _heavy_init(config: Config) -> None:
    """A prepare or heavy-lane process's initializer: its redactor, then the collector settings of
    our own processes (``_gc.tune_gc_for_serving``: a batch's exchanges stay alive until it is
    prepared, so young collections found nothing to free and walked the batch every 700
    allocations)."""
    global _worker_redactor
    _worker_redactor = load_redactor(config)
    tune_gc_for_serving()


def _heavy_prepare(ex: Exchange) -> dict[str, Any]:
    assert _worker_redactor is not None
    return _prepare_exchange(ex, _worker_redactor)


def _worker_pid() -> int:
    """A prepare process's warm-up task: its initializer (the redactor) has run; its pid."""
    import os

    return os.getpid()


#: A record prepared in a prepare process: its JSON object, its ``org_id`` (what the entry codec
#: tags the entry with; passed along so the writer need not parse the bytes again to find it) and
#: the digest of the object its leaf hash covers (``codec.body_digest``: one hash per record fewer
#: in the writer thread, which shares its process with the event loop).
Encoded = tuple[bytes, str, bytes]


def _prepare_many(exchanges: list[Exchange]) -> list[Encoded]:
    """In a prepare process: finalize, redact and encode a slice of a batch."""
    assert _worker_redactor is not None
    dumps = orjson.dumps
    out: list[Encoded] = []
    for ex in exchanges:
        rec = _prepare_exchange(ex, _worker_redactor)
        org = rec.get("org_id")
        raw = dumps(rec)
        out.append((raw, org if isinstance(org, str) else "", body_digest(raw)))
    return out


def _prepare_exchange(ex: Exchange, redactor: Redactor) -> dict[str, Any]:
    rec = finalize(ex)
    try:
        rec = redactor(rec)
    except Exception as exc:  # fail safe: never let unredacted text through
        log.error("redaction failed for request %s: %s", rec.get("request_id"), type(exc).__name__)
        for field in ("input_prompt", "output_response", "error_message"):
            if rec.get(field) is not None:
                rec[field] = "<UNREDACTABLE>"
        rec["redaction"] = {"error": type(exc).__name__}
    if rec.get("prompt_sha256") is None:
        rec["prompt_sha256"] = prompt_sha256(rec.get("input_prompt"))
    return rec


def _captured_bytes(ex: Exchange) -> int:
    body = getattr(ex, "request_body", None)
    n = len(body) if isinstance(body, bytes | bytearray | memoryview) else 0
    return n + int(getattr(ex, "response_bytes", 0) or 0)

_STOP = object()


#: Most records in one batch when prepare processes are on: a burst's first batch is prepared
#: with nothing to overlap, so smaller batches keep the pipeline full (20,000 queued records on 2
#: cores, 2 prepare processes: batches of 4096 17.7k records/s, 1024 19.4k, 512 19.0k).
PREPARE_BATCH_MAX = 1024


@dataclasses.dataclass(slots=True)
class _Batch:
    """Items taken from the queue together; ``futs``: their parts in the prepare processes."""

    items: list[Item]
    parts: list[list[int]]
    futs: list[Any]


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
        metrics: Metrics | None = None,
        run_projections: bool | None = None,
    ) -> None:
        self.config = config
        self.redactor = redactor if redactor is not None else load_redactor(config)
        self.metrics = metrics or Metrics()
        #: Entries of this writer's chain known durable (read by projection threads).
        self.durable_seq = 0
        self._run_projections = config.ship.in_process if run_projections is None else run_projections
        self.runner: Any = None
        self._heavy: Any = None
        self._heavy_failed = False
        self._heavy_bytes = config.log.heavy_record_bytes
        self._heavy_pending = 0
        self._prepare_procs: Any = None
        self._prepare_failed = False
        self._prepare_warm: list[Any] = []
        self._done = threading.Condition()  # notified when entries were written or failed
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
        from vllm_audit.evidence import settings_event

        self._thread.start()
        atexit.register(self.stop)
        self.submit_event(settings_event(self.config))  # the settings in force are evidence too
        self._ready.wait(wait)
        if self._run_projections:
            self._start_runner()

    def _start_runner(self) -> None:
        """Start the projections (query store, quota charging, sinks): on threads of this process,
        or in a supervised child process (``[ship] isolation``)."""
        from vllm_audit.ship.build import build_runner
        from vllm_audit.ship.child import ShipperProcess, wants_process

        if wants_process(self.config):
            try:
                shipper = ShipperProcess(self.config)
                shipper.start()
            except Exception as exc:  # the shipper must never stop the gateway
                log.error("shipper process not started: %s", exc)
                return
            self.runner = shipper
            self.metrics.extra.append(shipper.render_metrics)
            return

        try:
            runner = build_runner(self.config, durable=(self.writer_id, lambda: self.durable_seq))
        except Exception as exc:  # a projection that cannot be built must not stop the gateway
            log.error("projections not started: %s", exc)
            return
        if runner is None:
            return
        self.runner = runner
        self.metrics.extra.append(runner.render_metrics)
        runner.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, write everything, close the chain, stop the projections. Idempotent."""
        if self._thread.is_alive() and not self._stopped.is_set():
            self._q.put(_STOP)
            self._thread.join(timeout)
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        for attr in ("_heavy", "_prepare_procs"):
            pool = getattr(self, attr)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
                setattr(self, attr, None)

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

    def submit_event(self, entry: dict[str, Any], wait: bool = False) -> asyncio.Future[None] | None:
        """Enqueue an event entry (``record_type`` other than inference).

        With ``wait`` (from the event loop), return a future resolved once the event is durable and
        failed (``LogWriteError``) when it cannot be written: a caller that must not act unaudited
        (an audit read) awaits it. Without, fire and forget.
        """
        if wait and not self.accepting:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            fut.set_exception(LogWriteError(self.failure or "audit log is not accepting entries"))
            return fut
        return self.submit(entry, wait=wait)

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
        if self.config.log.prepare_processes > 0:
            self._start_prepare_processes()
        q = self._q
        batch_max = self.config.log.batch_max
        if self.config.log.prepare_processes > 0:
            batch_max = min(batch_max, PREPARE_BATCH_MAX)
        stopping = False
        # A batch whose records the prepare processes are working on: it is sealed once the next
        # batch has been handed to them (or at once when nothing else is queued), so the processes
        # prepare batch N+1 while this thread seals and syncs batch N.
        inflight: _Batch | None = None
        while not stopping:
            if inflight is not None:
                try:
                    first = q.get_nowait()
                except queue.Empty:
                    self._finish(chain, inflight)
                    inflight = None
                    continue
            else:
                try:
                    first = q.get(timeout=self._heartbeat_s if self.failure is None else min(1.0, self._heartbeat_s))
                except queue.Empty:
                    if chain is None:
                        chain = self._chain = self._open_chain()
                    elif self.failure is not None:
                        self._probe(chain)
                    else:
                        try:
                            chain.heartbeat()
                            self.durable_seq = chain.next_seq
                        except Exception:
                            log.exception("checkpoint heartbeat failed")
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
            batch = self._begin(items)
            if inflight is not None:
                self._finish(chain, inflight)
                inflight = None
            if batch.futs:
                inflight = batch
            else:
                self._finish(chain, batch)
        if inflight is not None:
            self._finish(chain, inflight)
        # Records still in the heavy lane are part of what was accepted: wait for them.
        deadline = time.monotonic() + 60.0
        while self._heavy_pending > 0 and time.monotonic() < deadline:
            try:
                item = q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is not _STOP:
                self._handle(chain, [item])
        if chain is not None:
            try:
                chain.close()
            except Exception:
                log.exception("closing the chain failed")
        self._stopped.set()

    def _probe(self, chain: Chain) -> None:
        """While failing and idle: try to write again (recovery events), so an idle, drained
        replica becomes ready as soon as the disk is back instead of waiting for traffic."""
        try:
            chain.recover()
        except LogWriteError as exc:
            self.failure = str(exc)
            return
        log.warning("audit log writable again")
        self.failure = None
        self.durable_seq = chain.next_seq

    def _handle(self, chain: Chain | None, items: list[Item]) -> None:
        self._finish(chain, self._begin(items))

    def _begin(self, items: list[Item]) -> _Batch:
        """Start a batch: heavy exchanges to the heavy lane, the others' preparation to the
        prepare processes (when configured); nothing here waits for them."""
        ready = [item for item in items if not (isinstance(item[0], Exchange) and self._offload(item))]
        parts, futs = self._submit_parallel(ready)
        return _Batch(ready, parts, futs)

    def _finish(self, chain: Chain | None, batch: _Batch) -> None:
        """Wait for the batch's prepared records (preparing here what is missing), then seal and
        commit them: the batch's futures resolve once its entries are durable."""
        items = batch.items
        prepared = self._collect_parallel(batch.parts, batch.futs)
        entries: list[dict[str, Any] | Encoded] = []
        for i, item in enumerate(items):
            got = prepared.get(i)
            entries.append(got if got is not None else self._prepare(item[0]))
        if not items:
            return
        if chain is None:
            self._fail(items, LogWriteError(self.failure or "audit log unavailable"))
            return
        self._commit(chain, entries, items)

    def _offload(self, item: Item) -> bool:
        """Hand a heavy exchange to the heavy lane; True when it went there."""
        ex = item[0]
        assert isinstance(ex, Exchange)
        if self._heavy_bytes <= 0 or self._heavy_failed or _captured_bytes(ex) < self._heavy_bytes:
            return False
        pool = self._heavy_pool()
        if pool is None:
            return False
        try:
            fut = pool.submit(_heavy_prepare, ex)
        except Exception as exc:  # a pool that broke: do it here from now on
            log.warning("heavy-record lane unavailable (%s); redacting in the writer thread", exc)
            self._heavy_failed = True
            return False
        self._heavy_pending += 1
        self.metrics.heavy_records_total += 1
        _unused, wfut, loop = item

        def done(f: Any) -> None:
            try:
                rec = f.result()
            except Exception as exc:  # the worker died or could not pickle: redact here instead
                log.warning("heavy-record lane failed for one record (%s); redacting in the writer", exc)
                self._q.put((_Inline(ex), wfut, loop))
                return
            self._q.put((_Prepared(rec), wfut, loop))

        fut.add_done_callback(done)
        return True

    def _submit_parallel(self, items: list[Item]) -> tuple[list[list[int]], list[Any]]:
        """Hand a batch's exchanges to the prepare processes (``[log] prepare_processes``) to be
        finalized, redacted and encoded, so this process's GIL — shared with the event loop — only
        seals and writes. Returns the parts (indexes into ``items``) and their futures; none when
        the batch is prepared here."""
        n = self.config.log.prepare_processes
        idx = [i for i, it in enumerate(items) if isinstance(it[0], Exchange)]
        if n <= 0 or len(idx) < self.config.log.prepare_min_batch or self._prepare_failed:
            return [], []
        pool = self._prepare_pool()
        if pool is None:
            return [], []
        step = -(-len(idx) // n)
        parts = [idx[k : k + step] for k in range(0, len(idx), step)]
        futs = []
        try:
            for part in parts:
                futs.append(pool.submit(_prepare_many, [items[i][0] for i in part]))
        except Exception as exc:
            log.warning("prepare processes unavailable (%s); preparing records in the writer thread", exc)
            self._prepare_failed = True
            for fut in futs:
                fut.cancel()
            return [], []
        return parts, futs

    def _collect_parallel(self, parts: list[list[int]], futs: list[Any]) -> dict[int, Encoded]:
        """The prepared records of :meth:`_submit_parallel`'s parts, ``{index: encoded record}``;
        what is missing (a part whose process failed) is prepared here."""
        out: dict[int, Encoded] = {}
        for part, fut in zip(parts, futs, strict=True):
            try:
                encoded = fut.result()
            except Exception as exc:  # a worker died: this part is prepared here instead
                log.warning("a prepare process failed (%s); preparing its records in the writer thread", exc)
                continue
            out.update(zip(part, encoded, strict=True))
        self.metrics.prepared_in_processes_total += len(out)
        return out

    def _start_prepare_processes(self) -> None:
        """Start the prepare processes with the writer (not on the first batch, which would wait
        for them to import and build their redactor): one warm-up task per process."""
        pool = self._prepare_pool()
        if pool is None:
            return
        try:
            self._prepare_warm = [pool.submit(_worker_pid) for _ in range(self.config.log.prepare_processes)]
        except Exception as exc:
            log.warning("prepare processes unavailable (%s); preparing records in the writer thread", exc)
            self._prepare_failed = True

    def prepare_pids(self, wait: float = 30.0) -> list[int]:
        """The prepare processes' pids once each has started (for benchmarks and tests)."""
        import concurrent.futures

        deadline = time.monotonic() + wait
        while not self._prepare_warm and not self._prepare_failed and time.monotonic() < deadline:
            with self._done:
                self._done.wait(0.05)  # the writer thread submits the warm-up tasks right after start
        done, _pending = concurrent.futures.wait(self._prepare_warm, max(0.0, deadline - time.monotonic()))
        return sorted({f.result() for f in done if f.exception() is None})

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every entry submitted so far is written (or failed); True when it is."""
        target = self._submitted
        with self._done:
            return self._done.wait_for(lambda: self._processed >= target, timeout)

    def _prepare_pool(self) -> Any:
        if self._prepare_procs is None:
            self._prepare_procs = self._new_pool(self.config.log.prepare_processes)
            if self._prepare_procs is None:
                self._prepare_failed = True
        return self._prepare_procs

    def _new_pool(self, workers: int) -> Any:
        import concurrent.futures
        import multiprocessing

        try:
            return concurrent.futures.ProcessPoolExecutor(
                max_workers=max(1, workers),
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_heavy_init,
                initargs=(self.config,),
            )
        except Exception as exc:
            log.warning("record-preparing processes unavailable (%s); preparing in the writer thread", exc)
            return None

    def _heavy_pool(self) -> Any:
        if self._heavy is None:
            self._heavy = self._new_pool(self.config.log.heavy_workers)
            if self._heavy is None:
                self._heavy_failed = True
        return self._heavy

    def _prepare(self, item: Exchange | dict[str, Any] | _Prepared | _Inline) -> dict[str, Any]:
        if isinstance(item, _Prepared):
            self._heavy_pending -= 1
            return item.record
        if isinstance(item, _Inline):
            self._heavy_pending -= 1
            return _prepare_exchange(item.exchange, self.redactor)
        if isinstance(item, Exchange):
            return _prepare_exchange(item, self.redactor)
        entry = dict(item)
        entry.setdefault("record_type", "event")
        entry.setdefault("timestamp", _now_iso())
        return entry

    def _commit(self, chain: Chain, entries: list[dict[str, Any] | Encoded], items: list[Item]) -> None:
        t0 = time.perf_counter()
        pending = chain.pending_events()
        for ev in pending:
            ev.setdefault("timestamp", _now_iso())
        try:
            if pending or entries:
                chain.append([*pending, *entries])
                chain.sync()
        except LogWriteError as exc:
            self.metrics.write_errors_total += 1
            if self.failure is None:
                log.error("audit log write failed: %s", exc)
            self.failure = str(exc)
            self._fail(items, exc)
            return
        self.failure = None
        self.durable_seq = chain.next_seq
        with self._done:
            self._processed += len(items)
            self._done.notify_all()
        m = self.metrics
        m.records_written_total += len(entries)
        m.batches_total += 1
        m.batch_size_last = len(entries)
        m.write_seconds.observe(time.perf_counter() - t0)
        _resolve(items, None)
        if self.config.log.access_log:
            for raw in entries:
                rec = orjson.loads(raw[0]) if isinstance(raw, tuple) else raw
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
            self.durable_seq = chain.next_seq
        except Exception:
            log.exception("after-commit step (checkpoint/rotation) failed")
        runner = self.runner
        if runner is not None:
            runner.notify()

    def _fail(self, items: list[Item], exc: Exception) -> None:
        with self._done:
            self._processed += len(items)
            self._done.notify_all()
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
