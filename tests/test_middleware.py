"""AuditMiddleware driven by hand over ASGI (no server): streaming, usage, failures."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

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


@pytest.fixture
def audited(tmp_path: Path):  # type: ignore[no-untyped-def]
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


async def test_each_sse_event_reaches_the_client_before_the_next_is_produced(audited, tmp_path: Path) -> None:
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


async def test_injected_usage_is_recorded_and_stripped_byte_for_byte(audited, tmp_path: Path) -> None:
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


async def test_client_requested_usage_is_passed_through(audited, tmp_path: Path) -> None:
    """When the client asked for usage it keeps its usage chunk."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert b'"usage"' in got.content
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert "stream" == rec["usage_source"]


async def test_usage_chunk_split_across_messages_is_still_stripped(audited, tmp_path: Path) -> None:
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


async def test_usage_that_never_came_is_recorded_as_absent(audited, tmp_path: Path) -> None:
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


async def test_disconnect_mid_stream_records_cancelled_with_partial_output(audited, tmp_path: Path) -> None:
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


async def test_app_exception_is_recorded_and_reraised(audited, tmp_path: Path) -> None:
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


async def test_every_route_gets_a_record(audited, tmp_path: Path) -> None:
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


async def test_request_id_is_honoured_echoed_and_passed_upstream(audited, tmp_path: Path) -> None:
    """A safe inbound id is kept, echoed, and the upstream's own id is built from it."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"req-42")])
    assert b"req-42" == got.headers[b"x-request-id"]
    assert orjson.loads(got.content)["id"] == "chatcmpl-req-42"
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("req-42", "client", "chatcmpl-req-42") == (rec["request_id"], rec["request_id_source"], rec["response_id"])


async def test_invalid_request_id_is_replaced_and_the_fact_recorded(audited, tmp_path: Path) -> None:
    """An unsafe inbound id is replaced by a UUIDv7 and the record says why."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"bad id\x01<script>")])
    new_id = got.headers[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", new_id)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (new_id, "replaced") == (rec["request_id"], rec["request_id_source"])
    assert any("characters" in n for n in rec["notes"])


async def test_no_client_controlled_switch_turns_logging_off(audited, tmp_path: Path) -> None:
    """Headers and body fields that other tools honour as 'do not log' change nothing here."""
    mw = audited()
    no_log_headers = [(b"x-no-log", b"1"), (b"x-audit-disable", b"true"), (b"helicone-omit-request", b"true")]
    body = {**CHAT, "store": False, "metadata": {"no_log": True, "disable_logging": True}, "no-log": True}
    await call(mw, "/v1/chat/completions", body, no_log_headers)
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert rec["input_prompt"] is not None and rec["output_response"] is not None


async def test_oversized_headers_get_431_and_a_record(audited, tmp_path: Path) -> None:
    """A 1 MB header is refused with an OpenAI-shaped 431, and recorded."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-big", b"a" * 1_000_000)])
    assert 431 == got.status
    assert "request_header_fields_too_large" == orjson.loads(got.content)["error"]["code"]
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (431, "client_error") == (rec["http_status"], rec["status"])


async def test_oversized_body_gets_413_and_a_record(audited, tmp_path: Path) -> None:
    """A body over [edge] max_request_bytes is refused with 413, and recorded."""
    mw = audited(edge={"max_request_bytes": 1000})
    got = await call(mw, "/v1/completions", {"model": "demo-model", "prompt": "x" * 5000})
    assert 413 == got.status
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert (413, "request_too_large") == (rec["http_status"], rec["error_type"])


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(audited, tmp_path: Path) -> None:
    """X-Forwarded-For from a peer outside trusted_proxies does not change client_ip."""
    mw = audited()
    await call(mw, "/v1/chat/completions", CHAT, [(b"x-forwarded-for", b"1.2.3.4")])
    mw.writer.stop()
    (rec,) = read_records(tmp_path / "log")
    assert ("203.0.113.7", True) == (rec["client_ip"], rec["forwarded_ignored"])


async def test_forwarded_for_through_trusted_proxy_is_believed(audited, tmp_path: Path) -> None:
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
    try:
        got = await call(mw, "/v1/chat/completions", CHAT)
        assert 200 == got.status
        metrics = (await call(mw, "/audit/metrics")).content.decode()
        assert re.search(r"vllm_audit_records_dropped_total\{[^}]*\} 1\b", metrics), metrics
        assert re.search(r"vllm_audit_log_writable\{[^}]*\} 0\b", metrics)
    finally:
        mw.writer.stop()


async def test_strict_durability_releases_the_last_byte_after_fsync(audited, tmp_path: Path) -> None:
    """When the client has the full response, its record is already in the segment file."""
    mw = audited()
    got = await call(mw, "/v1/chat/completions", CHAT, [(b"x-request-id", b"durable-1")])
    assert 200 == got.status
    # no writer.stop(): the record must already be on disk
    assert ["durable-1"] == [r["request_id"] for r in read_records(tmp_path / "log")]


async def test_writer_records_its_start_as_an_event(audited, tmp_path: Path) -> None:
    """The first entry of a new chain is a writer_started event."""
    mw = audited()
    await call(mw, "/v1/models")
    mw.writer.stop()
    entries = read_entries(tmp_path / "log")
    assert "event" == entries[0]["record_type"]
    assert 0 == entries[0]["seq"]


async def test_pathsend_file_response_is_a_completed_exchange(audited, tmp_path: Path) -> None:
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


async def test_fingerprint_moved_to_the_usage_chunk_is_put_back_on_the_finish_chunk(audited, tmp_path: Path) -> None:
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
