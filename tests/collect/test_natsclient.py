"""The collector's NATS client and JetStream source against a real nats-server."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.collect.conftest import NatsServer, publish, wait_until
from tests.helpers import free_port
from vllm_audit.collect.config import CollectNatsConfig
from vllm_audit.collect.natsclient import Connection, NatsError, header_value, parse_server, status_of
from vllm_audit.collect.source import Message, NatsSource

STREAM = "VACN"
SUBJ = "vacn"


def source(server: NatsServer, **kw: object) -> NatsSource:
    cfg = CollectNatsConfig(servers=(server.url,), stream=STREAM, subject_prefix=SUBJ, durable="t", **kw)  # type: ignore[arg-type]
    return NatsSource(cfg)


def test_server_urls_parse_or_name_the_problem() -> None:
    assert parse_server("nats://u:p%40ss@h1:4333") == parse_server("nats://u:p%40ss@h1:4333")
    s = parse_server("tls://h2")
    assert (s.host, s.port, s.tls, s.user) == ("h2", 4222, True, "")
    assert parse_server("h3:5000").port == 5000
    assert parse_server("nats://u:p%40ss@h1:4333").password == "p@ss"
    for bad in ("http://h:1", "nats://", "nats://h:notaport"):
        with pytest.raises(ValueError, match="NATS server"):
            parse_server(bad)


def test_header_block_parsing() -> None:
    h = b"NATS/1.0\r\nNats-Msg-Id: w:1\r\nVllm-Audit-Writer-Id: w-1\r\nVllm-Audit-Seq: 17\r\n\r\n"
    assert header_value(h, b"Vllm-Audit-Writer-Id") == b"w-1"
    assert header_value(h, b"Vllm-Audit-Seq") == b"17"
    assert header_value(h, b"Seq") is None
    assert status_of(h) == b""
    assert status_of(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\n\r\n") == b"408"


def test_unreachable_servers_are_named() -> None:
    port = free_port()
    conn = Connection([f"nats://127.0.0.1:{port}"], name="t", connect_timeout=1.0)
    with pytest.raises(NatsError, match=f"no NATS server reachable \\(127.0.0.1:{port}: "):
        conn.connect()


def test_fetch_ack_retry_and_unattributed(nats_server: NatsServer) -> None:
    """Pulled messages carry their writer and seq; a retried message comes back after its delay;
    acknowledged ones do not; a message without the sink's headers is acknowledged and counted."""
    publish(nats_server.url, STREAM, SUBJ, [("w1", i, b'{"i":%d}' % i) for i in range(5)])

    async def bare() -> None:
        import nats

        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish(f"{SUBJ}.x", b"no headers")
        await nc.close()

    asyncio.run(bare())
    src = source(nats_server)
    src.open()
    try:
        got = src.fetch(100, 1.0)
        assert [(m.writer_id, m.seq, m.line) for m in got] == [("w1", i, b'{"i":%d}' % i) for i in range(5)]
        assert src.unattributed == 1
        src.ack(got[:3])
        src.retry(got[3:], 0.3)
        t0 = time.monotonic()
        again = wait_until(lambda: src.fetch(100, 0.5), "the retried messages", 10, 0)
        assert [m.seq for m in again] == [3, 4] and time.monotonic() - t0 >= 0.25
        assert src.pending() == 2  # delivered, not acknowledged yet
        src.ack(again)
        wait_until(lambda: src.pending() == 0, "all acknowledged", 10)
        assert src.fetch(100, 0.2) == []
    finally:
        src.close()
    # A new connection on the same durable sees nothing again: the acknowledgements held.
    src2 = source(nats_server)
    src2.open()
    try:
        assert src2.fetch(100, 0.3) == [] and src2.pending() == 0
    finally:
        src2.close()


def test_messages_larger_than_one_read(nats_server: NatsServer) -> None:
    """Frames split across socket reads (payloads of 700 KB) come out whole and in order."""
    big = [("w1", i, bytes([65 + i]) * 700_000) for i in range(6)]
    publish(nats_server.url, STREAM, SUBJ, big)
    src = source(nats_server)
    src.open()
    try:
        got: list[Message] = []
        while len(got) < 6:
            got += src.fetch(4, 2.0)
        assert [(m.seq, m.line) for m in got] == [(s, ln) for _, s, ln in big]
        src.ack(got)
    finally:
        src.close()


def test_a_silent_server_is_an_error_not_a_hang() -> None:
    """A peer that accepts the connection and never speaks NATS: open fails within its timeout."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    try:
        port = ls.getsockname()[1]
        src = NatsSource(CollectNatsConfig(servers=(f"nats://127.0.0.1:{port}",), connect_timeout_s=0.5))
        t0 = time.monotonic()
        with pytest.raises(NatsError, match="no answer"):
            src.open()
        assert time.monotonic() - t0 < 3
    finally:
        ls.close()
