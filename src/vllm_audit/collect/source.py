"""Where the collector's entries come from: a NATS JetStream durable pull consumer, or Kafka.

Both hand out :class:`Message` batches; the collector acknowledges a message only after its row
(or the knowledge that it was stored before) is committed, and asks for a message again later
(``retry``) when it arrived ahead of a hole in its writer's chain.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson

from vllm_audit.collect.config import CollectKafkaConfig, CollectNatsConfig
from vllm_audit.collect.natsclient import Connection, NatsError, header_value, status_of

log = logging.getLogger("vllm_audit.collect")


@dataclasses.dataclass(slots=True)
class Message:
    """One shipped entry: the writer, its seq (from the message headers) and the stored line."""

    writer_id: str
    seq: int
    line: bytes
    handle: Any = None


class Source(Protocol):
    """A consumer of the shipped entries."""

    def open(self) -> None: ...

    def fetch(self, max_messages: int, timeout: float) -> list[Message]: ...

    def ack(self, messages: Sequence[Message]) -> None: ...

    def retry(self, messages: Sequence[Message], delay: float) -> None: ...

    def close(self) -> None: ...


def _identify(headers: Any, line: bytes) -> tuple[str, int] | None:
    """``(writer_id, seq)`` from the sinks' headers (None when they are missing or malformed)."""
    if not headers:
        return None
    wid = headers.get("Vllm-Audit-Writer-Id") or headers.get("writer_id")
    seq = headers.get("Vllm-Audit-Seq") or headers.get("seq")
    if isinstance(wid, bytes):
        wid = wid.decode("utf-8", "replace")
    if isinstance(seq, bytes):
        seq = seq.decode("ascii", "replace")
    if not isinstance(wid, str) or not wid or not isinstance(seq, str) or not seq.isdigit():
        return None
    return wid, int(seq)


