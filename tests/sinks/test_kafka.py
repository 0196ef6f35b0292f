"""The kafka sink against a real Kafka-protocol broker over real connections.

Stand-in: the broker of the ``noida-db`` wheel (installed into its own venv by
scripts/services.d/noida.sh; no Java, no Kafka jars). Each test starts its own broker process
on a free port with a temporary data dir, so it can stop it for the outage test. It speaks the
Kafka protocol that confluent-kafka (librdkafka) uses, including the idempotent producer's
InitProducerId and ``acks=all``. It keeps its data across a SIGTERM restart, except produce
requests acknowledged while it shuts down (see the restart test); a real broker keeps those.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import need_service
from tests.helpers import ROOT, free_port
from tests.sinks.conftest import (
    FAST,
    NOIDA_VENV,
    LiveLog,
    ServerProcess,
    build_sinks,
    drain,
    noida_binary,
    one_sink,
    shipper_argv,
)
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.codec import ZERO_HASH, leaf_hash
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.ship.runner import Runner
from vllm_audit.sinks.kafka import KafkaSink, producer_config
from vllm_audit.sinks.registry import SinkEnv, parse_sinks

pytestmark = pytest.mark.service

TOPIC = "audit"


class Broker(ServerProcess):
    """One noida-db process serving only Kafka, on its own port and data dir. ``stop`` is
    graceful (SIGTERM): the broker saves what it acknowledged."""

    what = "the Kafka-protocol broker"

    def __init__(self, binary: str, data_dir: Path) -> None:
        super().__init__(free_port())
        self.binary = binary
        self.data_dir = data_dir
        self.bootstrap = f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        port, data = str(self.port), str(self.data_dir)
        return [self.binary, "start", "--only", "kafka", "--kafka-port", port, "--data-dir", data]

    def start(self, log: Path | None = None) -> None:
        super().start(log or self.data_dir.parent / "broker.log")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    binary = noida_binary()
    need_service(binary is not None, f"noida-db (Kafka-protocol broker) in {NOIDA_VENV}: scripts/services.d/noida.sh")
    assert binary is not None
    data = tmp_path / "broker"
    data.mkdir()
    b = Broker(binary, data)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _table(broker: Broker, **options: Any) -> dict[str, Any]:
    return {
        "type": "kafka",
        "bootstrap_servers": broker.bootstrap,
        "topic": TOPIC,
        "create_topic": True,
        "partitions": 3,
        **options,
    }


def _sink(tmp_path: Path, broker: Broker, **options: Any) -> KafkaSink:
    return one_sink(tmp_path, "k", _table(broker, **options), KafkaSink)


@dataclass(frozen=True)
class Message:
    partition: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]

    @property
    def id(self) -> tuple[str, int]:
        return self.headers["writer_id"].decode(), int(self.headers["seq"])


def _consume(broker: Broker) -> list[Message]:
    """Every message of the topic, partition by partition in offset order."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "check", "enable.auto.commit": False})
    try:
        parts = sorted(c.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions)
        out: list[Message] = []
        for p in parts:
            low, high = c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)
            if high <= low:
                continue
            c.assign([TopicPartition(TOPIC, p, low)])
            got = 0
            deadline = time.monotonic() + 30
            while got < high - low and time.monotonic() < deadline:
                for m in c.consume(1000, 0.5):
                    assert m.error() is None, m.error()
                    got += 1
                    value, key = m.value(), m.key()
                    assert value is not None and key is not None
                    raw = m.headers()
                    assert isinstance(raw, list)
                    headers = {k: v.encode() if isinstance(v, str) else v for k, v in raw if v is not None}
                    out.append(Message(p, key, value, headers))
            assert got == high - low, f"partition {p}: read {got} of {high - low}"
        return out
    finally:
        c.close()


def _check(messages: list[Message], logs: list[LiveLog], tmp_path: Path) -> int:
    """Every durable entry of each writer is there, byte-exact and in order; returns the duplicates."""
    reader = LogReader(tmp_path / "log")
    dups = 0
    for lg in logs:
        mine = [m for m in messages if m.key == lg.writer_id.encode()]
        assert len({m.partition for m in mine}) == 1, "one writer's chain spans partitions"
        first: dict[int, Message] = {}
        order: list[int] = []
        for m in mine:
            wid, seq = m.id
            assert wid == lg.writer_id
            if seq in first:
                assert m.value == first[seq].value
                dups += 1
                continue
            first[seq] = m
            order.append(seq)
        assert order == list(range(lg.next_seq)), f"writer {lg.writer_id}: {len(order)} of {lg.next_seq}, in order"
        entries = reader.read(Cursor(lg.writer_id), 1_000_000)
        prev = ZERO_HASH
        for e in entries:
            m = first[e.seq]
            assert m.value == e.line  # the stored bytes, unchanged
            # ... so a consumer re-verifies the chain from the messages alone
            assert leaf_hash(m.value).hex() == m.headers["leaf_hash"].decode()
            assert orjson.loads(m.value)["prev"] == prev
            assert m.headers["record_type"].decode() == e.record_type
            prev = m.headers["leaf_hash"].decode()
    return dups


