"""The ``[collect]`` section: `vllm-audit collect`, the scale-out collector."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True, slots=True)
class CollectNatsConfig:
    """The NATS JetStream stream the replicas' ``nats`` sinks publish to (``[collect.nats]``)."""

    #: Server URLs; the client fails over between them (list every node of the cluster).
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    #: Stream holding the entries (the sinks' ``stream``).
    stream: str = "VLLM_AUDIT"
    #: The sinks' ``subject_prefix``: the collector consumes ``<subject_prefix>.>``.
    subject_prefix: str = "vllm-audit"
    #: Durable pull consumer. Collectors with the same name share the work; collectors with
    #: different names each see every entry (a hot standby; the database keeps rows unique).
    durable: str = "vllm-audit-collect"
    #: Seconds JetStream waits for an acknowledgement before it redelivers a message.
    ack_wait_s: float = 30.0
    #: Most unacknowledged messages the consumer hands out.
    max_ack_pending: int = 100_000
    #: Seconds to wait for a connection.
    connect_timeout_s: float = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class CollectKafkaConfig:
    """The Kafka topic the replicas' ``kafka`` sinks produce to (``[collect.kafka]``)."""

    #: Comma-separated ``host:port`` list of brokers.
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Topic (the sinks' ``topic``; key = writer id, so one chain is in one partition).
    topic: str = "vllm-audit"
    #: Consumer group: collectors in one group share the partitions; offsets are committed
    #: after the rows are stored.
    group_id: str = "vllm-audit-collect"


@dataclasses.dataclass(frozen=True, slots=True)
class CollectConfig:
    """The collector: consume every writer's entries, verify each chain, store centrally (``[collect]``).

    Rows go to the PostgreSQL query store of ``[access.store]`` (``kind = "postgresql"``); the
    collector's chain state lives in the same database and moves in the same transaction.
    """

    #: Where entries come from: "nats" (``[collect.nats]``) or "kafka" (``[collect.kafka]``).
    source: Literal["nats", "kafka"] = "nats"
    #: Public key files (``.pub`` or keyrings) that sign the replicas' checkpoints.
    public_keys: tuple[str, ...] = ()
    #: Directory receiving a central copy of every writer's log (``writers/<id>/seg-*.jsonl``,
    #: manifests and ``checkpoints.jsonl``) that `vllm-audit verify` checks. Empty: no copy.
    archive_dir: str = ""
    #: Most messages fetched and stored in one transaction.
    batch_max: int = 2000
    #: Seconds a hole in a writer's chain may stay open (later entries arrived, earlier ones not)
    #: before the collector raises a ``gap`` alert and continues after it.
    gap_timeout_s: float = 30.0
    #: Seconds before a message that arrived ahead of a hole is offered again.
    redeliver_delay_s: float = 0.5
    #: Seconds between writes of the status file (``vllm-audit collect --status-file``).
    status_interval_s: float = 2.0
    #: Seconds of silence after which the collector's database session counts as dead, on both
    #: ends: the collector's side (TCP user timeout and keepalives, unless the DSN sets them) and
    #: PostgreSQL's (``idle_in_transaction_session_timeout``, ``tcp_user_timeout``), so a collector
    #: cut off in the middle of a batch releases its writers' row locks for the other collectors.
    #: 0: the defaults of libpq and PostgreSQL (a dead peer may hold its locks for hours).
    db_timeout_s: float = 30.0
    #: ``[collect.nats]``: the JetStream consumer (``source = "nats"``).
    nats: CollectNatsConfig = dataclasses.field(default_factory=CollectNatsConfig)
    #: ``[collect.kafka]``: the Kafka consumer group (``source = "kafka"``).
    kafka: CollectKafkaConfig = dataclasses.field(default_factory=CollectKafkaConfig)

    def __post_init__(self) -> None:
        if self.batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        for name in ("gap_timeout_s", "redeliver_delay_s", "status_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not self.db_timeout_s >= 0:
            raise ValueError("db_timeout_s must be 0 (off) or positive")
