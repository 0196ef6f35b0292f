"""The ``kafka`` sink: every entry as one Kafka message, through confluent-kafka (librdkafka).

* **Message**: value = the stored line bytes, unchanged (a consumer can recompute the leaf hash,
  check ``prev`` links and so re-verify each chain); key = the writer id, so one chain always lands
  in one partition and keeps its order; headers ``writer_id``, ``seq``, ``leaf_hash`` (hex) and
  ``record_type``.
* **Producer**: idempotent (``enable.idempotence=true``, which implies ``acks=all`` and in-order
  retries), so librdkafka's own retries never duplicate or reorder within one producer session.
* **Delivery**: ``deliver`` produces the batch, flushes, and waits for every delivery report. A
  message the broker or the client refuses for good (``MSG_SIZE_TOO_LARGE`` and kin) is
  quarantined and the rest go on; any other error fails the batch (retried by the runner). When a
  batch fails part-way, the cursor is first committed past the acknowledged prefix, so only the
  unacknowledged tail is produced again.
* **Duplicates**: Kafka cannot dedupe across producer sessions. After a shipper crash (or a failed
  batch) the entries acknowledged by the broker but not yet committed to the cursor are produced
  again by a new producer: consumers dedupe by the ``writer_id`` + ``seq`` headers (or the leaf
  hash). Nothing is lost: the cursor only moves after the broker acknowledged.

Tested against the Kafka-protocol broker of the ``noida-db`` wheel (scripts/services.d/noida.sh).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor
from vllm_audit.ship.base import Context, Sink
from vllm_audit.ship.config import Secret
from vllm_audit.sinks.registry import SinkEnv, SinkOptions

if TYPE_CHECKING:
    from confluent_kafka import Producer



class _LibrdkafkaLog(logging.LoggerAdapter[logging.Logger]):
    """librdkafka's own log lines, at debug level: during an outage it logs every reconnect
    attempt as an error, while the runner already reports the failure (status, last_error, a
    warning on the first and every 20th retry)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(level if level >= logging.CRITICAL else logging.DEBUG, msg, *args, **kwargs)


_rdkafka_log = _LibrdkafkaLog(logging.getLogger("vllm_audit.ship.kafka"))

#: librdkafka error names that mean "this message can never be accepted" (quarantine it).
PERMANENT_ERRORS = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",
        "_MSG_SIZE_TOO_LARGE",
        "RECORD_LIST_TOO_LARGE",
        "INVALID_RECORD",
        "INVALID_MSG_SIZE",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Options(SinkOptions):
    """``type = "kafka"``: an idempotent Kafka producer (confluent-kafka)."""

    #: Comma-separated ``host:port`` list of brokers to bootstrap from.
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Topic every entry is produced to (key = writer id, so each chain stays in one partition).
    topic: str = "vllm-audit"
    #: Client id shown in broker logs and quotas.
    client_id: str = "vllm-audit"
    #: "plaintext", "ssl", "sasl_plaintext" or "sasl_ssl".
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = "plaintext"
    #: SASL mechanism when security_protocol is sasl_*.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    #: SASL user name.
    sasl_username: str = ""
    #: SASL password: ``{ env = "NAME" }`` or ``{ file = "/path" }``.
    sasl_password: Secret | None = None
    #: CA bundle (PEM) to verify the brokers' certificates (empty: the system store).
    ssl_ca_file: str = ""
    #: Client certificate (PEM) for mutual TLS.
    ssl_cert_file: str = ""
    #: Client private key (PEM) for mutual TLS.
    ssl_key_file: str = ""
    #: Password of the client private key, if it is encrypted.
    ssl_key_password: Secret | None = None
    #: Batch compression: "none", "gzip", "snappy", "lz4" or "zstd".
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    #: Largest message the producer sends (librdkafka ``message.max.bytes``); larger entries are
    #: quarantined. Keep it at or below the topic's ``max.message.bytes``.
    message_max_bytes: int = 1_000_000
    #: Milliseconds the producer waits to fill a request (librdkafka ``linger.ms``).
    linger_ms: float = 5.0
    #: Seconds a batch may take to be acknowledged (librdkafka ``message.timeout.ms``) before it
    #: fails and is retried from the cursor.
    delivery_timeout_s: float = 30.0
    #: Create the topic at start when it does not exist.
    create_topic: bool = False
    #: Partitions of a topic created by create_topic.
    partitions: int = 6
    #: Replication factor of a topic created by create_topic (-1: the broker's default).
    replication_factor: int = -1
    #: Extra librdkafka producer properties (advanced; they override the ones above).
    properties: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        SinkOptions.__post_init__(self)
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must name at least one broker")
        if not self.topic or len(self.topic) > 249 or not all(c.isalnum() or c in "._-" for c in self.topic):
            raise ValueError(f"topic {self.topic!r}: use 1-249 letters, digits, '.', '_' or '-'")
        if self.message_max_bytes < 1000:
            raise ValueError("message_max_bytes must be at least 1000")
        if self.delivery_timeout_s <= 0 or self.linger_ms < 0:
            raise ValueError("delivery_timeout_s must be positive and linger_ms not negative")
        if self.partitions < 1 or self.replication_factor == 0 or self.replication_factor < -1:
            raise ValueError("partitions must be at least 1 and replication_factor -1 or at least 1")
        if self.security_protocol.startswith("sasl") and (not self.sasl_username or self.sasl_password is None):
            raise ValueError("sasl_username and sasl_password are required with a sasl_* security_protocol")


