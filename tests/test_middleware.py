"""AuditMiddleware driven by hand over ASGI (no server): streaming, usage, failures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import read_entries, read_records
from vllm_audit.config import Config, config_from_mapping
from vllm_audit.demo import DemoEngine
from vllm_audit.middleware import AuditMiddleware
from vllm_audit.record import json_schema
from vllm_audit.types import Message, Receive, Scope, Send


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"log": {"dir": str(tmp_path / "log")}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_mapping(data)


def http_scope(path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "method": "POST" if body else "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": hdrs + (headers or []),
        "client": ("203.0.113.7", 50000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "http_version": "1.1",
    }


class Client:
    """Feeds a request and collects what the server sends, message by message."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent: list[Message] = []
        self.disconnect = asyncio.Event()
        self._body_given = False

    async def receive(self) -> Message:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def call(app: Any, path: str, payload: Any = None, headers: list[tuple[bytes, bytes]] | None = None) -> Client:
    body = payload if isinstance(payload, bytes) else (orjson.dumps(payload) if payload is not None else b"")
    client = Client(body)
    await app(http_scope(path, body, headers), client.receive, client.send)
    return client


Audited = Callable[..., AuditMiddleware]


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[Audited]:
    mws: list[AuditMiddleware] = []

    def make(inner: Any = None, **sections: dict[str, Any]) -> AuditMiddleware:
        cfg = make_config(tmp_path, **sections)
        mw = AuditMiddleware(inner or DemoEngine(cfg.gateway), cfg)
        mws.append(mw)
        return mw

    yield make
    for mw in mws:
        mw.writer.stop()


CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello audit"}], "max_tokens": 5}


