"""vllm-audit as middleware inside a real vLLM API server (M2a).

One server for the module: ``vllm serve tiny-llama --middleware vllm_audit.AuditMiddleware
--api-key K`` with ``VLLM_AUDIT_CONFIG`` naming a temp config whose ``[log] dir`` is a temp dir.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllmtest_support import (
    API_KEY,
    MODEL,
    Integrity,
    assert_usage_matches,
    chat_body,
    completion_body,
    harness,
    record_for,
    record_for_response_id,
    sse_json,
    stream_finish_reason,
    stream_text,
    stream_usage,
    verify_log,
    wait_records,
    write_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclasses.dataclass
class MwServer:
    srv: harness.Server
    log_dir: Path
    config: Path
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.srv.url


@pytest.fixture(scope="module")
def mw(vllm_setup: harness.Setup, start_server: Any, module_dir: Path, integrity: Integrity) -> Any:
    log_dir = module_dir / "audit-log"
    config = write_config(module_dir / "audit.toml", log_dir, integrity.config_toml)
    srv = start_server(
        harness.start_vllm,
        vllm_setup,
        module_dir / "vllm-middleware.log",
        extra_args=["--middleware", "vllm_audit.AuditMiddleware", "--api-key", API_KEY],
        env={"VLLM_AUDIT_CONFIG": str(config)},
    )
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield MwServer(srv=srv, log_dir=log_dir, config=config, client=client)


def _rid(tag: str) -> str:
    return f"itest-{tag}-{uuid.uuid4().hex[:12]}"


def _post(mw: MwServer, path: str, body: dict[str, Any], rid: str | None = None, auth: bool = True) -> httpx.Response:
    headers = dict(AUTH) if auth else {}
    if rid is not None:
        headers["X-Request-Id"] = rid
    return mw.client.post(path, json=body, headers=headers)


def _check_common(rec: dict[str, Any], route: str, stream: bool, status: int = 200) -> None:
    assert rec["route"] == route, rec
    assert rec["http_status"] == status, rec
    assert rec["stream"] is stream, rec
    assert rec["model_name"] == MODEL, rec
    assert isinstance(rec["latency_ms"], int | float) and rec["latency_ms"] >= 0, rec
    assert isinstance(rec.get("writer_id"), str) and isinstance(rec.get("seq"), int), rec


# ---------------------------------------------------------------- non-streaming


@pytest.mark.parametrize("send_id", [True, False], ids=["client-id", "generated-id"])
def test_chat_non_streaming(mw: MwServer, send_id: bool) -> None:
    rid = _rid("chat") if send_id else None
    r = _post(mw, "/v1/chat/completions", chat_body(), rid)
    assert r.status_code == 200, r.text
    resp = r.json()
    if rid:
        assert resp["id"] == f"chatcmpl-{rid}"
    rec = record_for_response_id(mw.log_dir, resp["id"])
    _check_common(rec, "/v1/chat/completions", stream=False)
    assert rec["status"] == "ok", rec
    assert_usage_matches(rec, resp["usage"])
    assert rec["model_revision"] == resp.get("system_fingerprint"), rec
    assert rec["finish_reason"] == resp["choices"][0]["finish_reason"], rec
    assert "Hello there" in str(rec["input_prompt"]), rec
    assert rec["output_response"], rec
    echoed = r.headers.get("x-request-id")
    if echoed is not None:
        assert echoed == rec["request_id"]


@pytest.mark.parametrize("send_id", [True, False], ids=["client-id", "generated-id"])
def test_completions_non_streaming(mw: MwServer, send_id: bool) -> None:
    rid = _rid("cmpl") if send_id else None
    r = _post(mw, "/v1/completions", completion_body(), rid)
    assert r.status_code == 200, r.text
    resp = r.json()
    if rid:
        assert resp["id"] == f"cmpl-{rid}"
    assert resp["id"].startswith("cmpl-")
    rec = record_for_response_id(mw.log_dir, resp["id"])
    _check_common(rec, "/v1/completions", stream=False)
    assert_usage_matches(rec, resp["usage"])
    assert rec["model_revision"] == resp.get("system_fingerprint"), rec
    assert rec["finish_reason"] == resp["choices"][0]["finish_reason"] == "length", rec
    assert "def hello(" in str(rec["input_prompt"]), rec


# ---------------------------------------------------------------- streaming


def _stream(mw: MwServer, path: str, body: dict[str, Any], rid: str | None) -> tuple[httpx.Response, bytes]:
    headers = dict(AUTH)
    if rid is not None:
        headers["X-Request-Id"] = rid
    with mw.client.stream("POST", path, json=body, headers=headers) as r:
        raw = r.read()
    return r, raw


@dataclasses.dataclass
class StreamCase:
    path: str
    chunks: list[dict[str, Any]]
    rec: dict[str, Any]
    ref_usage: dict[str, Any]
    #: vLLM's system_fingerprint for the same request, non-streaming.
    fingerprint: str | None


def _stream_case(mw: MwServer, kind: str, send_id: bool, include_usage: bool) -> StreamCase:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = chat_body() if kind == "chat" else completion_body()
    # The same request, non-streaming: vLLM's own usage for it (temperature 0, ignore_eos).
    ref = _post(mw, path, body, _rid("ref"))
    assert ref.status_code == 200, ref.text

    sbody = dict(body, stream=True)
    if include_usage:
        sbody["stream_options"] = {"include_usage": True}
    rid = _rid(f"s{kind}") if send_id else None
    r, raw = _stream(mw, path, sbody, rid)
    assert r.status_code == 200, raw[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, done = sse_json(raw)
    assert done, raw[-300:]
    assert chunks, raw[:300]
    resp_id = chunks[0]["id"]
    assert all(c["id"] == resp_id for c in chunks)
    if rid:
        assert resp_id == ("chatcmpl-" if kind == "chat" else "cmpl-") + rid
    rec = record_for_response_id(mw.log_dir, resp_id)
    return StreamCase(path, chunks, rec, ref.json()["usage"], ref.json().get("system_fingerprint"))


@pytest.mark.parametrize("include_usage", [True, False], ids=["client-usage", "no-client-usage"])
@pytest.mark.parametrize("send_id", [True, False], ids=["client-id", "generated-id"])
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streaming(mw: MwServer, kind: str, send_id: bool, include_usage: bool) -> None:
    case = _stream_case(mw, kind, send_id, include_usage)
    chunks, rec, ref_usage = case.chunks, case.rec, case.ref_usage
    usage = stream_usage(chunks)
    if include_usage:
        assert usage is not None, "client asked for usage and did not get it"
        keys = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert {k: usage[k] for k in keys} == {k: ref_usage[k] for k in keys}
    else:
        # The middleware may ask vLLM for usage, but must not change what the client receives.
        assert usage is None, f"usage chunk leaked to a client that did not ask: {chunks[-1]}"
        assert all(c.get("choices") for c in chunks), "an injected choices:[] chunk leaked"

    _check_common(rec, case.path, stream=True)
    assert_usage_matches(rec, ref_usage)
    assert rec["usage_source"] == ("stream" if include_usage else "injected"), rec
    assert rec["finish_reason"] == stream_finish_reason(chunks) == "length", rec
    assert rec["ttft_ms"] is not None and 0 <= rec["ttft_ms"] <= rec["latency_ms"], rec
    text = stream_text(chunks)
    assert text, chunks
    assert rec["output_response"], rec


@pytest.mark.parametrize("include_usage", [True, False], ids=["client-usage", "no-client-usage"])
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streaming_model_revision(mw: MwServer, kind: str, include_usage: bool) -> None:
    """vLLM 0.32 sends system_fingerprint on the finish chunk, or with include_usage (asked for by
    the client or injected by the middleware) only on the final `choices: []` usage chunk."""
    case = _stream_case(mw, kind, True, include_usage)
    assert case.fingerprint is not None
    assert case.rec["model_revision"] == case.fingerprint, case.rec


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streaming_client_keeps_system_fingerprint(mw: MwServer, kind: str) -> None:
    """Asking vLLM for usage behind the client's back must not change the client's stream: without
    include_usage vLLM puts system_fingerprint on the finish chunk, so the client must get it there.
    (With the injected include_usage vLLM moves it to the usage chunk, which is then stripped.)"""
    case = _stream_case(mw, kind, True, False)
    fps = [c.get("system_fingerprint") for c in case.chunks if c.get("system_fingerprint")]
    assert fps == [case.fingerprint], f"client stream lost system_fingerprint: last chunk {case.chunks[-1]}"


# ---------------------------------------------------------------- auth, /invocations


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllm_401_is_recorded(mw: MwServer, path: str) -> None:
    rid = _rid("noauth")
    body = chat_body() if "chat" in path else completion_body()
    r = _post(mw, path, body, rid, auth=False)
    assert r.status_code == 401, r.text
    rec = record_for(mw.log_dir, rid)
    assert rec["http_status"] == 401, rec
    assert rec["route"] == path, rec
    assert rec["status"] != "ok", rec
    assert rec["completion_tokens"] in (None, 0), rec

    r = mw.client.post(path, json=body, headers={"Authorization": "Bearer wrong", "X-Request-Id": rid + "-wrong"})
    assert r.status_code == 401
    assert record_for(mw.log_dir, rid + "-wrong")["http_status"] == 401


def test_invocations_without_key_is_recorded(mw: MwServer) -> None:
    """vLLM's --api-key leaves /invocations open; it runs a completion and must be audited."""
    rid = _rid("invoc")
    r = _post(mw, "/invocations", completion_body(), rid, auth=False)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"] == f"cmpl-{rid}"
    rec = record_for(mw.log_dir, rid)
    assert rec["route"] == "/invocations", rec
    assert rec["http_status"] == 200, rec
    assert_usage_matches(rec, resp["usage"])
    assert "def hello(" in str(rec["input_prompt"]), rec