def test_records_arrive_complete_and_in_per_writer_order(tmp_path: Path, broker: Broker) -> None:
    a, b = LiveLog(tmp_path / "log"), LiveLog(tmp_path / "log")
    a.write(700, batch=70)
    b.write(400, batch=30)
    runner = drain(tmp_path, _sink(tmp_path, broker, batch_max=200))
    assert runner.statuses["k"].delivered == a.next_seq + b.next_seq
    messages = _consume(broker)
    assert len(messages) == a.next_seq + b.next_seq
    assert _check(messages, [a, b], tmp_path) == 0
    # a second run finds the cursor at the end and produces nothing
    drain(tmp_path, _sink(tmp_path, broker))
    assert len(_consume(broker)) == len(messages)


def test_too_large_records_are_quarantined_and_do_not_block(tmp_path: Path, broker: Broker) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(20)
    log.write(1, pad=30_000)  # over the producer's message_max_bytes: librdkafka refuses it
    log.write(20)
    big = log.next_seq
    log.write(1, pad=3_000_000)  # under message_max_bytes but over the broker's limit: the broker refuses it
    log.write(20)
    runner = drain(tmp_path, _sink(tmp_path, broker, message_max_bytes=25_000))
    # the 3 MB entry is refused locally too at this limit; raise it to see the broker refuse one
    log.write(1, pad=3_000_000)
    broker_big = log.next_seq - 1
    log.write(5)
    runner2 = drain(tmp_path, _sink(tmp_path, broker, message_max_bytes=20_000_000))
    assert runner.statuses["k"].quarantined == 2
    assert runner2.statuses["k"].quarantined == 1
    q = [orjson.loads(x) for x in (tmp_path / "state" / "k" / "quarantine.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in q] == [21, big, broker_big]
    assert all("MSG_SIZE_TOO_LARGE" in str(r["reason"]) for r in q), q
    assert "kafka rejected" in str(q[2]["reason"])  # the broker's delivery report, not the client
    seqs = sorted(m.id[1] for m in _consume(broker))
    assert seqs == [s for s in range(log.next_seq) if s not in (21, big, broker_big)]


class Load:
    """A writer thread appending 20 entries at a time, at a steady rate, until stopped."""

    def __init__(self, log: LiveLog) -> None:
        self.log = log
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.paused.is_set():
                self.log.write(20, batch=20)
            self._stop.wait(0.002)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait(cond: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _outage_runner(tmp_path: Path, broker: Broker) -> Runner:
    sink = _sink(tmp_path, broker, batch_max=100, delivery_timeout_s=2)
    return Runner(tmp_path / "log", tmp_path / "state", [sink], FAST)


def test_broker_unresponsive_under_load_then_back_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    """The broker hangs (SIGSTOP) while the log keeps growing; when it resumes the sink catches up.

    Kafka cannot dedupe across producer sessions: entries the broker stored but whose
    acknowledgements were lost with the hang are produced again by the next producer. The test
    counts those duplicates; no entry is missing.
    """
    log = LiveLog(tmp_path / "log")
    log.write(200)
    runner = _outage_runner(tmp_path, broker)
    status = runner.statuses["k"]
    assert broker.proc is not None
    with Load(log):
        runner.start()
        _wait(lambda: status.delivered >= 500, "first deliveries")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            down_at = log.next_seq
            _wait(lambda: status.retried >= 2 and log.next_seq > down_at + 1000, "retries while the log grows")
            assert status.state == "retrying" and "KafkaError" in status.last_error, status
            assert log.next_seq - status.delivered > 500  # the sink is behind while the broker hangs
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        _wait(lambda: status.delivered > down_at + 1500, "catching up")
    _wait(lambda: status.lag_records == 0 and status.state == "running", "caught up")
    runner.stop()
    drain(tmp_path, _sink(tmp_path, broker))
    dups = _check(_consume(broker), [log], tmp_path)
    print(f"kafka broker hang: {log.next_seq} entries, {dups} duplicates")
    assert dups <= 3 * 100  # at most a few replayed batches (batch_max 100)


def test_broker_restarted_while_the_log_grows_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    """The broker is stopped and restarted while the writer keeps writing; the sink catches up.

    The sink is idle when the broker stops: the stand-in acknowledges produce requests that
    race with its own shutdown and then loses them (measured: 11,700 acknowledged messages gone
    when stopped under full load), which a real Kafka broker's controlled shutdown does not.
    """
    log = LiveLog(tmp_path / "log")
    log.write(200)
    runner = _outage_runner(tmp_path, broker)
    status = runner.statuses["k"]
    with Load(log) as load:
        runner.start()
        _wait(lambda: status.delivered >= 500, "first deliveries")
        load.paused.set()
        _wait(lambda: status.delivered == log.next_seq, "idle")
        # The stand-in keeps its data in one JSON file, rewritten now and then; what it acknowledged
        # after the last rewrite is lost on a stop. Wait for a rewrite after the last acknowledgement.
        acked_at = time.time()
        store = broker.data_dir / "kafka.json"
        _wait(lambda: store.exists() and store.stat().st_mtime > acked_at, "the stand-in to persist")
        broker.stop()
        load.paused.clear()
        down_at = log.next_seq
        _wait(lambda: status.retried >= 2 and log.next_seq > down_at + 1000, "retries while the log grows")
        assert status.state == "retrying" and status.delivered == down_at, status
        broker.start()
        _wait(lambda: status.delivered > down_at + 1500, "catching up")
    _wait(lambda: status.lag_records == 0 and status.state == "running", "caught up")
    runner.stop()
    drain(tmp_path, _sink(tmp_path, broker))
    dups = _check(_consume(broker), [log], tmp_path)
    print(f"kafka broker restart: {log.next_seq} entries, {dups} duplicates")
    assert dups == 0  # nothing was in flight when the broker went away


def test_kill_9_of_the_shipper_mid_batch_resumes_from_the_cursor(tmp_path: Path, broker: Broker) -> None:
    """Duplicates here are the batch in flight at the kill (acknowledged, cursor not committed)."""
    from confluent_kafka import Consumer, TopicPartition

    log = LiveLog(tmp_path / "log")
    log.write(10)
    drain(tmp_path, _sink(tmp_path, broker))  # the topic exists
    log.write(6000, batch=500)
    table = _table(broker, batch_max=200)
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "watch"})

    def produced() -> int:
        return sum(c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=5)[1] for p in range(3))

    try:
        for _ in range(2):  # two kills at different points
            start = produced()
            proc = subprocess.Popen(shipper_argv(tmp_path / "log", tmp_path / "state", {"k": table}), cwd=ROOT)
            try:
                deadline = time.monotonic() + 60
                while produced() < start + 1500 and time.monotonic() < deadline:
                    assert proc.poll() is None
                    time.sleep(0.005)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            assert produced() < log.next_seq  # killed mid-way
    finally:
        c.close()
    drain(tmp_path, _sink(tmp_path, broker))
    dups = _check(_consume(broker), [log], tmp_path)
    print(f"kafka kill -9: {log.next_seq} entries, {dups} duplicates")
    assert dups <= 2 * 200