async def test_each_sse_event_reaches_the_client_before_the_next_is_produced(audited: Audited, tmp_path: Path) -> None:
    """A stream is passed on event by event: the client holds event 1 while the app is still blocked."""
    gate = asyncio.Event()
    seen_before_gate: list[bytes] = []

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
                "more_body": True,
            }
        )
        await gate.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    mw = audited(slow_stream)
    client = Client(orjson.dumps({**CHAT, "stream": True}))
    task = asyncio.create_task(mw(http_scope("/v1/chat/completions", client.body), client.receive, client.send))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(client.sent) >= 2:
            break
    seen_before_gate = [m.get("body", b"") for m in client.sent if m["type"] == "http.response.body"]
    assert [b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'] == seen_before_gate
    assert 200 == client.status
    gate.set()
    await task
    assert client.content.endswith(b"data: [DONE]\n\n")
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "a" == rec["output_response"]
    assert "ok" == rec["status"]


async def test_injected_usage_is_recorded_and_stripped_byte_for_byte(audited: Audited, tmp_path: Path) -> None:
    """The client gets exactly what the bare server sends without include_usage; the record has usage."""
    req = {**CHAT, "stream": True}
    hdr = [(b"x-request-id", b"same-id")]
    bare = await call(DemoEngine(), "/v1/chat/completions", req, hdr)
    mw = audited()
    got = await call(mw, "/v1/chat/completions", req, hdr)
    norm = re.compile(rb'"created":\d+')
    assert norm.sub(b"", bare.content) == norm.sub(b"", got.content)
    assert b'"usage"' not in got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "injected" == rec["usage_source"]
    assert rec["completion_tokens"] == 5
    assert rec["total_tokens"] == rec["prompt_tokens"] + 5
    assert rec["ttft_ms"] is not None and rec["ttft_ms"] <= rec["latency_ms"]


async def test_client_requested_usage_is_passed_through(audited: Audited, tmp_path: Path) -> None:
    """When the client asked for usage it keeps its usage chunk."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert b'"usage"' in got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "stream" == rec["usage_source"]


async def test_usage_chunk_split_across_messages_is_still_stripped(audited: Audited, tmp_path: Path) -> None:
    """An SSE event cut in two ASGI messages is reassembled before the usage check."""
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    parts = [
        b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' + usage[:20],
        usage[20:],
        b"data: [DONE]\n\n",
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, p in enumerate(parts):
            await send({"type": "http.response.body", "body": p, "more_body": i < len(parts) - 1})

    mw = audited(app)
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True})
    assert b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n' == got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (3, 2, 5) == (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"])


async def test_usage_that_never_came_is_recorded_as_absent(audited: Audited, tmp_path: Path) -> None:
    """A server that ignores include_usage leaves the counts null, never invented."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n',
                "more_body": True,
            }
        )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    mw = audited(app)
    await call(mw, "/v1/chat/completions", {**CHAT, "stream": True})
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (None, None, None) == (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"])


async def test_disconnect_mid_stream_records_cancelled_with_partial_output(audited: Audited, tmp_path: Path) -> None:
    """A client that goes away mid-stream leaves a 'cancelled' record with what it had received."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n',
                "more_body": True,
            }
        )
        msg = await receive()  # like starlette's listen_for_disconnect
        assert "http.disconnect" == msg["type"]

    mw = audited(app)
    client = Client(orjson.dumps({**CHAT, "stream": True}))
    task = asyncio.create_task(mw(http_scope("/v1/chat/completions", client.body), client.receive, client.send))
    await asyncio.sleep(0.05)
    client.disconnect.set()
    await task
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "cancelled" == rec["status"]
    assert "partial" == rec["output_response"]


async def test_app_exception_is_recorded_and_reraised(audited: Audited, tmp_path: Path) -> None:
    """An exception in the served app leaves an upstream_error record, without its message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("secret internal detail sk-abcdef")

    mw = audited(app)
    with pytest.raises(RuntimeError):
        await call(mw, "/v1/completions", {"model": "m", "prompt": "p"})
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("upstream_error", 500, "RuntimeError") == (rec["status"], rec["http_status"], rec["error_type"])
    assert "sk-abcdef" not in orjson.dumps(rec).decode()


async def test_every_route_gets_a_record(audited: Audited, tmp_path: Path) -> None:
    """Chat, completions, embeddings, responses, models and unknown routes are all recorded."""
    mw = audited()
    await call(mw, "/v1/chat/completions", CHAT)
    await call(mw, "/v1/completions", {"model": "demo-model", "prompt": "hi", "max_tokens": 3})
    await call(mw, "/v1/embeddings", {"model": "demo-model", "input": ["a", "b"]})
    await call(mw, "/v1/responses", {"model": "demo-model", "input": "tell me"})
    await call(mw, "/v1/models")
    await call(mw, "/tokenize", {"model": "demo-model", "prompt": "abc"})
    await call(mw, "/v1/nothing-here", {"x": 1})
    mw.writer.stop()
    recs = read_records(tmp_path / "log")
    routes = [r["route"] for r in recs]
    assert [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
        "/tokenize",
        "/v1/nothing-here",
    ] == routes
    by = {r["route"]: r for r in recs}
    assert {"embeddings": 2, "dimensions": 16} == by["/v1/embeddings"]["output_response"]
    assert by["/v1/responses"]["total_tokens"] and by["/v1/responses"]["output_response"].startswith("You said")
    assert 404 == by["/v1/nothing-here"]["http_status"]
    schema = json_schema()
    for rec in recs:
        jsonschema.validate(rec, schema)


async def test_request_id_is_honoured_echoed_and_passed_upstream(audited: Audited, tmp_path: Path) -> None:
    """A safe inbound id is kept, echoed, and the upstream's own id is built from it."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"req-42")])
    assert b"req-42" == got.headers[b"x-request-id"]
    assert orjson.loads(got.content)["id"] == "chatcmpl-req-42"
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("req-42", "client", "chatcmpl-req-42") == (rec["request_id"], rec["request_id_source"], rec["response_id"])


async def test_invalid_request_id_is_replaced_and_the_fact_recorded(audited: Audited, tmp_path: Path) -> None:
    """An unsafe inbound id is replaced by a UUIDv7 and the record says why."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"bad id\x01<script>")])
    new_id = got.headers[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", new_id)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (new_id, "replaced") == (rec["request_id"], rec["request_id_source"])
    assert any("characters" in n for n in rec["notes"])


async def test_no_client_controlled_switch_turns_logging_off(audited: Audited, tmp_path: Path) -> None:
    """Headers and body fields that other tools honour as 'do not log' change nothing here."""
    mw = audited()
    no_log_headers = [(b"x-no-log", b"1"), (b"x-audit-disable", b"true"), (b"helicone-omit-request", b"true")]
    body = {**CHAT, "store": False, "metadata": {"no_log": True, "disable_logging": True}, "no-log": True}
    await call(mw, "/v1/chat/completions", body, no_log_headers)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert rec["input_prompt"] is not None and rec["output_response"] is not None


async def test_oversized_headers_get_431_and_a_record(audited: Audited, tmp_path: Path) -> None:
    """A 1 MB header is refused with an OpenAI-shaped 431, and recorded."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-big", b"a" * 1_000_000)])
    assert 431 == got.status
    assert "request_header_fields_too_large" == orjson.loads(got.content)["error"]["code"]
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (431, "client_error") == (rec["http_status"], rec["status"])


async def test_oversized_body_gets_413_and_a_record(audited: Audited, tmp_path: Path) -> None:
    """A body over [edge] max_request_bytes is refused with 413, and recorded."""
    mw = audited(edge={"max_request_bytes": 1000})
    got = await call(mw, "/v1/completions", {"model": "demo-model", "prompt": "x" * 5000})
    assert 413 == got.status
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (413, "request_too_large") == (rec["http_status"], rec["error_type"])


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(audited: Audited, tmp_path: Path) -> None:
    """X-Forwarded-For from a peer outside trusted_proxies does not change client_ip."""
    mw = audited()
    await call(mw, "/v1/chat/completions", CHAT, [(b"x-forwarded-for", b"1.2.3.4")])
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("203.0.113.7", True) == (rec["client_ip"], rec["forwarded_ignored"])


async def test_forwarded_for_through_trusted_proxy_is_believed(audited: Audited, tmp_path: Path) -> None:
    """Through a trusted proxy, the right-most untrusted X-Forwarded-For hop is the client."""
    mw = audited(edge={"trusted_proxies": ["203.0.113.0/24", "10.0.0.0/8"]})
    await call(mw, "/v1/chat/completions", CHAT, [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.9, 10.1.2.3")])
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("198.51.100.9", False) == (rec["client_ip"], rec["forwarded_ignored"])


async def test_fail_closed_answers_503_when_the_log_cannot_be_written(tmp_path: Path) -> None:
    """With the log directory unusable, fail_closed refuses requests with an OpenAI-shaped 503."""
    blocker = tmp_path / "log"
    blocker.write_text("a file where the log directory should be")
    cfg = config_from_mapping({"log": {"dir": str(blocker), "on_failure": "fail_closed"}})
    mw = AuditMiddleware(DemoEngine(), cfg)
    try:
        got = await call(mw, "/v1/chat/completions", CHAT)
        assert 503 == got.status
        assert "audit_log_unavailable" == orjson.loads(got.content)["error"]["code"]
        ready = await call(mw, "/audit/readyz")
        assert 503 == ready.status
    finally:
        mw.writer.stop()


async def test_fail_open_serves_and_counts_dropped_records(tmp_path: Path) -> None:
    """With fail_open the request is served, and the dropped record is counted in /metrics."""
    blocker = tmp_path / "log"
    blocker.write_text("not a directory")
    cfg = config_from_mapping({"log": {"dir": str(blocker), "on_failure": "fail_open"}})
    mw = AuditMiddleware(DemoEngine(), cfg)
    dropped = re.compile(r"vllm_audit_records_dropped_total\{[^}]*\} (\d+)")
    try:
        before = (await call(mw, "/audit/metrics")).content.decode()
        got = await call(mw, "/v1/chat/completions", CHAT)
        assert 200 == got.status
        metrics = (await call(mw, "/audit/metrics")).content.decode()
        b, a = dropped.search(before), dropped.search(metrics)
        assert b is not None and a is not None, metrics
        # The request's record, dropped at the edge (the writer also drops its start-up settings event).
        assert 1 == mw.metrics.edge_dropped_total and int(a.group(1)) >= int(b.group(1)) + 1, metrics
        assert re.search(r"vllm_audit_log_writable\{[^}]*\} 0\b", metrics)
    finally:
        mw.writer.stop()


@pytest.mark.parametrize("durability", ["strict", "async"])
async def test_strict_durability_releases_the_last_byte_after_fsync(tmp_path: Path, durability: str) -> None:
    """Strict: while the writer holds the record, the client does not have the end of the response;
    once it does, the record is in the segment file. Async durability is the control: the response
    completes while the record is still held."""
    from vllm_audit.writer import AuditWriter

    cfg = make_config(tmp_path, log={"durability": durability, "heavy_record_bytes": 0})
    gate = Gate(cfg)
    writer = AuditWriter(cfg, redactor=gate)
    writer.start()
    mw = AuditMiddleware(DemoEngine(cfg.gateway), cfg, writer=writer)
    try:
        task = asyncio.create_task(call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"durable-1")]))
        assert await asyncio.to_thread(gate.entered.wait, 30)  # the writer is working on the record
        if durability == "async":  # the control: the response completes while the record is held
            await asyncio.wait_for(asyncio.shield(task), 30)
        else:  # strict: it cannot complete while the record is held (a wait that can only fail)
            done, _ = await asyncio.wait({task}, timeout=0.3)
            assert not done
        gate.open.set()
        got = await task
        assert 200 == got.status
        # no writer.stop(): in strict mode the record must already be on disk
        on_disk = [r["request_id"] for r in read_records(tmp_path / "log")]
        if durability == "strict":
            assert ["durable-1"] == on_disk
    finally:
        gate.open.set()
        writer.stop()


async def test_writer_records_its_start_as_an_event(audited: Audited, tmp_path: Path) -> None:
    """The first entry of a new chain is a writer_started event."""
    mw = audited()
    await call(mw, "/v1/models")
    mw.writer.stop()
    entries = read_entries(tmp_path / "log")
    assert "event" == entries[0]["record_type"]
    assert 0 == entries[0]["seq"]


async def test_pathsend_file_response_is_a_completed_exchange(audited: Audited, tmp_path: Path) -> None:
    """A response sent with the http.response.pathsend extension is recorded as complete."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    mw = audited(app)
    got = await call(mw, "/files/x")
    assert ["http.response.start", "http.response.pathsend"] == [m["type"] for m in got.sent]
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("ok", 200) == (rec["status"], rec["http_status"])


async def test_fingerprint_moved_to_the_usage_chunk_is_put_back_on_the_finish_chunk(
    audited: Audited, tmp_path: Path
) -> None:
    """vLLM moves system_fingerprint to the usage chunk when usage is on; the client still gets it
    on the finish chunk, byte for byte as without usage, and the record has it as model_revision."""
    req = {**CHAT, "stream": True}
    hdr = [(b"x-request-id", b"fp-1")]
    bare = await call(DemoEngine(), "/v1/chat/completions", req, hdr)
    assert b'"system_fingerprint":"demo-rev-1"}' in bare.content
    mw = audited()
    got = await call(mw, "/v1/chat/completions", req, hdr)
    norm = re.compile(rb'"created":\d+')
    assert norm.sub(b"", bare.content) == norm.sub(b"", got.content)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "demo-rev-1" == rec["model_revision"]


async def test_every_finish_chunk_waits_for_the_usage_chunk_and_gets_the_fingerprint() -> None:
    """With n > 1 each choice's finish chunk is held (other events pass) and gets the fingerprint back."""
    from vllm_audit.middleware import _UsageStripper

    s = _UsageStripper()
    fin0 = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    tok1 = b'data: {"choices":[{"index":1,"delta":{"content":"x"}}]}\n\n'
    fin1 = b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1},"system_fingerprint":"fp"}\n\n'
    assert b"" == s.feed(fin0)
    assert tok1 == s.feed(tok1)
    assert b"" == s.feed(fin1)
    fp = b',"system_fingerprint":"fp"}\n\n'
    assert fin0[:-3] + fp + fin1[:-3] + fp == s.feed(usage)