def test_upstream_404_is_recorded(mw: MwServer) -> None:
    rid = _rid("nomodel")
    r = _post(mw, "/v1/completions", completion_body(model="no-such-model"), rid)
    assert r.status_code == 404, r.text
    rec = record_for(mw.log_dir, rid)
    assert rec["http_status"] == 404, rec
    assert rec["status"] == "client_error", rec
    assert rec["model_name"] == "no-such-model", rec
    assert rec["prompt_tokens"] is None, rec


def test_models_list(mw: MwServer) -> None:
    rid = _rid("models")
    r = mw.client.get("/v1/models", headers={**AUTH, "X-Request-Id": rid})
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    rec = record_for(mw.log_dir, rid)
    assert rec["route"] == "/v1/models" and rec["http_status"] == 200, rec


def test_client_disconnect_mid_stream_is_recorded(mw: MwServer) -> None:
    """The client leaves after the first chunk of a long stream: a `cancelled` record.

    The tiny model makes 400 tokens in well under a second, so on a loaded 2-core box the client
    can be descheduled between its first chunk and its close for long enough that vLLM sends the
    whole stream first. Then the server did deliver everything, and an `ok` record with all 400
    tokens is the truth: such an attempt is checked for exactly that and the call is made again
    (at most 3 times). A middleware that never records a cancellation still fails every attempt.
    """
    body = completion_body(max_tokens=400, stream=True)
    seen: list[str] = []
    for attempt in range(3):
        rid = _rid(f"gone{attempt}")
        with (
            httpx.Client(base_url=mw.url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body, headers={**AUTH, "X-Request-Id": rid}) as r,
        ):
            assert r.status_code == 200
            for _ in r.iter_raw():
                break  # one chunk, then close the connection
        rec = record_for(mw.log_dir, rid, timeout=30)
        assert rec["stream"] is True, rec
        seen.append(rec["status"])
        if rec["status"] == "cancelled":
            assert rec["completion_tokens"] is None or rec["completion_tokens"] < 400, rec
            return
        assert (rec["status"], rec["completion_tokens"]) == ("ok", 400), rec  # the stream won the race
    raise AssertionError(f"no attempt was recorded as cancelled: {seen}")


