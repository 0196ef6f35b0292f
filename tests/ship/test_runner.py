"""The projection runner: own cursor per projection, retries with backoff, quarantine, isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from vllm_audit.integrity.chain import Chain
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.config import IntegrityConfig
from vllm_audit.integrity.keys import write_keypair
from vllm_audit.integrity.reader import Cursor
from vllm_audit.ship.base import Quarantine, Rejected, Sink
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner

FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.01, backoff_max_s=0.05, status_interval_s=0.05)


class ListSink(Sink):
    """A sink whose 'downstream system' is a list (what a real sink's server would receive)."""

    kind = "list"

    def __init__(self, name: str, state: Path, fail: Callable[[Sequence[Entry]], None] | None = None) -> None:
        super().__init__(name, state)
        self.got: list[tuple[str, int]] = []
        self.fail = fail

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        if self.fail is not None:
            self.fail(entries)
        rejected = []
        for e in entries:
            if b'"reject-me"' in e.line:
                rejected.append((e, "too large for the downstream"))
            else:
                self.got.append((e.writer_id, e.seq))
        return rejected


def _log(tmp_path: Path, n: int = 50) -> tuple[Path, str, int]:
    write_keypair(tmp_path / "k", "test/ship")
    chain = Chain(tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key"), segment_max_bytes=8192))
    for i in range(0, n, 10):
        recs = [{"record_type": "inference", "request_id": f"r{j}", "pad": "x" * 100} for j in range(i, i + 10)]
        chain.append(chain.pending_events() + recs)
        chain.sync()
        chain.after_commit()
    chain.close()  # signs a final checkpoint over everything
    return tmp_path / "log", chain.writer_id, chain.next_seq


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_catches_up_in_order_and_resumes_from_the_cursor(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)
    sink = ListSink("a", tmp_path / "state")
    assert Runner(log, tmp_path / "state", [sink], FAST).run_until_caught_up(30)
    assert sink.got == [(wid, s) for s in range(total)]
    again = ListSink("a", tmp_path / "state")  # a restart: the cursor file says where it was
    assert Runner(log, tmp_path / "state", [again], FAST).run_until_caught_up(30)
    assert again.got == []
    assert again.load_cursors()[wid] == Cursor(wid, total, again.load_cursors()[wid].last_leaf)


def test_lag_is_reported_while_the_projection_is_failing(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)

    def down(_entries: Sequence[Entry]) -> None:
        raise ConnectionError("downstream down")

    sink = ListSink("down", tmp_path / "state", fail=down)
    runner = Runner(log, tmp_path / "state", [sink], FAST)
    runner.start()
    try:
        st = runner.statuses["down"]
        _wait(lambda: st.state == "retrying" and st.retried >= 2)
        assert st.lag_records == total
        seen = set()
        target = st.retried + 3
        deadline = time.monotonic() + 20
        while st.retried < target and time.monotonic() < deadline:  # across reopens it never claims "running"
            seen.add(st.state)
        assert st.retried >= target and seen == {"retrying"}, seen
    finally:
        runner.stop()


def test_transient_failures_are_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)
    calls = {"n": 0}

    def flaky(_entries: Sequence[Entry]) -> None:
        calls["n"] += 1
        if calls["n"] % 3 != 0:
            raise ConnectionError("downstream unavailable")

    sink = ListSink("flaky", tmp_path / "state", fail=flaky)
    runner = Runner(log, tmp_path / "state", [sink], FAST)
    runner.start()
    try:
        _wait(lambda: runner.statuses["flaky"].lag_records == 0 and len(sink.got) == total)
    finally:
        runner.stop()
    st = runner.statuses["flaky"]
    assert sink.got == [(wid, s) for s in range(total)]
    assert st.retried >= 2 and "downstream unavailable" in st.last_error


def test_a_rejected_entry_is_quarantined_and_does_not_block_the_rest(tmp_path: Path) -> None:
    write_keypair(tmp_path / "k", "test/ship")
    chain = Chain(tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key")))
    recs = [{"record_type": "inference", "request_id": "reject-me" if i == 3 else f"r{i}"} for i in range(8)]
    chain.append(chain.pending_events() + recs)
    chain.sync()
    chain.close()
    sink = ListSink("q", tmp_path / "state")
    runner = Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)
    assert runner.run_until_caught_up(30)
    assert runner.statuses["q"].quarantined == 1
    (entry,) = Quarantine(tmp_path / "state" / "q" / "quarantine.jsonl").entries()
    assert entry["reason"] == "too large for the downstream" and entry["writer_id"] == chain.writer_id
    # Everything else, including the entries after it, was delivered.
    assert sink.got == [(chain.writer_id, s) for s in range(chain.next_seq) if s != entry["seq"]]


def test_a_stuck_projection_slows_only_itself(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)
    release = threading.Event()

    def stuck(_entries: Sequence[Entry]) -> None:
        release.wait(30)

    slow = ListSink("slow", tmp_path / "state", fail=stuck)
    fast = ListSink("fast", tmp_path / "state")
    runner = Runner(log, tmp_path / "state", [slow, fast], FAST)
    runner.start()
    try:
        _wait(lambda: len(fast.got) == total)
        assert slow.got == []
        release.set()
        _wait(lambda: len(slow.got) == total)
    finally:
        release.set()
        runner.stop()


def test_one_process_runs_a_projection_the_other_stands_by(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)
    first = ListSink("one", tmp_path / "state")
    second = ListSink("one", tmp_path / "state")
    r1 = Runner(log, tmp_path / "state", [first], FAST)
    r2 = Runner(log, tmp_path / "state", [second], FAST)
    r1.start()
    try:
        _wait(lambda: len(first.got) == total)
        r2.start()
        _wait(lambda: r2.statuses["one"].state == "standby")
    finally:
        r1.stop()
    try:
        _wait(lambda: r2.statuses["one"].state == "running")
        assert second.got == []  # it took over at the committed cursor: nothing twice
    finally:
        r2.stop()


class Unused(Sink):
    kind = "unused"

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        raise Rejected("never called")


def test_record_types_filter_moves_the_cursor_past_other_entries(tmp_path: Path) -> None:
    log, wid, total = _log(tmp_path)
    sink = ListSink("events", tmp_path / "state")
    sink.record_types = frozenset({"event"})
    assert Runner(log, tmp_path / "state", [sink], FAST).run_until_caught_up(30)
    assert 0 < len(sink.got) < total
    assert sink.load_cursors()[wid].next_seq == total


def test_projection_names_must_be_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Runner(tmp_path, tmp_path, [Unused("x", tmp_path), Unused("x", tmp_path)])


def test_the_durable_hint_lets_other_processes_read_ahead_of_checkpoints(tmp_path: Path) -> None:
    """``writers/<id>/durable`` (rewritten after each fsync) bounds readers in other processes."""
    from vllm_audit.integrity.reader import LogReader

    write_keypair(tmp_path / "k", "test/ship")
    chain = Chain(
        tmp_path / "log", IntegrityConfig(signing_key=str(tmp_path / "k.key"), checkpoint_every_records=10**6)
    )
    chain.append(chain.pending_events() + [{"record_type": "inference", "request_id": f"r{i}"} for i in range(5)])
    chain.sync()
    reader = LogReader(tmp_path / "log", limit="durable")
    assert reader.signed_size(chain.writer_id) == 0
    assert reader.durable_size(chain.writer_id) == chain.next_seq
    chain.append([{"record_type": "inference", "request_id": "written-not-synced"}])
    assert reader.durable_size(chain.writer_id) == chain.next_seq - 1  # only what was fsynced
    chain.close()