_SSE_EVENTS = st.sampled_from(
    [
        b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}',
        b'data: {"choices":[{"index":1,"delta":{"content":"y"},"finish_reason":null}]}',
        b'data: {"choices":[{"index":0,"delta":{"content":"z"},"finish_reason":null}],"usage":{"prompt_tokens":1}}',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}',
        b": ping",
    ]
)
_USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":1,"total_tokens":2},"system_fingerprint":"fp"}'


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(_SSE_EVENTS, max_size=12),
    usage=st.booleans(),
    tail=st.lists(_SSE_EVENTS, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    sep=st.sampled_from([b"\n\n", b"\r\n\r\n"]),
)
def test_usage_stripper_output_does_not_depend_on_how_the_stream_was_chunked(
    head: list[bytes], usage: bool, tail: list[bytes], cuts: list[int], sep: bytes
) -> None:
    """The same stream fed one event per message (as vLLM sends it) and coalesced into arbitrary
    chunks (as a fast upstream's bytes arrive): the client gets the same bytes either way, with
    LF LF or CR LF CR LF between events."""
    from vllm_audit.middleware import _UsageStripper

    events = [*head, *([_USAGE] if usage else []), *tail, b"data: [DONE]"]
    stream = b"".join(e + sep for e in events)
    one = _UsageStripper()
    expected = b"".join(one.feed(e + sep) for e in events) + one.flush()
    coalesced = _UsageStripper()
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    got = b"".join(coalesced.feed(stream[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a)
    assert expected == got + coalesced.flush()
    assert one.captured == coalesced.captured
    if usage:
        assert b'"choices":[]' not in got


def test_usage_stripper_passes_crlf_framed_events_on_as_they_come() -> None:
    """CR LF CR LF framing (allowed by SSE): each event is passed on when it arrives, not held
    until the stream ends, and the usage event we asked for is removed with its boundary."""
    from vllm_audit.middleware import _UsageStripper

    s = _UsageStripper()
    content = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\r\n\r\n'
    assert s.feed(content) == content
    assert s.feed(content) == content
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
    assert s.feed(finish) == b""  # waits for the usage event (its fingerprint goes back on it)
    released = s.feed(_USAGE + b"\r\n\r\n")
    assert released == finish[:-5] + b',"system_fingerprint":"fp"}\r\n\r\n'
    assert s.captured == _USAGE
    assert s.feed(b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert s.flush() == b""


# -- issue 15 -------------------------------------------------------------------------------------


class Gate:
    """A redactor that holds the writer thread until released: a real backlog, on demand."""

    def __init__(self, cfg: Config) -> None:
        import threading

        from vllm_audit.writer import load_redactor

        self.inner = load_redactor(cfg)
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        self.open.wait(30)
        return self.inner(rec)


def gated(tmp_path: Path, inner: Any = None, **sections: dict[str, Any]) -> tuple[AuditMiddleware, Gate]:
    from vllm_audit.writer import AuditWriter

    cfg = make_config(tmp_path, log={"durable_timeout_s": 0.3, "heavy_record_bytes": 0}, **sections)
    gate = Gate(cfg)
    writer = AuditWriter(cfg, redactor=gate)
    writer.start()
    return AuditMiddleware(inner or DemoEngine(cfg.gateway), cfg, writer=writer), gate


def delivery_events(log_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_entries(log_dir) if e.get("event") == "delivery_failed"]


def streaming_response_like(inner: Any) -> Any:
    """Send every body as starlette's StreamingResponse (vLLM, the proxy) does: the last bytes
    (``data: [DONE]``) as an ordinary chunk, then an empty final message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def split(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body") and message.get("body"):
                await send({**message, "more_body": True})
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await inner(scope, receive, split)

    return app


async def test_strict_stream_gets_no_done_when_its_record_is_not_durable(tmp_path: Path) -> None:
    """[DONE] is held with the final message: a record that misses its deadline leaves the client
    with an aborted stream (no terminator), and a delivery_failed event amends the record."""
    mw, gate = gated(tmp_path, streaming_response_like(DemoEngine()))
    try:
        got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True}, [(b"x-request-id", b"late")])
        assert 200 == got.status
        assert b"[DONE]" not in got.content
        assert b'"content":"You"' in got.content  # the tokens before the terminator did stream
        assert got.sent[-1].get("more_body") is True  # never completed
    finally:
        gate.open.set()
        mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    (ev,) = delivery_events(tmp_path / "log")
    assert (rec["record_id"], "late", "aborted", "durable_timeout") == (
        ev["record_id"],
        ev["request_id"],
        ev["client_received"],
        ev["reason"],
    )


def coalesced(inner: Any) -> Any:
    """All of a stream's body arrives as one chunk (a fast upstream, or TCP coalescing for a slow
    reader), then an empty final message: as the proxy hands on what one read returned."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        parts: list[bytes] = []

        async def collect(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await inner(scope, receive, collect)

    return app


@pytest.mark.parametrize("kind", ["chat", "chat-crlf", "responses"])
async def test_strict_coalesced_stream_sends_its_tokens_now_and_holds_only_the_terminator(
    tmp_path: Path, kind: str
) -> None:
    """A stream that arrives in one chunk: its tokens reach the client while the record is not yet
    durable (time to first token is not the fsync's), the terminating event only once it is."""
    from vllm_audit.writer import AuditWriter

    inner: Any = DemoEngine()
    if kind == "chat-crlf":
        plain = inner

        async def crlf_app(scope: Scope, receive: Receive, send: Send) -> None:
            async def to_crlf(message: Message) -> None:
                if message["type"] == "http.response.body":
                    message = {**message, "body": message.get("body", b"").replace(b"\n\n", b"\r\n\r\n")}
                await send(message)

            await plain(scope, receive, to_crlf)

        inner = crlf_app
    cfg = make_config(tmp_path, log={"durable_timeout_s": 60, "heavy_record_bytes": 0})
    gate = Gate(cfg)
    writer = AuditWriter(cfg, redactor=gate)
    writer.start()
    mw = AuditMiddleware(coalesced(inner), cfg, writer=writer)
    payload: dict[str, Any]
    if kind == "responses":
        path, payload = "/v1/responses", {"model": "demo-model", "input": "hi"}
        token, end = b'"delta":"You"', b"response.completed"
    else:
        path, payload, token, end = "/v1/chat/completions", CHAT, b'"content":"You"', b"[DONE]"
    client = Client(orjson.dumps({**payload, "stream": True}))
    task = asyncio.create_task(mw(http_scope(path, client.body), client.receive, client.send))
    try:
        assert await asyncio.to_thread(gate.entered.wait, 30)  # the writer holds the record: not durable
        assert token in client.content
        assert end not in client.content
        gate.open.set()
        await asyncio.wait_for(task, 30)
    finally:
        gate.open.set()
        writer.stop()
    assert end in client.content.rsplit(b"\n\n" if kind != "chat-crlf" else b"\r\n\r\n", 2)[-2]
    (rec,) = read_records(tmp_path / "log")
    assert "You" in (rec["output_response"] or "") and [] == delivery_events(tmp_path / "log")


async def test_strict_body_with_content_length_holds_its_last_bytes(tmp_path: Path) -> None:
    """A response with a content-length sent in pieces: the piece that completes it waits too."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        await send({"type": "http.response.body", "body": b'{"a":', "more_body": True})
        await send({"type": "http.response.body", "body": b'"1234"}', "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw, gate = gated(tmp_path, app)
    try:
        got = await call(mw, "/v1/other", {"x": 1})
        assert b'{"a":' == got.content
    finally:
        gate.open.set()
        mw.writer.stop()
    assert 1 == len(delivery_events(tmp_path / "log"))


async def test_strict_non_stream_timeout_is_a_503_and_the_record_is_amended(tmp_path: Path) -> None:
    """A 503 instead of the upstream's 200: the record is followed by delivery_failed saying so."""
    mw, gate = gated(tmp_path)
    try:
        got = await call(mw, "/v1/chat/completions", CHAT)
        assert 503 == got.status
    finally:
        gate.open.set()
        mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (200, "ok") == (rec["http_status"], rec["status"])  # what the upstream answered
    (ev,) = delivery_events(tmp_path / "log")
    assert (rec["record_id"], "error_503", 503) == (ev["record_id"], ev["client_received"], ev["http_status"])


async def test_durable_stream_is_delivered_complete(audited: Audited, tmp_path: Path) -> None:
    """When the record is durable in time the client gets everything, [DONE] last, and no amendment."""
    mw = audited(streaming_response_like(DemoEngine()))
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True})
    assert got.content.endswith(b"data: [DONE]\n\n")
    assert 1 == len(read_records(tmp_path / "log"))  # already on disk when [DONE] left
    mw.writer.stop()
    assert [] == delivery_events(tmp_path / "log")


@pytest.mark.parametrize(
    ("body", "prompt"),
    [
        (b'{"model":"demo-model","prompt":"nan body","max_tokens":NaN}', "nan body"),
        (b'{"model":"demo-model","prompt":"lone \\ud800 surrogate"}', "lone \ufffd surrogate"),
        (b'\xef\xbb\xbf{"model":"demo-model","prompt":"bom"}', "bom"),
        ('{"model":"demo-model","prompt":"utf16"}'.encode("utf-16"), "utf16"),
        ('{"model":"demo-model","prompt":"utf32"}'.encode("utf-32"), "utf32"),
    ],
)
async def test_bodies_vllm_accepts_have_their_prompt_recorded(
    audited: Audited, tmp_path: Path, body: bytes, prompt: str
) -> None:
    """NaN, lone surrogates, a BOM, UTF-16/32: parsed as json.loads (vLLM) does, prompt and hash kept."""
    import hashlib

    mw = audited()
    await call(mw, "/v1/completions", body)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert prompt == rec["input_prompt"]
    assert rec["prompt_sha256"] is not None
    assert hashlib.sha256(body).hexdigest() == rec["request_body_sha256"]
    assert len(body) == rec["request_bytes"]
    assert rec["prompt_status"] == ("lossy" if "\ufffd" in prompt else "captured")


async def test_completions_record_the_prompt_not_a_decoy_messages_field(audited: Audited, tmp_path: Path) -> None:
    """/v1/completions acts on `prompt`; a `messages` field next to it is not what is recorded."""
    mw = audited()
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "decoy"}], "prompt": "the real one"}
    await call(mw, "/v1/completions", body)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "the real one" == rec["input_prompt"]