class NatsSource:
    """A durable pull consumer on ``<subject_prefix>.>`` of the stream (:mod:`.natsclient`).

    ``fetch`` asks for up to ``max_messages`` with ``no_wait`` (the server sends what it has, then
    a 404/408 status); only when nothing came does it send a waiting request (``expires`` =
    ``timeout``) and return as soon as its first messages are in. Messages a waiting request
    delivers later stay in the socket buffer and are handed out by the next ``fetch``.

    Acknowledgements are explicit, one ``+ACK`` per message, all of a batch in one write. The
    consumer's ``AckPolicy.ALL`` (acknowledge the last message, and with it every earlier one)
    would save that write but is not correct here: collectors sharing a durable split its
    messages, so one collector's "all before this" covers messages another has not stored yet,
    and a message offered again after a hole (``-NAK`` with a delay) has an earlier stream
    sequence than the ones stored after it, so acknowledging those would drop it.
    """

    def __init__(self, cfg: CollectNatsConfig) -> None:
        self.cfg = cfg
        self._conn: Connection | None = None
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{cfg.stream}.{cfg.durable}".encode()
        #: Messages without the sinks' headers (acknowledged and counted, never stored).
        self.unattributed = 0

    def open(self) -> None:
        if self._conn is not None:
            return
        conn = Connection(self.cfg.servers, name="vllm-audit-collect", connect_timeout=self.cfg.connect_timeout_s)
        try:
            conn.connect()
            self._ensure_consumer(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _api(self, conn: Connection, subject: str, payload: bytes = b"") -> dict[str, Any]:
        _, data = conn.request(subject, payload, _API_TIMEOUT_S)
        try:
            resp = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise NatsError(f"{subject}: the reply is not JSON: {data[:80]!r}") from None
        if not isinstance(resp, dict):
            raise NatsError(f"{subject}: unexpected reply {data[:80]!r}")
        return resp

    def _ensure_consumer(self, conn: Connection) -> None:
        c = self.cfg
        info = self._api(conn, f"$JS.API.CONSUMER.INFO.{c.stream}.{c.durable}")
        err = info.get("error")
        if err is None:
            return
        if not isinstance(err, dict) or err.get("err_code") != _JS_CONSUMER_NOT_FOUND:
            raise NatsError(f"JetStream consumer {c.stream}/{c.durable}: {_describe(err)}")
        config = {
            "durable_name": c.durable,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "filter_subject": f"{c.subject_prefix}.>",
            "ack_wait": int(c.ack_wait_s * 1e9),
            "max_ack_pending": c.max_ack_pending,
            "max_waiting": 64,
        }
        resp = self._api(
            conn,
            f"$JS.API.CONSUMER.DURABLE.CREATE.{c.stream}.{c.durable}",
            orjson.dumps({"stream_name": c.stream, "config": config}),
        )
        if resp.get("error") is not None:
            raise NatsError(f"creating JetStream consumer {c.stream}/{c.durable}: {_describe(resp['error'])}")

    def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        conn = self._conn
        if conn is None:
            raise RuntimeError("nats source is not open")
        conn.replies.clear()  # statuses of earlier requests
        conn.drain_ready()
        if len(conn.delivered) < max_messages:
            token = conn.new_token()
            want = max_messages - len(conn.delivered)
            conn.publish(self._next, b'{"batch":%d,"no_wait":true}' % want, conn.inbox + b"." + token)
            if not conn.wait(time.monotonic() + _API_TIMEOUT_S, token, max_messages) and not conn.delivered:
                raise NatsError(f"no reply to a pull request from {conn.server} in {_API_TIMEOUT_S:.0f} s")
            _check_status(conn, token)
        if not conn.delivered and timeout > 0:
            token = conn.new_token()
            payload = b'{"batch":%d,"expires":%d}' % (max_messages, int(timeout * 1e9))
            conn.publish(self._next, payload, conn.inbox + b"." + token)
            if not conn.wait(time.monotonic() + timeout + _API_TIMEOUT_S, token, 1) and not conn.delivered:
                raise NatsError(f"no reply to a pull request from {conn.server} in {timeout + _API_TIMEOUT_S:.0f} s")
            _check_status(conn, token)
            conn.drain_ready()
        got, conn.delivered = conn.delivered[:max_messages], conn.delivered[max_messages:]
        out: list[Message] = []
        bad: list[bytes] = []
        for d in got:
            h = d.headers
            wid = header_value(h, b"Vllm-Audit-Writer-Id") or header_value(h, b"writer_id")
            seq = header_value(h, b"Vllm-Audit-Seq") or header_value(h, b"seq")
            if not wid or not seq or not seq.isdigit():
                bad.append(d.reply)
                continue
            out.append(Message(wid.decode("utf-8", "replace"), int(seq), d.data, d.reply))
        if bad:
            self.unattributed += len(bad)
            log.warning("collect: %d message(s) without writer id / seq headers acknowledged and skipped", len(bad))
            conn.publish_many([r for r in bad if r], b"+ACK")
        return out

    def ack(self, messages: Sequence[Message]) -> None:
        if messages:
            self._open_conn().publish_many([m.handle for m in messages], b"+ACK")

    def retry(self, messages: Sequence[Message], delay: float) -> None:
        if messages:
            payload = b'-NAK {"delay": %d}' % int(delay * 1e9)
            self._open_conn().publish_many([m.handle for m in messages], payload)

    def pending(self) -> int:
        """Messages of the stream the consumer has not delivered yet (plus unacknowledged)."""
        c = self.cfg
        info = self._api(self._open_conn(), f"$JS.API.CONSUMER.INFO.{c.stream}.{c.durable}")
        return int(info.get("num_pending") or 0) + int(info.get("num_ack_pending") or 0)

    def _open_conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("nats source is not open")
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if conn.connected:
                conn.flush(2.0)  # the acknowledgements sent last reach the server
        except NatsError as exc:
            log.debug("collect: nats close: %s", exc)
        finally:
            conn.close()


#: Seconds to wait for a JetStream API reply (consumer info / create, a no_wait pull).
_API_TIMEOUT_S = 5.0
#: JetStream's "consumer not found".
_JS_CONSUMER_NOT_FOUND = 10014


def _describe(err: object) -> str:
    if isinstance(err, dict):
        return f"{err.get('description', 'error')} (code {err.get('code')}, err_code {err.get('err_code')})"
    return repr(err)


def _check_status(conn: Connection, token: bytes) -> None:
    """A pull request's end: 404 (no messages), 408 (expired) and 409 (e.g. leadership change)
    are normal; 503 (no responders: JetStream or the consumer is not available) with nothing
    delivered is an error (the collector reconnects with its backoff instead of spinning)."""
    reply = conn.replies.pop(token, None)
    if reply is not None and status_of(reply[0]) == b"503" and not conn.delivered:
        raise NatsError(f"{conn.server}: no JetStream consumer answers the pull request (503)")


class KafkaSource:
    """A consumer-group member on the topic (confluent-kafka); offsets committed after the store.

    Kafka keeps one writer's chain in one partition, in order; several writers may share a
    partition. The source keeps, per assigned partition, the offsets it has handed out and not
    yet seen acknowledged. The offset it commits is the lowest such offset (or the one after the
    highest acknowledged when none is outstanding), so a commit never passes a message the
    collector still has to take — after a crash or a rebalance, the next owner reads again from
    there, and the store skips what it already holds.

    A message that must be seen again (it arrived ahead of a hole in its writer's chain) is held
    in this process and handed out again after the delay; the partition is not rewound, so the
    other messages after it (other writers' entries) are not delivered twice. Held messages of a
    partition taken away by a rebalance are dropped: its new owner reads them from the committed
    offset.
    """

    def __init__(self, cfg: CollectKafkaConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._consumer: Any = None
        self._clock = clock
        #: Offsets handed out and not yet acknowledged, per (topic, partition).
        self._pending: dict[tuple[str, int], set[int]] = {}
        #: One past the highest offset acknowledged (or skipped), per (topic, partition).
        self._done: dict[tuple[str, int], int] = {}
        #: Offset last committed, per (topic, partition).
        self._committed: dict[tuple[str, int], int] = {}
        #: Messages to hand out again: (due time, message).
        self._held: list[tuple[float, Message]] = []
        #: Messages without the sinks' headers (skipped, never stored).
        self.unattributed = 0

    def open(self) -> None:
        if self._consumer is not None:
            return
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            {
                "bootstrap.servers": self.cfg.bootstrap_servers,
                "group.id": self.cfg.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        self._consumer.subscribe([self.cfg.topic], on_revoke=self._revoked, on_lost=self._revoked)

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        """A rebalance took ``partitions`` away: commit what is safe, forget the rest."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._commit(gone)
        for k in gone:
            self._pending.pop(k, None)
            self._done.pop(k, None)
            self._committed.pop(k, None)
        self._held = [(due, m) for due, m in self._held if _tp(m) not in gone]

    def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        if self._consumer is None:
            raise RuntimeError("kafka source is not open")
        now = self._clock()
        due = [m for t, m in self._held if t <= now]
        self._held = [(t, m) for t, m in self._held if t > now]
        if due:
            timeout = 0.0
        elif self._held:
            timeout = max(0.0, min(timeout, min(t for t, _ in self._held) - now))
        out: list[Message] = due[:max_messages]
        self._held += [(now, m) for m in due[max_messages:]]
        room = max_messages - len(out)
        msgs = self._consumer.consume(room, timeout) if room > 0 else []
        skipped: set[tuple[str, int]] = set()
        for m in msgs:
            if m.error() is not None:
                log.warning("collect: kafka: %s", m.error())
                continue
            key = (m.topic(), m.partition())
            ident = _identify(dict(m.headers() or []), m.value() or b"")
            if ident is None:
                self.unattributed += 1
                self._done[key] = max(self._done.get(key, 0), m.offset() + 1)
                skipped.add(key)
                continue
            self._pending.setdefault(key, set()).add(m.offset())
            out.append(Message(ident[0], ident[1], m.value(), (m.topic(), m.partition(), m.offset())))
        if skipped:
            log.warning("collect: %d message(s) without writer_id / seq headers skipped", self.unattributed)
            self._commit(skipped)
        return out

    def ack(self, messages: Sequence[Message]) -> None:
        touched: set[tuple[str, int]] = set()
        for m in messages:
            t, p, o = m.handle
            key = (t, p)
            pend = self._pending.get(key)
            if pend is None or o not in pend:
                continue  # a partition revoked meanwhile: its new owner takes it again
            pend.discard(o)
            self._done[key] = max(self._done.get(key, 0), o + 1)
            touched.add(key)
        self._commit(touched)

    def safe_offset(self, topic: str, partition: int) -> int | None:
        """The offset a commit may name for this partition now (None: nothing taken yet)."""
        key = (topic, partition)
        pend = self._pending.get(key)
        if pend:
            return min(pend)
        return self._done.get(key)

    def _commit(self, keys: set[tuple[str, int]]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = []
        for t, p in sorted(keys):
            o = self.safe_offset(t, p)
            if o is not None and o > self._committed.get((t, p), -1):
                offsets.append(TopicPartition(t, p, o))
        if not offsets or self._consumer is None:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # A rebalance in between: the partition's new owner reads again from the last commit.
            log.warning("collect: kafka offset commit failed: %s", exc)
            return
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def retry(self, messages: Sequence[Message], delay: float) -> None:
        due = self._clock() + delay
        for m in messages:
            if _tp(m) in self._pending and m.handle[2] in self._pending[_tp(m)]:
                self._held.append((due, m))

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._commit(set(self._pending) | set(self._done))
            finally:
                self._consumer.close()
                self._consumer = None
        self._pending.clear()
        self._done.clear()
        self._committed.clear()
        self._held.clear()


def _tp(m: Message) -> tuple[str, int]:
    t, p, _ = m.handle
    return (t, p)