def test_config_errors_name_the_key_and_secrets_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"sinks.k\]?: sasl_username and sasl_password are required"):
        parse_sinks({"k": {"type": "kafka", "security_protocol": "sasl_ssl"}}, "[sinks")
    with pytest.raises(ConfigError, match="topic"):
        parse_sinks({"k": {"type": "kafka", "topic": "a b"}}, "[sinks")
    with pytest.raises(ConfigError, match="compression"):
        parse_sinks({"k": {"type": "kafka", "compression": "brotli"}}, "[sinks")
    table = {
        "type": "kafka",
        "security_protocol": "sasl_ssl",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "audit",
        "sasl_password": {"env": "KAFKA_PW_TEST"},
        "ssl_ca_file": "ca.pem",
        "properties": {"socket.keepalive.enable": "true"},
    }
    spec = parse_sinks({"k": table}, "[sinks")["k"]
    env = SinkEnv(log_dir=tmp_path / "log", state_dir=tmp_path / "state", base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"\[sinks.k\] sasl_password: environment variable KAFKA_PW_TEST"):
        producer_config(spec.options, "[sinks.k]", env)
    monkeypatch.setenv("KAFKA_PW_TEST", "s3cret")
    conf = producer_config(spec.options, "[sinks.k]", env)
    assert conf["sasl.password"] == "s3cret" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["socket.keepalive.enable"] == "true"


