"""The collector's Kafka source against a real Kafka-protocol broker over real connections.

Stand-in broker: the ``noida-db`` wheel's (see tests/sinks/test_kafka.py; scripts/services.d/noida.sh
installs it). Logs are written through the real Chain and shipped by the real ``kafka`` sink; the
hole test hand-produces entries with the sink's headers into a one-partition topic, so two writers
share a partition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.collect.conftest import PG_DSN, pg_rows, wait_until
from tests.collect.test_collector import entries, write_log
from tests.conftest import need_service
from tests.sinks.conftest import NOIDA_VENV, build_sinks, noida_binary
from tests.sinks.test_kafka import Broker
from vllm_audit.collect.collector import Collector
from vllm_audit.collect.source import KafkaSource
from vllm_audit.config import load_config
from vllm_audit.integrity.keys import load_public_keys, write_keypair
from vllm_audit.integrity.verify import verify_log
from vllm_audit.ship.config import ShipConfig
from vllm_audit.ship.runner import Runner

logging.getLogger("vllm_audit").setLevel(logging.CRITICAL)
FAST = ShipConfig(poll_interval_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.5, status_interval_s=0.1)


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


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    write_keypair(tmp_path / "k", "test/collect-kafka")
    return tmp_path / "k.key", tmp_path / "k.pub"


def kafka_collector(tmp_path: Path, prefix: str, broker: Broker, topic: str, pub: Path, **collect: Any) -> Collector:
    extra = "".join(f"{k} = {v}\n" for k, v in collect.items())
    cfg = tmp_path / "collect.toml"
    cfg.write_text(
        f'[log]\ndir = "{tmp_path / "collector-log"}"\n'
        f'[access.store]\nkind = "postgresql"\ndsn = "{PG_DSN}"\ntable_prefix = "{prefix}"\n'
        f'reader_role = "{prefix}_reader"\n'
        f'[collect]\nsource = "kafka"\npublic_keys = ["{pub}"]\narchive_dir = "{tmp_path / "archive"}"\n{extra}'
        f'[collect.kafka]\nbootstrap_servers = "{broker.bootstrap}"\ntopic = "{topic}"\ngroup_id = "collect"\n'
    )
    return Collector(load_config(cfg))


def ship_kafka(log_dir: Path, broker: Broker, topic: str, partitions: int) -> None:
    table = {
        "type": "kafka",
        "bootstrap_servers": broker.bootstrap,
        "topic": topic,
        "create_topic": True,
        "partitions": partitions,
    }
    sinks = build_sinks(log_dir, log_dir / "ship", {"k": table})
    assert Runner(log_dir, log_dir / "ship", sinks, FAST).run_until_caught_up(60)


def produce(broker: Broker, topic: str, msgs: list[tuple[str, int, bytes]]) -> None:
    """``(writer_id, seq, line)`` with the kafka sink's key and headers, into partition 0."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"})
    for wid, seq, line in msgs:
        p.produce(topic, value=line, key=wid.encode(), partition=0, headers=[("writer_id", wid), ("seq", str(seq))])
    assert p.flush(30) == 0


def create_topic(broker: Broker, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
        f.result(30)


def next_seq(c: Collector, wid: str) -> int:
    got = c.store.states().get(wid)
    return got[0].next_seq if got else 0


def test_kafka_source_stores_every_record_once_and_the_archive_verifies(
    tmp_path: Path, broker: Broker, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Two writers shipped by the real kafka sink (3 partitions) collected through the consumer
    group: every record once, both chains verified, the archive copy verifies, no alerts."""
    key, pub = keypair
    logs = [tmp_path / "r1", tmp_path / "r2"]
    wids = [write_log(d, key, n) for d, n in zip(logs, (180, 120), strict=True)]
    for d in logs:
        ship_kafka(d, broker, "audit", 3)
    totals = {w: len(entries(d, w)) for d, w in zip(logs, wids, strict=True)}
    c = kafka_collector(tmp_path, pg_prefix, broker, "audit", pub)
    try:
        c.open()
        wait_until(lambda: (c.step(0.3), all(next_seq(c, w) == n for w, n in totals.items()))[1], "both chains", 90, 0)
        rows = pg_rows(pg_prefix, "SELECT count(*), count(DISTINCT (writer_id, seq)) FROM {p}_records")
        print(f"kafka source: entries {sum(totals.values())}, rows {rows[0]}, duplicates {c.stats.duplicates}")
        assert [(300, 300)] == rows
        assert [] == c.store.alert_rows()
        assert all(st.stopped and st.signed_size > 0 for st, _ in c.store.states().values())
    finally:
        c.close()
    rep = verify_log(tmp_path / "archive", load_public_keys([pub]))
    assert rep.intact, rep.problems
    assert {w.writer_id: w.entries for w in rep.writers} == totals


def test_a_held_message_neither_rewinds_its_partition_nor_is_committed_past(
    tmp_path: Path, broker: Broker, pg_prefix: str, keypair: tuple[Path, Path]
) -> None:
    """Writers A and B share one partition. A's entries 30.. arrive before 20..29 (a hole), B's
    follow them. The collector holds A's early entries for later, takes B's at once and must
    (1) not deliver B's entries again (no rewind of the partition: 0 duplicates), (2) commit no
    offset past A's held entries: a collector that crashes (closes) and a new group member that
    starts after the hole filled still get them, and A's chain completes with no gap."""
    key, pub = keypair
    wa = write_log(tmp_path / "ra", key, 60)
    wb = write_log(tmp_path / "rb", key, 40)
    la, lb = entries(tmp_path / "ra", wa), entries(tmp_path / "rb", wb)
    create_topic(broker, "holes", 1)
    first = [(wa, s, ln) for s, ln in la if s < 20] + [(wa, s, ln) for s, ln in la if s >= 30]
    produce(broker, "holes", first + [(wb, s, ln) for s, ln in lb])
    c = kafka_collector(tmp_path, pg_prefix, broker, "holes", pub, gap_timeout_s=600, redeliver_delay_s=0.05)
    c.open()
    try:
        wait_until(lambda: (c.step(0.3), next_seq(c, wb) == len(lb) and next_seq(c, wa) == 20)[1], "B and A..19", 90, 0)
        for _ in range(10):  # A's held entries come round again; B's must not
            c.step(0.1)
        assert isinstance(c.source, KafkaSource)
        deferred, dups = c.stats.deferred, c.stats.duplicates
        # What a crash leaves committed: nothing past A's first held entry (offset 20 of the partition).
        committed = c.source.safe_offset("holes", 0)
    finally:
        c.close()
    print(f"kafka hole: deferred {deferred}, duplicates {dups}, committed offset {committed}")
    assert 0 == dups  # the partition was not rewound over B's entries
    assert committed is not None and committed <= 20
    assert deferred >= len(la) - 30
    produce(broker, "holes", [(wa, s, ln) for s, ln in la if 20 <= s < 30])
    c2 = kafka_collector(tmp_path, pg_prefix, broker, "holes", pub, gap_timeout_s=600, redeliver_delay_s=0.05)
    c2.open()
    try:
        wait_until(lambda: (c2.step(0.3), next_seq(c2, wa) == len(la))[1], "A complete after the restart", 90, 0)
        assert [] == c2.store.alert_rows()
    finally:
        c2.close()
    rows = pg_rows(pg_prefix, "SELECT writer_id, count(*), count(DISTINCT seq) FROM {p}_records GROUP BY writer_id")
    print(f"kafka hole: rows per writer {sorted((n, d) for _, n, d in rows)}")
    assert sorted((n, d) for _, n, d in rows) == [(40, 40), (60, 60)]
