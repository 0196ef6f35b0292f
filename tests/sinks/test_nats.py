"""The nats sink against a real nats-server with JetStream, over real connections.

The machine's own server on 4222 is shared, so each test starts its own ``nats-server -js`` on
a free port with a temporary store dir (and ``max_payload`` 256 KiB), which it can stop, restart
or freeze for the outage tests.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import need_service
from tests.helpers import ROOT, free_port
from tests.sinks.conftest import FAST, LiveLog, build_sinks, drain, one_sink, shipper_argv
from tests.sinks.test_kafka import GATEWAY_SHIP, Load, _wait, chat, ship_status
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import ZERO_HASH, leaf_hash
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.nats import NatsSink, subject_for
from vllm_audit.sinks.registry import parse_sinks

pytestmark = pytest.mark.service

STREAM = "AUDIT"
PREFIX = "audit"
MAX_PAYLOAD = 256 * 1024
BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


class Server:
    """One nats-server process with JetStream, on its own port and store dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.conf = root / "nats.conf"
        store = root / "js"
        self.conf.write_text(
            f'port: {self.port}\nhost: "127.0.0.1"\nmax_payload: {MAX_PAYLOAD}\njetstream {{ store_dir: "{store}" }}\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        logf = open(self.root / "nats.log", "ab")
        self.proc = subprocess.Popen([BINARY, "-c", str(self.conf)], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "nats-server exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("nats-server did not listen")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): JetStream flushes its store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    import os

    need_service(os.access(BINARY, os.X_OK), f"nats-server binary ({BINARY}; Debian package nats-server)")
    root = tmp_path / "nats"
    root.mkdir()
    s = Server(root)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def id(self) -> tuple[str, int]:
        return self.headers["Vllm-Audit-Writer-Id"], int(self.headers["Vllm-Audit-Seq"])


def _js(server: Server, fn: Any) -> Any:
    """Run ``fn(js)`` on a fresh connection in a private loop."""

    async def main() -> Any:
        import nats

        nc = await nats.connect(server.url, connect_timeout=5)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def _count(server: Server) -> int:
    async def count(js: Any) -> int:
        try:
            return int((await js.stream_info(STREAM)).state.messages)
        except Exception:
            return 0

    return int(_js(server, count))


def _messages(server: Server) -> list[Message]:
    """Every message of the stream, in stream order."""

    async def read(js: Any) -> list[Message]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import FetchTimeoutError

        total = (await js.stream_info(STREAM)).state.messages
        sub = await js.pull_subscribe(
            f"{PREFIX}.>",
            stream=STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        out: list[Message] = []
        deadline = time.monotonic() + 60
        while len(out) < total and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(1000, timeout=2)
            except FetchTimeoutError:
                continue
            out += [Message(m.subject, m.data, dict(m.headers or {})) for m in batch]
        assert len(out) == total, f"read {len(out)} of {total}"
        await sub.unsubscribe()
        return out

    result: list[Message] = _js(server, read)
    return result


def _table(server: Server, **options: Any) -> dict[str, Any]:
    return {
        "type": "nats",
        "servers": [server.url],
        "stream": STREAM,
        "subject_prefix": PREFIX,
        "ack_timeout_s": 2,
        "connect_timeout_s": 1,
        **options,
    }


def _sink(tmp_path: Path, server: Server, **options: Any) -> NatsSink:
    return one_sink(tmp_path, "n", _table(server, **options), NatsSink)


def _check(messages: list[Message], logs: list[LiveLog], tmp_path: Path) -> int:
    """Every durable entry of each writer is there, byte-exact and in order; returns the duplicates."""
    reader = LogReader(tmp_path / "log")
    dups = 0
    for lg in logs:
        mine = [m for m in messages if m.headers["Vllm-Audit-Writer-Id"] == lg.writer_id]
        assert {m.subject for m in mine} == {subject_for(PREFIX, lg.writer_id)}
        first: dict[int, Message] = {}
        order: list[int] = []
        for m in mine:
            seq = m.id[1]
            assert m.headers["Nats-Msg-Id"] == f"{lg.writer_id}:{seq}"
            if seq in first:
                dups += 1
                continue
            first[seq] = m
            order.append(seq)
        assert order == list(range(lg.next_seq)), f"writer {lg.writer_id}: {len(order)} of {lg.next_seq}, in order"
        prev = ZERO_HASH
        for e in reader.read(Cursor(lg.writer_id), 1_000_000):
            m = first[e.seq]
            assert m.data == e.line  # the stored bytes, unchanged: a consumer re-verifies the chain
            assert leaf_hash(m.data).hex() == m.headers["Vllm-Audit-Leaf-Hash"]
            assert orjson.loads(m.data)["prev"] == prev
            assert m.headers["Vllm-Audit-Record-Type"] == e.record_type
            prev = m.headers["Vllm-Audit-Leaf-Hash"]
    return dups


def test_records_arrive_complete_and_in_per_writer_order(tmp_path: Path, server: Server) -> None:
    a, b = LiveLog(tmp_path / "log"), LiveLog(tmp_path / "log")
    a.write(700, batch=70)
    b.write(400, batch=30)
    runner = drain(tmp_path, _sink(tmp_path, server, batch_max=200))
    assert runner.statuses["n"].delivered == a.next_seq + b.next_seq
    messages = _messages(server)
    assert len(messages) == a.next_seq + b.next_seq
    assert _check(messages, [a, b], tmp_path) == 0

    async def config(js: Any) -> Any:
        return (await js.stream_info(STREAM)).config

    cfg = _js(server, config)
    assert (
        cfg.subjects == [f"{PREFIX}.>"]
        and cfg.duplicate_window == 7200
        and str(cfg.storage) in ("file", "StorageType.FILE")
    )


def test_a_replayed_batch_is_stored_once(tmp_path: Path, server: Server) -> None:
    """The crash window: JetStream acknowledged, the cursor was not committed; the replay dedupes."""
    log = LiveLog(tmp_path / "log")
    log.write(100)
    drain(tmp_path, _sink(tmp_path, server))
    log.write(300)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id, 101, ""), 1000)
    assert len(entries) == 300
    first = _sink(tmp_path, server)
    first.open()
    first.deliver(log.writer_id, entries)  # ... and the process dies before the cursor commit
    first.close()
    assert _count(server) == log.next_seq
    again = _sink(tmp_path, server)
    drain(tmp_path, again)
    assert again.duplicates == 300  # JetStream acknowledged them as duplicates and dropped them
    assert _check(_messages(server), [log], tmp_path) == 0


def test_too_large_records_are_quarantined_and_do_not_block(tmp_path: Path, server: Server) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(20)
    log.write(1, pad=MAX_PAYLOAD)  # over the server's max_payload: never sent
    log.write(20)
    drain(tmp_path, _sink(tmp_path, server))
    # a stream whose max_msg_size is below the server's max_payload: JetStream refuses it

    async def shrink(js: Any) -> None:
        info = await js.stream_info(STREAM)
        info.config.max_msg_size = 50_000
        await js.update_stream(info.config)

    _js(server, shrink)
    log.write(1, pad=60_000)
    log.write(20)
    runner = drain(tmp_path, _sink(tmp_path, server, create_stream=False))
    assert runner.statuses["n"].quarantined == 1
    q = [orjson.loads(x) for x in (tmp_path / "state" / "n" / "quarantine.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in q] == [21, 42]
    assert "max_payload" in str(q[0]["reason"]) and "JetStream rejected" in str(q[1]["reason"])
    seqs = [m.id[1] for m in _messages(server)]
    assert seqs == [s for s in range(log.next_seq) if s not in (21, 42)]


def _outage_runner(tmp_path: Path, server: Server) -> Runner:
    return Runner(tmp_path / "log", tmp_path / "state", [_sink(tmp_path, server, batch_max=100)], FAST)


def test_server_restarted_under_load_loses_and_duplicates_nothing(tmp_path: Path, server: Server) -> None:
    """nats-server stops (SIGTERM) while the log keeps growing, then returns; the sink catches up.

    Batches cut off by the stop are published again; JetStream drops those it already stored
    (same ``Nats-Msg-Id`` within the duplicate window), so the stream holds each entry once.
    """
    log = LiveLog(tmp_path / "log")
    log.write(200)
    runner = _outage_runner(tmp_path, server)
    status = runner.statuses["n"]
    with Load(log):
        runner.start()
        _wait(lambda: status.delivered >= 1000, "first deliveries")
        server.stop()
        down_at = log.next_seq
        _wait(lambda: status.retried >= 2 and log.next_seq > down_at + 1000, "retries while the log grows")
        assert status.state == "retrying" and status.last_error, status
        assert log.next_seq - status.delivered > 500  # the sink is behind while the server is down
        server.start()
        _wait(lambda: status.delivered > down_at + 1500, "catching up")
    _wait(lambda: status.lag_records == 0 and status.state == "running", "caught up")
    runner.stop()
    drain(tmp_path, _sink(tmp_path, server))
    dups = _check(_messages(server), [log], tmp_path)
    print(f"nats restart: {log.next_seq} entries, {dups} duplicates stored")
    assert dups == 0


def test_server_unresponsive_under_load_then_back_loses_and_duplicates_nothing(tmp_path: Path, server: Server) -> None:
    """nats-server hangs (SIGSTOP): acknowledgements stop, batches time out and are published
    again when it resumes; the ones it had stored are dropped as duplicates."""
    log = LiveLog(tmp_path / "log")
    log.write(200)
    runner = _outage_runner(tmp_path, server)
    status = runner.statuses["n"]
    assert server.proc is not None
    with Load(log):
        runner.start()
        _wait(lambda: status.delivered >= 1000, "first deliveries")
        server.proc.send_signal(signal.SIGSTOP)
        try:
            down_at = log.next_seq
            _wait(lambda: status.retried >= 2 and log.next_seq > down_at + 1000, "retries while the log grows")
            assert status.state == "retrying", status
        finally:
            server.proc.send_signal(signal.SIGCONT)
        _wait(lambda: status.delivered > down_at + 1500, "catching up")
    _wait(lambda: status.lag_records == 0 and status.state == "running", "caught up")
    runner.stop()
    drain(tmp_path, _sink(tmp_path, server))
    dups = _check(_messages(server), [log], tmp_path)
    print(f"nats hang: {log.next_seq} entries, {dups} duplicates stored")
    assert dups == 0


def test_kill_9_of_the_shipper_mid_batch_resumes_from_the_cursor(tmp_path: Path, server: Server) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(6000, batch=500)
    table = _table(server, batch_max=200)
    for _ in range(2):  # two kills at different points
        start = _count(server)
        proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", {"n": table}), cwd=ROOT)
        try:
            _wait(lambda: proc.poll() is None and _count(server) >= start + 1500, "the shipper's progress")  # noqa: B023
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert _count(server) < log.next_seq  # killed mid-way
    again = _sink(tmp_path, server)
    drain(tmp_path, again)
    assert _check(_messages(server), [log], tmp_path) == 0
    print(f"nats kill -9: {log.next_seq} entries, {again.duplicates} replays dropped by JetStream")


def test_the_gateway_keeps_answering_while_the_server_is_down(tmp_path: Path, server: Server) -> None:
    from tests.helpers import gateway

    cfg = (
        f'[sinks.n]\ntype = "nats"\nservers = ["{server.url}"]\nstream = "{STREAM}"\nsubject_prefix = "{PREFIX}"\n'
        "ack_timeout_s = 2\nconnect_timeout_s = 1\n" + GATEWAY_SHIP
    )
    with gateway(tmp_path, config=cfg) as (base, log_dir, _):
        assert chat(base, [f"up-{i}" for i in range(20)]) == [200] * 20
        _wait(lambda: ship_status(log_dir, "n").get("delivered", 0) >= 20, "the first records in JetStream")
        server.stop()
        try:
            down = [f"down-{i}" for i in range(200)]
            assert chat(base, down) == [200] * 200  # answered while the sink cannot deliver
            _wait(lambda: ship_status(log_dir, "n").get("retried", 0) >= 1, "the sink to notice")
            assert ship_status(log_dir, "n")["state"] == "retrying"
        finally:
            server.start()
        _wait(
            lambda: (st := ship_status(log_dir, "n")).get("state") == "running" and st.get("lag_records") == 0,
            "the sink to catch up",
        )
    ids = [orjson.loads(m.data).get("request_id") for m in _messages(server)]
    assert {f"up-{i}" for i in range(20)} | set(down) <= set(ids)
    assert len(ids) == len({m.id for m in _messages(server)})  # stored once each


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="subject_prefix"):
        parse_sinks({"n": {"type": "nats", "subject_prefix": "a.*"}}, "[sinks")
    with pytest.raises(ConfigError, match="user and password go together"):
        parse_sinks({"n": {"type": "nats", "user": "audit"}}, "[sinks")
    with pytest.raises(ConfigError, match="storage"):
        parse_sinks({"n": {"type": "nats", "storage": "disk"}}, "[sinks")
    table = {"type": "nats", "user": "audit", "password": {"env": "NATS_PW_TEST_UNSET"}}
    with pytest.raises(ConfigError, match=r"sinks.n\] password: environment variable NATS_PW_TEST_UNSET"):
        build_sinks(tmp_path / "log", tmp_path / "state", {"n": table})
    assert subject_for("p", "vm-1.x y") == "p.vm-1_x_y"
