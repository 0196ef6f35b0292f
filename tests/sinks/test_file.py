"""The file sink: ECS JSON lines, complete and in order, rotated, exactly once across crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ROOT
from tests.sinks.conftest import LiveLog, build_sinks, shipper_argv
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.ecs import to_ecs
from vllm_audit.sinks.file import FileSink
from vllm_audit.sinks.registry import parse_sinks

FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.02, backoff_max_s=0.2, status_interval_s=0.1)


def _sink(tmp_path: Path, state: str = "state", **options: Any) -> FileSink:
    table = {"type": "file", "directory": str(tmp_path / "out"), **options}
    sink = build_sinks(tmp_path / "log", tmp_path / state, {"f": table})[0]
    assert isinstance(sink, FileSink)
    return sink


def _lines(out: Path) -> list[dict[str, Any]]:
    """Every line of every file in ``out``, rotated files first (oldest first), then the active one."""
    files = sorted(p for p in out.iterdir() if p.name != "vllm-audit.ecs.jsonl")
    files.append(out / "vllm-audit.ecs.jsonl")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.exists():
            rows += [orjson.loads(line) for line in f.read_bytes().splitlines()]
    return rows


def _keys(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(r["vllm_audit"]["writer_id"], r["vllm_audit"]["seq"]) for r in rows]


def _assert_exactly(rows: list[dict[str, Any]], log: LiveLog | list[LiveLog]) -> None:
    """Every durable entry of each writer once, in seq order within the writer."""
    logs = log if isinstance(log, list) else [log]
    keys = _keys(rows)
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicates"
    for lg in logs:
        seqs = [s for w, s in keys if w == lg.writer_id]
        assert seqs == list(range(lg.next_seq)), f"writer {lg.writer_id}: {len(seqs)} of {lg.next_seq}"


def _drain(tmp_path: Path, sink: FileSink, state: str = "state") -> Runner:
    runner = Runner(tmp_path / "log", tmp_path / state, [sink], FAST)
    assert runner.run_until_caught_up(60)
    return runner


def test_records_arrive_complete_and_in_order_as_ecs(tmp_path: Path) -> None:
    a, b = LiveLog(tmp_path / "log"), LiveLog(tmp_path / "log")
    a.write(300, batch=70)
    b.write(200, batch=30)
    sink = _sink(tmp_path)
    _drain(tmp_path, sink)
    rows = _lines(tmp_path / "out")
    _assert_exactly(rows, [a, b])
    # each line is exactly the ECS view of the stored entry (complete: every field is there)
    reader = LogReader(tmp_path / "log")
    expect = {e.key: to_ecs(e) for w in (a, b) for e in reader.read(Cursor(w.writer_id), 10_000)}
    for r in rows:
        assert r == expect[f"{r['vllm_audit']['writer_id']}:{r['vllm_audit']['seq']}"]
    first = next(r for r in rows if r["labels"]["record_type"] == "inference")
    assert first["gen_ai"]["usage"] == {"input_tokens": 50 + 0, "output_tokens": 80}
    assert first["vllm_audit"]["input_prompt"][0]["content"].endswith("é中")
    events = [r for r in rows if r["labels"]["record_type"] == "event"]
    assert {e["event"]["action"] for e in events} >= {"writer_started"}


def test_stored_format_writes_the_stored_line_byte_for_byte(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(50)
    _drain(tmp_path, _sink(tmp_path, format="stored"))
    got = (tmp_path / "out" / "vllm-audit.ecs.jsonl").read_bytes().splitlines()
    reader = LogReader(tmp_path / "log")
    assert got == [e.line for e in reader.read(Cursor(log.writer_id), 1000)]


def test_size_rotation_keeps_max_files_and_loses_nothing(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(400)
    sink = _sink(tmp_path, max_bytes=40_000, max_files=0, batch_max=20)
    _drain(tmp_path, sink)
    out = tmp_path / "out"
    rotated = sink.rotated_files()
    assert len(rotated) >= 5
    for f in [*rotated, sink.path]:
        assert f.stat().st_size <= 40_000
    _assert_exactly(_lines(out), log)
    # with max_files, only the newest rotated files stay
    sink2 = _sink(tmp_path, "state2", directory=str(tmp_path / "out2"), max_bytes=40_000, max_files=2, batch_max=20)
    _drain(tmp_path, sink2, "state2")
    kept = sink2.rotated_files()
    assert len(kept) == 2
    assert [p.name for p in kept] == [p.name for p in sorted(kept)]
    tail = _keys(_lines(tmp_path / "out2"))
    assert tail[-1] == (log.writer_id, log.next_seq - 1)
    assert [s for _, s in tail] == list(range(tail[0][1], log.next_seq))


def test_time_rotation_at_the_end_of_the_period(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(10)
    sink = _sink(tmp_path, rotate_every_s=3600)
    _drain(tmp_path, sink)
    assert sink.rotated_files() == []
    # the active file was last written in an hour that has ended: the next batch rotates first
    hour_ago = time.time() - 3600
    os.utime(sink.path, (hour_ago, hour_ago))
    log.write(10)
    sink2 = _sink(tmp_path, rotate_every_s=3600)
    _drain(tmp_path, sink2)
    assert len(sink2.rotated_files()) == 1
    old = [orjson.loads(x) for x in sink2.rotated_files()[0].read_bytes().splitlines()]
    new = [orjson.loads(x) for x in sink2.path.read_bytes().splitlines()]
    assert _keys(old)[-1][1] + 1 == _keys(new)[0][1]
    _assert_exactly(_lines(tmp_path / "out"), log)


def test_replay_of_an_unacknowledged_batch_is_not_written_twice(tmp_path: Path) -> None:
    """The crash window: lines written and fsynced, cursor not yet committed."""
    log = LiveLog(tmp_path / "log")
    log.write(100)
    first = _sink(tmp_path)
    _drain(tmp_path, first)
    log.write(60)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id, 101, ""), 1000)
    assert len(entries) == 60
    first.open()
    first.deliver(log.writer_id, entries)  # ... and the process dies before the cursor commit
    first.close()
    again = _sink(tmp_path)
    _drain(tmp_path, again)
    assert again.skipped == 60
    _assert_exactly(_lines(tmp_path / "out"), log)


def test_a_torn_last_line_is_cut_and_written_again(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(30)
    _drain(tmp_path, _sink(tmp_path))
    log.write(30)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id, 31, ""), 1000)
    path = tmp_path / "out" / "vllm-audit.ecs.jsonl"
    with open(path, "ab") as f:  # a crash in the middle of a batch's write
        whole = b"".join(orjson.dumps(to_ecs(e)) + b"\n" for e in entries[:10])
        f.write(whole + orjson.dumps(to_ecs(entries[10]))[:50])
    again = _sink(tmp_path)
    _drain(tmp_path, again)
    assert again.skipped == 10
    _assert_exactly(_lines(tmp_path / "out"), log)


def test_a_line_over_max_line_bytes_is_quarantined_and_does_not_block(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(20)
    log.write(1, pad=20_000)
    log.write(20)
    sink = _sink(tmp_path, max_line_bytes=10_000)
    runner = _drain(tmp_path, sink)
    status = runner.statuses["f"]
    assert status.quarantined == 1
    q = [orjson.loads(x) for x in (tmp_path / "state" / "f" / "quarantine.jsonl").read_bytes().splitlines()]
    assert [(r["writer_id"], r["seq"]) for r in q] == [(log.writer_id, 21)]
    assert "max_line_bytes" in q[0]["reason"]
    seqs = [s for _, s in _keys(_lines(tmp_path / "out"))]
    assert seqs == [s for s in range(log.next_seq) if s != 21]


def test_stopped_under_load_then_restarted_loses_nothing(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(50)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            log.write(20, batch=20)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, batch_max=50)], FAST)
        runner.start()
        deadline = time.monotonic() + 30
        while runner.statuses["f"].delivered < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.stop()  # the sink is down while the writer keeps writing
        down_at = log.next_seq
        deadline = time.monotonic() + 30
        while log.next_seq < down_at + 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        runner = Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, batch_max=50)], FAST)
        runner.start()
        deadline = time.monotonic() + 30
        while runner.statuses["f"].delivered < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        writer.join()
    runner.stop()
    _drain(tmp_path, _sink(tmp_path))
    _assert_exactly(_lines(tmp_path / "out"), log)


def test_kill_9_of_the_shipper_mid_batch_resumes_from_the_cursor(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(6000, batch=500)
    table = {"type": "file", "directory": str(tmp_path / "out"), "batch_max": 200}
    out = tmp_path / "out" / "vllm-audit.ecs.jsonl"
    for _ in range(2):  # two kills at different points
        proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", {"f": table}), cwd=ROOT)
        try:
            start = out.stat().st_size if out.exists() else 0
            deadline = time.monotonic() + 60
            while (not out.exists() or out.stat().st_size < start + 300_000) and time.monotonic() < deadline:
                assert proc.poll() is None
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert 0 < len(out.read_bytes().splitlines()) < log.next_seq
    sink = _sink(tmp_path)
    _drain(tmp_path, sink)
    _assert_exactly(_lines(tmp_path / "out"), log)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory is required"):
        parse_sinks({"f": {"type": "file"}}, "[sinks")
    with pytest.raises(ConfigError, match="max_bytes"):
        parse_sinks({"f": {"type": "file", "directory": "x", "max_bytes": "big"}}, "[sinks")
    with pytest.raises(ConfigError, match="format"):
        parse_sinks({"f": {"type": "file", "directory": "x", "format": "xml"}}, "[sinks")
    with pytest.raises(ConfigError, match="unknown key 'rotate'"):
        parse_sinks({"f": {"type": "file", "directory": "x", "rotate": 1}}, "[sinks")


def test_a_second_writer_of_the_same_file_is_refused(tmp_path: Path) -> None:
    one, two = _sink(tmp_path), _sink(tmp_path)
    one.open()
    try:
        with pytest.raises(RuntimeError, match="another process"):
            two.open()
    finally:
        one.close()


def test_the_gateway_keeps_answering_while_the_file_sink_cannot_write(tmp_path: Path) -> None:
    """The sink's directory cannot be created (a file is in the way), then can."""
    from tests.helpers import gateway
    from tests.sinks.conftest import FAST_SHIP_TOML, post_chats, sink_status, wait_until

    blocker = tmp_path / "out"
    cfg = f'[sinks.f]\ntype = "file"\ndirectory = "{blocker}"\nrecord_types = ["inference"]\n' + FAST_SHIP_TOML
    with gateway(tmp_path, config=cfg) as (base, log_dir, _):
        assert post_chats(base, [f"up-{i}" for i in range(20)]) == [200] * 20
        wait_until(lambda: sink_status(log_dir, "f").get("delivered", 0) >= 20, "the first records written")
        (blocker / "vllm-audit.ecs.jsonl").rename(tmp_path / "first.jsonl")
        blocker.rmdir()
        blocker.write_text("in the way")
        down = [f"down-{i}" for i in range(200)]
        assert post_chats(base, down) == [200] * 200  # answered while the sink cannot write
        wait_until(lambda: sink_status(log_dir, "f").get("state") == "retrying", "the sink to notice")
        blocker.unlink()
        wait_until(
            lambda: (st := sink_status(log_dir, "f")).get("state") == "running" and st.get("lag_records") == 0,
            "the sink to catch up",
        )
    rows = [
        orjson.loads(x)
        for p in (tmp_path / "first.jsonl", blocker / "vllm-audit.ecs.jsonl")
        for x in p.read_bytes().splitlines()
    ]
    ids = [r["http"]["request"]["id"] for r in rows]
    assert {f"up-{i}" for i in range(20)} | set(down) <= set(ids)
    assert len(ids) == len(set(ids))