async def test_padding_does_not_push_the_prompt_out_of_the_record(audited: Audited, tmp_path: Path) -> None:
    """A body over max_capture_bytes made of padding still records its small prompt in full; a
    prompt over the cap is stored cut, flagged truncated with the reason."""
    mw = audited(log={"max_capture_bytes": 1000})
    pad = {"model": "demo-model", "prompt": "short secret", "pad": "x" * 5000, "max_tokens": 2}
    await call(mw, "/v1/completions", pad)
    await call(mw, "/v1/completions", {"model": "demo-model", "prompt": "y" * 5000, "max_tokens": 2})
    mw.writer.stop()
    small, big = read_records(tmp_path / "log")
    assert ("short secret", "captured", False) == (
        small["input_prompt"],
        small["prompt_status"],
        small["request_truncated"],
    )
    assert ("truncated", True, 1000) == (big["prompt_status"], big["request_truncated"], len(big["input_prompt"]))
    assert "max_capture_bytes" in big["prompt_error"]


async def test_a_body_nobody_can_parse_is_flagged_with_the_reason(audited: Audited, tmp_path: Path) -> None:
    """Deep nesting and broken JSON: no prompt, but status unparsed, a reason, and the body hash."""
    mw = audited()
    await call(mw, "/v1/completions", b'{"prompt": "p", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    await call(mw, "/v1/completions", b'{"prompt": "p",')
    mw.writer.stop()
    deep, broken = read_records(tmp_path / "log")
    assert ("unparsed", "unparsed") == (deep["prompt_status"], broken["prompt_status"])
    assert "nested too deeply" in deep["prompt_error"] and "not valid JSON" in broken["prompt_error"]
    assert deep["request_body_sha256"] and broken["request_body_sha256"]


@pytest.mark.parametrize("stream", ["true", "True", "1", "yes", "on", 1])
async def test_stream_spelled_as_pydantic_accepts_it_still_gets_usage(
    audited: Audited, tmp_path: Path, stream: Any
) -> None:
    """`"stream": "true"` streams in vLLM (lax bool): usage is injected and charged all the same."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": stream})
    assert got.content.endswith(b"data: [DONE]\n\n") and b'"usage"' not in got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (True, "injected") == (rec["stream"], rec["usage_source"])
    assert rec["total_tokens"]


async def test_escaped_stream_key_is_still_seen(audited: Audited, tmp_path: Path) -> None:
    """`"\\u0073tream": true` is the key `stream` to a JSON parser: usage is injected."""
    mw = audited()
    body = orjson.dumps(CHAT)[:-1] + b',"\\u0073tream":true}'
    got = await call(mw, "/v1/chat/completions", body)
    assert b'"usage"' not in got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "injected" == rec["usage_source"]


@pytest.mark.parametrize("path", ["/v1/./chat/completions", "//v1/chat/completions", "/v1/x/../chat/completions"])
async def test_non_normalised_paths_are_classified_and_forwarded_as_one_route(
    audited: Audited, tmp_path: Path, path: str
) -> None:
    """The edge normalises the route, injects usage for it, and the upstream gets the same route."""
    seen: list[tuple[str, bytes]] = []
    engine = DemoEngine()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["path"], scope["raw_path"]))
        await engine(scope, receive, send)

    mw = audited(app)
    got = await call(mw, path, {**CHAT, "stream": True})
    assert b'"usage"' not in got.content and got.content.endswith(b"[DONE]\n\n")
    assert [("/v1/chat/completions", b"/v1/chat/completions")] == seen
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("/v1/chat/completions", "injected") == (rec["route"], rec["usage_source"])


async def test_a_reused_request_id_gets_distinct_record_ids(audited: Audited, tmp_path: Path) -> None:
    """Two callers sending the same X-Request-Id keep it as request_id; record_id tells them apart."""
    mw = audited()
    for _ in range(2):
        got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"same")])
        assert b"same" == got.headers[b"x-request-id"]
    mw.writer.stop()
    a, b = read_records(tmp_path / "log")
    assert ("same", "same") == (a["request_id"], b["request_id"])
    assert a["record_id"] != b["record_id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a["record_id"])
    jsonschema.validate(a, json_schema())


def _norm(body: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b"", body)


STREAM_OPTIONS = [
    None,
    {},
    {"include_usage": False},
    {"continuous_usage_stats": True},
    {"include_usage": False, "continuous_usage_stats": True},
    {"include_usage": True},
    {"include_usage": "true"},
    {"include_usage": True, "continuous_usage_stats": True},
]


@pytest.mark.parametrize("opts", STREAM_OPTIONS)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_the_client_gets_what_the_engine_sends_for_any_stream_options(
    audited: Audited, tmp_path: Path, opts: Any, n: int, route: str
) -> None:
    """Byte for byte the same stream as the vLLM-shaped engine sends directly, for every
    combination of stream options and n (fingerprints on every finish chunk included)."""
    req: dict[str, Any] = {"model": "demo-model", "stream": True, "n": n, "max_tokens": 4}
    req.update({"messages": CHAT["messages"]} if route.endswith("chat/completions") else {"prompt": "hello"})
    if opts is not None:
        req["stream_options"] = opts
    hdr = [(b"x-request-id", b"same")]
    bare = await call(DemoEngine(), route, req, hdr)
    mw = audited()
    got = await call(mw, route, req, hdr)
    assert _norm(bare.content) == _norm(got.content)
    assert bare.content.count(b'"system_fingerprint"') >= 1
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert rec["total_tokens"] and rec["model_revision"] == "demo-rev-1"


async def test_a_body_that_never_arrives_gets_408_and_a_record(audited: Audited, tmp_path: Path) -> None:
    """A client that announces a body and stalls is answered 408 after [edge] body_timeout_s."""
    mw = audited(edge={"body_timeout_s": 0.2})
    stalled = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        await stalled.wait()  # never set: the body never comes
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(http_scope("/v1/completions", b"x" * 100), receive, send)
    assert 408 == sent[0]["status"]
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (408, "request_timeout", "client_error") == (rec["http_status"], rec["error_type"], rec["status"])


async def test_stream_output_kept_for_the_record_is_bounded(audited: Audited, tmp_path: Path) -> None:
    """A stream longer than max_capture_bytes keeps at most that much, counts all, and says so."""
    mw = audited(log={"max_capture_bytes": 2000})
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 400})
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert rec["response_truncated"] and rec["response_bytes"] >= len(got.content) > 2000
    assert len(rec["output_response"] or "") < 2000


async def test_ops_token_protects_readyz_and_metrics_but_not_healthz(audited: Audited, tmp_path: Path) -> None:
    """With [edge] ops_token_file, readyz and metrics need the bearer token; healthz stays open."""
    token = "t0ken-" + "x" * 20
    (tmp_path / "ops.token").write_text(token + "\n")
    mw = audited(edge={"ops_token_file": str(tmp_path / "ops.token")})
    for path in ("/audit/readyz", "/audit/metrics"):
        assert 401 == (await call(mw, path)).status
        assert 401 == (await call(mw, path, headers=[(b"authorization", b"Bearer wrong")])).status
        assert 200 == (await call(mw, path, headers=[(b"authorization", f"Bearer {token}".encode())])).status
    assert 200 == (await call(mw, "/audit/healthz")).status
    assert 200 == (await call(mw, "/healthz")).status  # also at the root, in middleware mode


async def test_readyz_reason_has_no_filesystem_path(tmp_path: Path) -> None:
    """A failing log's reason is public in /readyz without the log directory's path."""
    blocker = tmp_path / "log"
    blocker.write_text("a file where the log directory should be")
    cfg = config_from_mapping({"log": {"dir": str(blocker)}})
    mw = AuditMiddleware(DemoEngine(), cfg)
    try:
        ready = await call(mw, "/audit/readyz")
        assert 503 == ready.status
        payload = orjson.loads(ready.content)
        assert payload["reason"] and str(tmp_path) not in ready.content.decode()
    finally:
        mw.writer.stop()