def test_a_batch_failing_part_way_commits_the_acknowledged_prefix(tmp_path: Path) -> None:
    """Only the unacknowledged tail is produced again (fewer duplicates after a failed batch)."""
    from confluent_kafka import KafkaError

    from vllm_audit.ship.base import Context, Quarantine, Status
    from vllm_audit.sinks.kafka import _Partial

    log = LiveLog(tmp_path / "log")
    log.write(10)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id), 100)
    sink = build_sinks(tmp_path / "log", tmp_path / "state", {"k": {"type": "kafka"}})[0]
    assert isinstance(sink, KafkaSink)
    timed_out, too_big = KafkaError(KafkaError._MSG_TIMED_OUT), KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    # acknowledged, rejected for good, acknowledged, timed out, acknowledged: the prefix is 3 long
    reports: dict[int, Any] = {0: None, 1: too_big, 2: None, 3: timed_out, 4: None}
    with pytest.raises(_Partial) as caught:
        sink._fail(entries[:6], reports, {}, 6, TimeoutError("late"))
    assert caught.value.settled == 3 and [e.seq for e, _ in caught.value.rejected] == [1]
    # a report still missing ends the prefix too; a local refusal is settled
    with pytest.raises(_Partial) as caught:
        sink._fail(entries[:6], {0: None}, {1: "refused"}, 6, TimeoutError("late"))
    assert caught.value.settled == 2

    class Failing(KafkaSink):
        def deliver(self, writer_id: str, batch: Any) -> Any:
            self._fail(batch, reports, {}, len(batch), TimeoutError("broker went away"))

    failing = Failing("k", sink.options, SinkEnv(tmp_path / "log", tmp_path / "state", tmp_path))
    status = Status("k", "kafka")
    with pytest.raises(TimeoutError, match="broker went away"):
        failing.apply(log.writer_id, entries, Context(Quarantine(tmp_path / "q.jsonl"), status))
    assert failing.load_cursors()[log.writer_id] == Cursor(log.writer_id, 3, entries[2].leaf_hex)
    assert status.quarantined == 1


CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello sinks"}], "max_tokens": 4}

#: [ship] for a gateway under test: quick polls and retries, status files often.
GATEWAY_SHIP = (
    "[ship]\npoll_interval_s = 0.05\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\nstatus_interval_s = 0.1\n"
)


def chat(base: str, request_ids: list[str]) -> list[int]:
    """POST one chat completion per request id (20 at a time); the HTTP statuses, in order."""
    import asyncio

    import aiohttp

    async def run() -> list[int]:
        sem = asyncio.Semaphore(20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

            async def one(rid: str) -> int:
                async with sem, s.post(base + "/v1/chat/completions", json=CHAT, headers={"x-request-id": rid}) as r:
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(one(r) for r in request_ids)))

    return asyncio.run(run())


def ship_status(log_dir: Path, name: str) -> dict[str, Any]:
    """The runner's status file in the gateway's default state dir (empty before the first)."""
    try:
        data = orjson.loads((log_dir / "ship" / f"{name}.status.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
    assert isinstance(data, dict)
    return data


def test_the_gateway_keeps_answering_while_the_broker_is_down(tmp_path: Path, broker: Broker) -> None:
    from tests.helpers import gateway

    cfg = (
        f'[sinks.k]\ntype = "kafka"\nbootstrap_servers = "{broker.bootstrap}"\ntopic = "{TOPIC}"\n'
        "create_topic = true\npartitions = 3\ndelivery_timeout_s = 2\n" + GATEWAY_SHIP
    )
    assert broker.proc is not None
    with gateway(tmp_path, config=cfg) as (base, log_dir, _):
        assert chat(base, [f"up-{i}" for i in range(20)]) == [200] * 20
        _wait(lambda: ship_status(log_dir, "k").get("delivered", 0) >= 20, "the first records in Kafka")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            down = [f"down-{i}" for i in range(200)]
            assert chat(base, down) == [200] * 200  # answered while the sink cannot deliver
            _wait(lambda: ship_status(log_dir, "k").get("retried", 0) >= 1, "the sink to notice")
            assert ship_status(log_dir, "k")["state"] == "retrying"
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        _wait(
            lambda: (st := ship_status(log_dir, "k")).get("state") == "running" and st.get("lag_records") == 0,
            "the sink to catch up",
        )
    ids = [orjson.loads(m.value).get("request_id") for m in _consume(broker)]
    assert {f"up-{i}" for i in range(20)} | set(down) <= set(ids)