def producer_config(options: Options, where: str, env: SinkEnv) -> dict[str, Any]:
    """The librdkafka configuration for ``options`` (secrets resolved; ``ConfigError`` naming ``where``)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": options.bootstrap_servers,
        "client.id": options.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "compression.type": options.compression,
        "message.max.bytes": options.message_max_bytes,
        "linger.ms": options.linger_ms,
        "message.timeout.ms": int(options.delivery_timeout_s * 1000),
        # murmur2 on the key, as Java producers do: one writer id → the same partition everywhere.
        "partitioner": "murmur2_random",
        "security.protocol": options.security_protocol,
    }
    if options.security_protocol.startswith("sasl"):
        assert options.sasl_password is not None
        conf["sasl.mechanism"] = options.sasl_mechanism
        conf["sasl.username"] = options.sasl_username
        conf["sasl.password"] = options.sasl_password.resolve(f"{where} sasl_password")
    for key, opt in (
        ("ssl.ca.location", options.ssl_ca_file),
        ("ssl.certificate.location", options.ssl_cert_file),
        ("ssl.key.location", options.ssl_key_file),
    ):
        if opt:
            conf[key] = str(env.path(opt))
    if options.ssl_key_password is not None:
        conf["ssl.key.password"] = options.ssl_key_password.resolve(f"{where} ssl_key_password")
    conf.update(options.properties)
    return conf


class _Partial(Exception):
    """A batch failed after a prefix of it was settled (acknowledged or rejected for good)."""

    def __init__(self, settled: int, rejected: list[tuple[Entry, str]], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.settled = settled
        self.rejected = rejected
        self.cause = cause


class KafkaSink(Sink):
    """Produces each entry's stored bytes to one topic; see the module docstring."""

    kind = "kafka"

    def __init__(self, name: str, options: Options, env: SinkEnv) -> None:
        super().__init__(name, env.state_dir, record_types=options.record_types, batch_max=options.batch_max)
        self.options = options
        self._where = f"[sinks.{name}]"
        self._conf = producer_config(options, self._where, env)
        self._producer: Producer | None = None

    def open(self) -> None:
        from confluent_kafka import Producer

        if self._producer is None:
            # librdkafka's own log lines go to Python logging (served by poll/flush), not stderr
            self._producer = Producer(self._conf, logger=_rdkafka_log)
        # Fail fast (and be retried) while no broker answers, instead of queueing a whole batch.
        md = self._producer.list_topics(timeout=min(10.0, self.options.delivery_timeout_s))
        if self.options.create_topic and self.options.topic not in md.topics:
            self._create_topic()

    def _create_topic(self) -> None:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        admin_conf = {k: v for k, v in self._conf.items() if k.startswith(("bootstrap", "security", "sasl", "ssl"))}
        admin = AdminClient(admin_conf, logger=_rdkafka_log)
        topic = NewTopic(self.options.topic, self.options.partitions, self.options.replication_factor)
        for future in admin.create_topics([topic], request_timeout=15).values():
            try:
                future.result(timeout=20)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(1.0)

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        try:
            super().apply(writer_id, entries, ctx)
        except _Partial as part:
            # Keep what the broker acknowledged: commit past the settled prefix, then fail.
            for entry, reason in part.rejected:
                ctx.quarantine(entry, reason)
            wanted = [e for e in entries if e.record_type in self.record_types]
            if part.settled:
                last = wanted[part.settled - 1]
                self.cursor_file.commit(Cursor(writer_id, last.seq + 1, last.leaf_hex))
            raise part.cause from None

    def deliver(self, writer_id: str, entries: Sequence[Entry]) -> Sequence[tuple[Entry, str]]:
        from confluent_kafka import KafkaException

        producer = self._producer
        if producer is None:
            raise RuntimeError("kafka sink is not open")
        topic = self.options.topic
        key = writer_id.encode()
        n = len(entries)
        # Index of each entry → its error (None: acknowledged); missing: no report yet.
        reports: dict[int, Any] = {}
        refused: dict[int, str] = {}
        produce = producer.produce
        poll = producer.poll
        for i, e in enumerate(entries):
            headers: list[tuple[str, str | bytes | None]] = [
                ("writer_id", key),
                ("seq", b"%d" % e.seq),
                ("leaf_hash", e.leaf_hex.encode()),
                ("record_type", e.record_type.encode()),
            ]

            def report(err: Any, _msg: Any, i: int = i) -> None:
                reports[i] = err

            while True:
                try:
                    produce(topic, value=e.line, key=key, headers=headers, on_delivery=report)
                except BufferError:  # the local queue is full: let deliveries drain
                    poll(0.05)
                    continue
                except KafkaException as exc:
                    err = exc.args[0]
                    if err.name() not in PERMANENT_ERRORS:
                        self._fail(entries, reports, refused, i, exc)
                    refused[i] = f"kafka refused the message ({len(e.line)} bytes): {err.name()}: {err.str()}"
                break
            if i & 255 == 255:
                poll(0)
        deadline = time.monotonic() + self.options.delivery_timeout_s + 5.0
        while len(reports) + len(refused) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(entries, reports, refused, n, TimeoutError("kafka delivery reports did not all arrive"))
            producer.flush(min(left, 1.0))
        rejected: list[tuple[Entry, str]] = []
        for i in range(n):
            if i in refused:
                rejected.append((entries[i], refused[i]))
                continue
            err = reports[i]
            if err is None:
                continue
            if err.name() in PERMANENT_ERRORS:
                size = len(entries[i].line)
                rejected.append((entries[i], f"kafka rejected the message ({size} bytes): {err.name()}: {err.str()}"))
                continue
            self._fail(entries, reports, refused, n, KafkaException(err))
        return rejected

    def _fail(
        self,
        entries: Sequence[Entry],
        reports: dict[int, Any],
        refused: dict[int, str],
        upto: int,
        cause: BaseException,
    ) -> NoReturn:
        """Raise for the batch, keeping the prefix that was acknowledged or rejected for good.

        The runner then closes the sink (dropping this producer) and reopens it with a fresh one.
        """
        settled = 0
        rejected: list[tuple[Entry, str]] = []
        for i in range(upto):
            if i in refused:
                rejected.append((entries[i], refused[i]))
            elif i in reports and reports[i] is None:
                pass
            elif i in reports and reports[i].name() in PERMANENT_ERRORS:
                err = reports[i]
                rejected.append((entries[i], f"kafka rejected the message: {err.name()}: {err.str()}"))
            else:
                break
            settled = i + 1
        raise _Partial(settled, rejected, cause)


def build(name: str, options: Options, env: SinkEnv) -> KafkaSink:
    return KafkaSink(name, options, env)