def _has_request_id(rid: str) -> Callable[[dict[str, Any]], bool]:
    return lambda rec: rec.get("request_id") == rid


def test_record_is_durable_when_response_completes(mw: MwServer) -> None:
    """Strict durability (the default): the record is on disk before the client has the answer."""
    for kind, path, body in (("c", "/v1/completions", completion_body()), ("h", "/v1/chat/completions", chat_body())):
        rid = _rid(f"durable{kind}")
        r = _post(mw, path, body, rid)
        assert r.status_code == 200
        found = wait_records(mw.log_dir, _has_request_id(rid), timeout=0)
        assert len(found) == 1, f"record of {rid} not on disk when the response completed"
        r, raw = _stream(mw, path, dict(body, stream=True), rid + "-s")
        assert r.status_code == 200 and raw.endswith(b"data: [DONE]\n\n")
        found = wait_records(mw.log_dir, _has_request_id(rid + "-s"), timeout=0)
        assert len(found) == 1, f"record of stream {rid}-s not on disk when the stream completed"


def test_pii_is_redacted_before_disk(mw: MwServer) -> None:
    """PII in a prompt sent to vLLM never reaches the log in clear (default policy)."""
    email, card = "alice.smith@example.com", "4111 1111 1111 1111"
    rid = _rid("pii")
    r = _post(mw, "/v1/chat/completions", chat_body(f"My e-mail is {email} and my card {card}"), rid)
    assert r.status_code == 200, r.text
    rec = record_for(mw.log_dir, rid)
    assert "My e-mail is" in str(rec["input_prompt"]), rec
    raw = b"".join(p.read_bytes() for p in mw.log_dir.glob("writers/*/seg-*.jsonl"))
    assert email.encode() not in raw and card.encode() not in raw
    assert rec["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]


def test_one_record_per_call(mw: MwServer) -> None:
    from vllmtest_support import records

    ids = [r.get("request_id") for r in records(mw.log_dir)]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicated records: {dup}"


def test_log_verifies(mw: MwServer, vllm_setup: harness.Setup, integrity: Integrity) -> None:
    """Runs last in the module: the whole log written by vLLM's middleware verifies offline."""
    out = verify_log(vllm_setup, integrity, mw.log_dir)
    assert out is not None
