"""Where the collector's entries come from: a NATS JetStream durable pull consumer, or Kafka.

Both hand out :class:`Message` batches; the collector acknowledges a message only after its row
(or the knowledge that it was stored before) is committed, and asks for a message again later
(``retry``) when it arrived ahead of a hole in its writer's chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from vllm_audit.collect.config import CollectKafkaConfig, CollectNatsConfig

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

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
    """A durable pull consumer on ``<subject_prefix>.>`` of the stream (nats-py, private loop)."""

    def __init__(self, cfg: CollectNatsConfig) -> None:
        self.cfg = cfg
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: Any = None
        #: Messages without the sinks' headers (acknowledged and counted, never stored).
        self.unattributed = 0

    def _run(self, coro: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def open(self) -> None:
        if self._nc is None:
            self._run(self._connect())

    async def _connect(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        c = self.cfg

        async def quiet(exc: Exception) -> None:
            log.debug("collect: nats: %s", exc)

        nc = await nats.connect(
            servers=list(c.servers),
            name="vllm-audit-collect",
            connect_timeout=c.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=quiet,
        )
        try:
            js = nc.jetstream(timeout=10.0)
            sub = await js.pull_subscribe(
                f"{c.subject_prefix}.>",
                durable=c.durable,
                stream=c.stream,
                config=ConsumerConfig(
                    durable_name=c.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=c.ack_wait_s,
                    max_ack_pending=c.max_ack_pending,
                    max_waiting=64,
                ),
            )
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js, self._sub = nc, js, sub

    def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        if self._sub is None:
            raise RuntimeError("nats source is not open")
        out: list[Message] = self._run(self._fetch(max_messages, timeout))
        return out

    async def _fetch(self, max_messages: int, timeout: float) -> list[Message]:
        import nats.errors

        try:
            msgs = await self._sub.fetch(max_messages, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        out: list[Message] = []
        bad = []
        for m in msgs:
            ident = _identify(m.headers, m.data)
            if ident is None:
                bad.append(m)
                continue
            out.append(Message(ident[0], ident[1], m.data, m))
        if bad:
            self.unattributed += len(bad)
            log.warning("collect: %d message(s) without writer id / seq headers acknowledged and skipped", len(bad))
            await self._send([m.reply for m in bad], b"+ACK")
        return out

    async def _send(self, replies: Sequence[str], payload: bytes) -> None:
        nc = self._nc
        assert nc is not None
        for r in replies:
            if r:
                await nc.publish(r, payload)
        await nc.flush(10)

    def ack(self, messages: Sequence[Message]) -> None:
        if messages:
            self._run(self._send([m.handle.reply for m in messages], b"+ACK"))

    def retry(self, messages: Sequence[Message], delay: float) -> None:
        if messages:
            payload = b'-NAK {"delay": %d}' % int(delay * 1e9)
            self._run(self._send([m.handle.reply for m in messages], payload))

    def pending(self) -> int:
        """Messages of the stream the consumer has not delivered yet (plus unacknowledged)."""
        if self._sub is None:
            return 0
        info = self._run(self._sub.consumer_info())
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def close(self) -> None:
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if nc is not None:
                try:
                    loop.run_until_complete(asyncio.wait_for(nc.close(), 5.0))
                except Exception as exc:
                    log.debug("collect: nats close: %s", exc)
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()


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
