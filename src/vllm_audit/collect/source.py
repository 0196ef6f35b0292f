"""Where the collector's entries come from: a NATS JetStream durable pull consumer, or Kafka.

Both hand out :class:`Message` batches; the collector acknowledges a message only after its row
(or the knowledge that it was stored before) is committed, and asks for a message again later
(``retry``) when it arrived ahead of a hole in its writer's chain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
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

    Kafka keeps one writer's chain in one partition, in order. The collector commits, per
    partition, the offset after the last message it has stored (or found stored); a message
    it must see again (ahead of a hole) makes the partition seek back to it.
    """

    def __init__(self, cfg: CollectKafkaConfig) -> None:
        self.cfg = cfg
        self._consumer: Any = None
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
        self._consumer.subscribe([self.cfg.topic])

    def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        msgs = self._consumer.consume(max_messages, timeout)
        out: list[Message] = []
        for m in msgs:
            if m.error() is not None:
                log.warning("collect: kafka: %s", m.error())
                continue
            ident = _identify(dict(m.headers() or []), m.value() or b"")
            if ident is None:
                self.unattributed += 1
                continue
            out.append(Message(ident[0], ident[1], m.value(), (m.topic(), m.partition(), m.offset())))
        return out

    def ack(self, messages: Sequence[Message]) -> None:
        from confluent_kafka import TopicPartition

        top: dict[tuple[str, int], int] = {}
        for m in messages:
            t, p, o = m.handle
            top[(t, p)] = max(top.get((t, p), -1), o)
        if top:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o + 1) for (t, p), o in top.items()], asynchronous=False
            )

    def retry(self, messages: Sequence[Message], delay: float) -> None:
        from confluent_kafka import TopicPartition

        low: dict[tuple[str, int], int] = {}
        for m in messages:
            t, p, o = m.handle
            low[(t, p)] = min(low.get((t, p), o), o)
        for (t, p), o in low.items():
            self._consumer.seek(TopicPartition(t, p, o))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
