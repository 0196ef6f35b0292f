"""The background writer: heavy records off the group-commit path, recovery when idle, audited events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from vllm_audit.access.identity import Identity
from vllm_audit.capture import Exchange
from vllm_audit.config import Config, LogConfig
from vllm_audit.errors import LogWriteError
from vllm_audit.integrity.codec import org_tag
from vllm_audit.integrity.reader import LogReader
from vllm_audit.ship.config import ShipConfig
from vllm_audit.writer import AuditWriter


def _exchange(rid: str, prompt: str) -> Exchange:
    ex = Exchange(rid, "POST", "/v1/chat/completions")
    ex.request_body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    ex.request_bytes = len(ex.request_body)
    ex.chunks = [orjson.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]})]
    ex.content_type = b"application/json"
    ex.http_status = 200
    ex.completed = True
    return ex


def _config(tmp_path: Path, heavy: int) -> Config:
    return Config(
        log=LogConfig(dir=str(tmp_path / "log"), heavy_record_bytes=heavy),
        ship=ShipConfig(in_process=False),
    )


def _order(tmp_path: Path, heavy: int) -> list[str]:
    """Submit one multi-megabyte, PII-dense prompt, then 50 small ones; the order they were sealed in."""
    writer = AuditWriter(_config(tmp_path, heavy))
    writer.start()

    async def go() -> None:
        big = " ".join(f"call 138{i:08d} or mail u{i}@example.com" for i in range(60_000))
        futs = [writer.submit(_exchange("big", big), wait=True)]
        await asyncio.sleep(0)  # the big one is queued first
        futs += [writer.submit(_exchange(f"small-{i}", "hello"), wait=True) for i in range(50)]
        await asyncio.gather(*[f for f in futs if f is not None])

    asyncio.run(go())
    writer.stop()
    reader = LogReader(tmp_path / "log", limit="all")
    (wid,) = reader.writer_ids()
    out = []
    for e in reader.entries(wid):
        if e.record_type == "inference":
            out.append(str(e.record()["request_id"]))
    return out


def test_a_heavy_record_does_not_hold_up_other_clients_records(tmp_path: Path) -> None:
    """With the heavy lane the small records are sealed before the multi-megabyte one is redacted;
    without it (heavy_record_bytes = 0) they wait behind it in the same writer thread."""
    with_lane = _order(tmp_path / "lane", 256 * 1024)
    assert with_lane[-1] == "big" and len(with_lane) == 51
    without = _order(tmp_path / "inline", 0)
    assert without[0] == "big"


def test_heavy_record_is_redacted_like_any_other(tmp_path: Path) -> None:
    writer = AuditWriter(_config(tmp_path, 1024))
    writer.start()

    async def go() -> None:
        fut = writer.submit(_exchange("pii", "mail ann@example.com " + "x" * 4000), wait=True)
        assert fut is not None
        await fut

    asyncio.run(go())
    writer.stop()
    assert writer.metrics.heavy_records_total == 1
    raw = b"".join(p.read_bytes() for p in (tmp_path / "log").glob("writers/*/seg-*.jsonl"))
    assert b"ann@example.com" not in raw and b'"request_id":"pii"' in raw


def test_event_with_wait_fails_when_the_log_is_not_accepting(tmp_path: Path) -> None:
    """An audited action (an audit read) that waits for its event learns that it was not written."""
    (tmp_path / "log").write_text("a file where the log directory should be")
    writer = AuditWriter(_config(tmp_path, 0))
    writer.start()
    assert writer.failure is not None

    async def go() -> None:
        fut = writer.submit_event({"event": "audit_read"}, wait=True)
        assert fut is not None
        with pytest.raises(LogWriteError):
            await fut

    asyncio.run(go())
    writer.stop()


RECOVER = textwrap.dedent(
    """
    import asyncio, resource, signal, sys, time
    from vllm_audit.config import Config, LogConfig
    from vllm_audit.integrity.config import IntegrityConfig
    from vllm_audit.ship.config import ShipConfig
    from vllm_audit.writer import AuditWriter

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cfg = Config(log=LogConfig(dir=sys.argv[1]), integrity=IntegrityConfig(heartbeat_seconds=0.2),
                 ship=ShipConfig(in_process=False))
    w = AuditWriter(cfg)
    w.start()
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (w._chain._segment_bytes + 2000, hard))

    async def fill():
        for i in range(200):
            fut = w.submit_event({"event": "probe", "detail": {"pad": "x" * 300, "i": i}}, wait=True)
            try:
                await fut
            except Exception:
                return True
        return False

    assert asyncio.run(fill()), "the write limit was never hit"
    assert w.failure is not None
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the disk is freed; no more traffic
    deadline = time.monotonic() + 20
    while w.failure is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    print("recovered" if w.failure is None else "still failing: " + w.failure)
    w.stop()
    """
)


def test_an_idle_writer_recovers_by_itself_when_the_disk_is_back(tmp_path: Path) -> None:
    """After a write failure, /readyz (writer.failure) clears without any new traffic (item 12)."""
    out = subprocess.run(
        [sys.executable, "-c", RECOVER, str(tmp_path / "log")], capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "recovered", out.stdout + out.stderr[-2000:]
    verify = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "verify", str(tmp_path / "log"),
         "--public-key", str(tmp_path / "log" / "keys" / "signing.pub")],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr




def test_prepare_processes_write_the_same_records_as_the_writer_thread(tmp_path: Path) -> None:
    """Records finalized and redacted in the prepare processes equal those made in-thread."""

    def run(procs: int) -> list[dict[str, object]]:
        cfg = Config(
            log=LogConfig(dir=str(tmp_path / f"log{procs}"), prepare_processes=procs, prepare_min_batch=2),
            ship=ShipConfig(in_process=False),
        )
        writer = AuditWriter(cfg)
        writer.start()

        async def go() -> None:
            exchanges = [_exchange(f"r{i}", f"mail ann{i}@example.com please") for i in range(40)]
            for ex in exchanges[::2]:
                ex.identity = Identity("ann", "acme", auth_status="authenticated", auth_method="api_key")
            futs = [writer.submit(ex, wait=True) for ex in exchanges]
            await asyncio.gather(*[f for f in futs if f is not None])

        asyncio.run(go())
        writer.stop()
        assert (writer.metrics.prepared_in_processes_total > 0) == (procs > 0)
        reader = LogReader(tmp_path / f"log{procs}", limit="all")
        (wid,) = reader.writer_ids()
        recs = [e.record() for e in reader.entries(wid) if e.record_type == "inference"]
        # Each entry's tenant tag is made from its record's org_id (the prepare processes pass it along).
        assert {"acme": 20, "unknown": 20} == Counter(str(r["org_id"]) for r in recs)
        for r in recs:
            assert org_tag(wid, int(str(r["seq"])), str(r["org_id"])).decode() == r["org_tag"]
        volatile = ("seq", "prev", "writer_id", "record_id", "timestamp", "latency_ms", "ttft_ms", "org_tag")
        return sorted(({k: v for k, v in r.items() if k not in volatile} for r in recs), key=lambda r: str(r))

    inline, parallel = run(0), run(2)
    assert len(parallel) == 40 and parallel == inline
    assert all("example.com" not in str(r.get("input_prompt")) for r in parallel)


def test_prepare_processes_start_with_the_writer_and_drain_waits_for_the_records(tmp_path: Path) -> None:
    """The prepare processes are running before the first batch (which would otherwise wait for them
    to import and build a redactor); ``drain`` returns once everything submitted is on disk."""
    import os

    cfg = Config(
        log=LogConfig(dir=str(tmp_path / "log"), prepare_processes=1, prepare_min_batch=1),
        ship=ShipConfig(in_process=False),
    )
    writer = AuditWriter(cfg)
    writer.start()
    try:
        pids = writer.prepare_pids(wait=60.0)
        assert len(pids) == 1 and pids[0] != os.getpid()
        assert Path(f"/proc/{pids[0]}").exists()
        assert 0 == writer.metrics.prepared_in_processes_total  # nothing submitted yet: started with the writer
        # Our own process: the collector tuned as the gateway's (the start-up heap frozen, young
        # collections every GC_YOUNG_THRESHOLD allocations instead of 700).
        import gc

        from vllm_audit._gc import GC_YOUNG_THRESHOLD

        pool = writer._prepare_pool()
        assert pool.submit(gc.get_threshold).result(timeout=60)[0] == GC_YOUNG_THRESHOLD
        assert pool.submit(gc.get_freeze_count).result(timeout=60) > 0
        for i in range(30):
            writer.submit(_exchange(f"d{i}", f"call 138{i:08d} now"))
        assert writer.drain(timeout=60.0)
        reader = LogReader(tmp_path / "log", limit="all")
        (wid,) = reader.writer_ids()
        recs = [e.record() for e in reader.entries(wid) if e.record_type == "inference"]
        assert [f"d{i}" for i in range(30)] == [r["request_id"] for r in recs]
        assert all("138" not in str(r["input_prompt"]) for r in recs)
    finally:
        writer.stop()


def test_prepare_pipeline_keeps_order_and_resolves_only_durable_records(tmp_path: Path) -> None:
    """With prepare processes, batch N+1 is prepared while batch N is sealed: records still take
    the chain in the order they were submitted, a waiting caller is released only once its record
    is durable, and the batch in the processes when the writer stops is written too."""
    cfg = Config(
        log=LogConfig(dir=str(tmp_path / "log"), prepare_processes=2, prepare_min_batch=2, batch_max=32),
        ship=ShipConfig(in_process=False),
    )
    writer = AuditWriter(cfg)
    writer.start()
    writer.prepare_pids(wait=60.0)
    durable_at: dict[str, int] = {}

    def released(rid: str) -> Callable[[asyncio.Future[None]], None]:
        def note(_fut: asyncio.Future[None]) -> None:
            durable_at[rid] = writer.durable_seq  # what was durable when the caller was released

        return note

    async def go() -> None:
        futs = []
        for i in range(400):
            fut = writer.submit(_exchange(f"p{i}", f"mail p{i}@example.com"), wait=True)
            assert fut is not None
            fut.add_done_callback(released(f"p{i}"))
            futs.append(fut)
        await asyncio.gather(*futs)

    asyncio.run(go())
    for i in range(200):  # not waited for: the writer stops with batches still being prepared
        writer.submit(_exchange(f"q{i}", f"call 138{i:08d}"))
    writer.stop()
    assert writer.metrics.prepared_in_processes_total > 0 and writer.metrics.batches_total > 10
    reader = LogReader(tmp_path / "log", limit="all")
    (wid,) = reader.writer_ids()
    recs = [e.record() for e in reader.entries(wid) if e.record_type == "inference"]
    order = [str(r["request_id"]) for r in recs]
    assert order == [f"p{i}" for i in range(400)] + [f"q{i}" for i in range(200)]
    for r in recs[:400]:
        assert int(str(r["seq"])) < durable_at[str(r["request_id"])]  # on disk before the caller went on
    assert not any("example.com" in str(r["input_prompt"]) or "138" in str(r["input_prompt"]) for r in recs)
