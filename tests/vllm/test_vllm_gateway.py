"""vllm-audit as a gateway in front of a real, plain vLLM (M2b, M3).

``vllm serve tiny-llama`` (no middleware) and ``vllm-audit serve --upstream http://127.0.0.1:PORT
--config CFG --port P2``. What the client gets through the gateway must be what vLLM sends when
asked directly (streams included), and every call leaves a record with vLLM's usage.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllmtest_support import (
    MODEL,
    Integrity,
    assert_usage_matches,
    chat_body,
    completion_body,
    harness,
    normalize_chunk,
    record_for,
    sse_events,
    sse_json,
    stream_text,
    verify_log,
    write_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@dataclasses.dataclass
class Gw:
    vllm: harness.Server
    gateway: harness.Server
    log_dir: Path
    direct: httpx.Client
    via: httpx.Client


@pytest.fixture(scope="module")
def gw(vllm_setup: harness.Setup, start_server: Any, module_dir: Path, integrity: Integrity) -> Any:
    log_dir = module_dir / "audit-log"
    config = write_config(module_dir / "gateway.toml", log_dir, integrity.config_toml)
    vllm = start_server(harness.start_vllm, vllm_setup, module_dir / "vllm-plain.log")
    gateway = start_server(
        harness.start_gateway,
        vllm_setup,
        vllm.url,
        config,
        module_dir / "gateway.log",
    )
    with (
        httpx.Client(base_url=vllm.url, timeout=60) as direct,
        httpx.Client(base_url=gateway.url, timeout=60) as via,
    ):
        yield Gw(vllm=vllm, gateway=gateway, log_dir=log_dir, direct=direct, via=via)


def _rid(tag: str) -> str:
    return f"gw-{tag}-{uuid.uuid4().hex[:12]}"


def _stream(client: httpx.Client, path: str, body: dict[str, Any], rid: str) -> tuple[httpx.Response, bytes]:
    with client.stream("POST", path, json=body, headers={"X-Request-Id": rid}) as r:
        raw = r.read()
    return r, raw


PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _body(kind: str, **kw: Any) -> dict[str, Any]:
    return chat_body(**kw) if kind == "chat" else completion_body(**kw)


# Greedy decoding of a random model is boring ("\n\n\n"); a seeded temperature gives varied text
# (often with partial UTF-8 sequences) and must be just as deterministic.
SAMPLING: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0},
    "seeded": {"temperature": 0.9, "seed": 4321, "max_tokens": 24},
}


@pytest.mark.parametrize("sampling", sorted(SAMPLING))
@pytest.mark.parametrize("kind", sorted(PATHS))
def test_vllm_is_deterministic(gw: Gw, kind: str, sampling: str) -> None:
    """The premise of the comparisons below: the same request gives the same stream."""
    body = _body(kind, stream=True, **SAMPLING[sampling])
    texts = []
    for _ in range(2):
        r, raw = _stream(gw.direct, PATHS[kind], body, _rid("det"))
        assert r.status_code == 200
        chunks, done = sse_json(raw)
        assert done
        texts.append(stream_text(chunks))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "client-usage"])
@pytest.mark.parametrize("sampling", sorted(SAMPLING))
@pytest.mark.parametrize("kind", sorted(PATHS))
def test_stream_identical_to_direct(gw: Gw, kind: str, sampling: str, include_usage: bool) -> None:
    body = _body(kind, stream=True, **SAMPLING[sampling])
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    # vLLM may coalesce tokens into fewer chunks when the machine is loaded; that is the engine's
    # doing, not the gateway's, so a pair whose chunk counts differ is taken again (at most 3 times)
    # and the comparison below stays chunk by chunk.
    for _attempt in range(3):
        rd, raw_direct = _stream(gw.direct, PATHS[kind], body, _rid("direct"))
        rid = _rid("via")
        rv, raw_via = _stream(gw.via, PATHS[kind], body, rid)
        if len(sse_events(raw_direct)) == len(sse_events(raw_via)):
            break
    assert rd.status_code == rv.status_code == 200, raw_via[:500]
    assert rv.headers["content-type"] == rd.headers["content-type"]

    ev_direct, ev_via = sse_events(raw_direct), sse_events(raw_via)
    assert ev_via[-1] == ev_direct[-1] == "[DONE]"
    assert len(ev_via) == len(ev_direct), f"{len(ev_via)} events via the gateway, {len(ev_direct)} direct"
    chunks_direct, _ = sse_json(raw_direct)
    chunks_via, _ = sse_json(raw_via)
    # Everything but the response id and the creation second is identical, chunk by chunk
    # (system_fingerprint is compared on its own in test_stream_keeps_system_fingerprint).
    assert [normalize_chunk(c, "system_fingerprint") for c in chunks_via] == [
        normalize_chunk(c, "system_fingerprint") for c in chunks_direct
    ]
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    assert {c["id"] for c in chunks_via} == {prefix + rid}
    # Same framing: "data: <json>\n\n" events, nothing else (no comments, no extra fields).
    norm = raw_via.replace(b"\r\n", b"\n")
    assert norm.startswith(b"data: ") and norm.endswith(b"data: [DONE]\n\n"), raw_via[-200:]

    rec = record_for(gw.log_dir, rid)
    assert rec["route"] == PATHS[kind] and rec["stream"] is True and rec["http_status"] == 200, rec
    # vLLM's usage for this request (the gateway asked for it if the client did not).
    ref_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r_ref = gw.direct.post(PATHS[kind], json=ref_body)
    assert r_ref.status_code == 200, r_ref.text
    assert_usage_matches(rec, r_ref.json()["usage"])
    assert rec["model_name"] == MODEL
    assert rec["ttft_ms"] is not None and 0 <= rec["ttft_ms"] <= rec["latency_ms"], rec


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "client-usage"])
@pytest.mark.parametrize("kind", sorted(PATHS))
def test_stream_keeps_system_fingerprint(gw: Gw, kind: str, include_usage: bool) -> None:
    """vLLM 0.32 puts system_fingerprint on the finish chunk, or with include_usage only on the
    `choices: []` usage chunk. The client gets it where vLLM would have put it for the client's own
    request, and the record's model_revision is it."""
    body = _body(kind, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    _, raw_direct = _stream(gw.direct, PATHS[kind], body, _rid("direct"))
    rid = _rid("via")
    _, raw_via = _stream(gw.via, PATHS[kind], body, rid)
    # Positions count from the end of the stream: vLLM may coalesce tokens into fewer chunks in one
    # of the two requests (a loaded machine), which moves every index but the last ones; the
    # fingerprint belongs on the finish chunk or the usage chunk, both at the end.
    chunks_direct, chunks_via = sse_json(raw_direct)[0], sse_json(raw_via)[0]
    where_direct = [
        (i - len(chunks_direct), c["system_fingerprint"])
        for i, c in enumerate(chunks_direct)
        if "system_fingerprint" in c
    ]
    where_via = [
        (i - len(chunks_via), c["system_fingerprint"]) for i, c in enumerate(chunks_via) if "system_fingerprint" in c
    ]
    fingerprint = where_direct[-1][1]
    rec = record_for(gw.log_dir, rid)
    problems = []
    if rec["model_revision"] != fingerprint:
        problems.append(f"record model_revision {rec['model_revision']!r} != vLLM's {fingerprint!r}")
    if where_via != where_direct:
        problems.append(f"client got system_fingerprint at (chunk, value) {where_via}, vLLM sends {where_direct}")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_non_stream_identical_to_direct(gw: Gw, kind: str) -> None:
    body = _body(kind, **SAMPLING["seeded"])
    rd = gw.direct.post(PATHS[kind], json=body, headers={"X-Request-Id": _rid("direct")})
    rid = _rid("via")
    rv = gw.via.post(PATHS[kind], json=body, headers={"X-Request-Id": rid})
    assert rd.status_code == rv.status_code == 200, rv.text
    jd, jv = rd.json(), rv.json()
    assert normalize_chunk(jv) == normalize_chunk(jd)
    assert jv["id"].endswith(rid)
    rec = record_for(gw.log_dir, rid)
    assert_usage_matches(rec, jv["usage"])
    assert rec["model_revision"] == jv.get("system_fingerprint"), rec
    assert rec["finish_reason"] == jv["choices"][0]["finish_reason"], rec
    assert rec["stream"] is False


def test_generated_request_id_reaches_vllm(gw: Gw) -> None:
    """No X-Request-Id from the client: the gateway makes one, and vLLM's id is built from it."""
    r = gw.via.post("/v1/completions", json=completion_body())
    assert r.status_code == 200, r.text
    resp = r.json()
    rid = resp["id"].removeprefix("cmpl-")
    rec = record_for(gw.log_dir, rid)
    assert_usage_matches(rec, resp["usage"])
    if "x-request-id" in r.headers:
        assert r.headers["x-request-id"] == rid


def test_models_and_upstream_errors(gw: Gw) -> None:
    r = gw.via.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [m["id"] for m in gw.direct.get("/v1/models").json()["data"]]
    rid = _rid("404")
    r = gw.via.post("/v1/completions", json=completion_body(model="no-such-model"), headers={"X-Request-Id": rid})
    d = gw.direct.post("/v1/completions", json=completion_body(model="no-such-model"))
    assert r.status_code == d.status_code == 404
    assert json.loads(r.content)["error"]["type"] == d.json()["error"]["type"]
    rec = record_for(gw.log_dir, rid)
    assert rec["http_status"] == 404, rec
    assert rec["status"] != "ok", rec


def test_log_verifies(gw: Gw, vllm_setup: harness.Setup, integrity: Integrity) -> None:
    verify_log(vllm_setup, integrity, gw.log_dir)


# ---------------------------------------------------------------- issue 15 (#19, #20)

STREAM_OPTIONS = {
    "continuous": {"continuous_usage_stats": True},
    "continuous-no-usage": {"include_usage": False, "continuous_usage_stats": True},
    "usage-as-string": {"include_usage": "true"},
    "usage-continuous": {"include_usage": True, "continuous_usage_stats": True},
}


def _summary(chunks: list[dict[str, Any]]) -> dict[int, tuple[str, Any, Any, bool]]:
    """Per choice: its text, finish reason, the fingerprint on its finish chunk and whether any of
    its chunks carries usage; index -1: the usage-only chunk's fingerprint. (vLLM may coalesce
    tokens into fewer chunks under load, so chunk counts are not compared.)"""
    out: dict[int, tuple[str, Any, Any, bool]] = {}
    for c in chunks:
        if not c.get("choices"):
            out[-1] = ("", None, c.get("system_fingerprint"), "usage" in c)
            continue
        ch = c["choices"][0]
        text, fin, fp, usage = out.get(ch["index"], ("", None, None, False))
        piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
        text += piece or ""
        if ch.get("finish_reason"):
            fin, fp = ch["finish_reason"], c.get("system_fingerprint")
        out[ch["index"]] = (text, fin, fp, usage or "usage" in c)
    return out


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("opts", sorted(STREAM_OPTIONS))
@pytest.mark.parametrize("kind", sorted(PATHS))
def test_stream_options_and_n_reach_the_client_as_vllm_sends_them(gw: Gw, kind: str, opts: str, n: int) -> None:
    """With continuous_usage_stats and/or n=2 the client gets what vLLM sends a direct client:
    the same text, finish chunks with the same fingerprints, usage fields only where vLLM puts
    them; the record still has the usage."""
    body = _body(kind, stream=True, n=n, stream_options=STREAM_OPTIONS[opts], **SAMPLING["seeded"])
    rd, raw_direct = _stream(gw.direct, PATHS[kind], body, _rid("direct"))
    rid = _rid("via")
    rv, raw_via = _stream(gw.via, PATHS[kind], body, rid)
    assert rd.status_code == rv.status_code == 200, raw_via[:500]
    chunks_direct, done_direct = sse_json(raw_direct)
    chunks_via, done_via = sse_json(raw_via)
    assert done_direct and done_via
    assert _summary(chunks_via) == _summary(chunks_direct)
    rec = record_for(gw.log_dir, rid)
    assert rec["total_tokens"], rec

@pytest.mark.parametrize("kind", sorted(PATHS))
def test_a_vllm_stream_is_read_through_its_templates(gw: Gw, kind: str) -> None:
    """vLLM writes each chunk as orjson would (compact, same escapes): after the first chunks,
    every chunk that differs from one before only in its text is read as that text (the writer's
    fast path engages on the real server), and the record is the one parsing every chunk whole
    gives."""
    from vllm_audit.finalize import _load_stream, _parse_sse, _sse_payloads

    r, raw = _stream(gw.direct, PATHS[kind], _body(kind, stream=True, **SAMPLING["seeded"]), _rid("tpl"))
    assert r.status_code == 200
    payloads = _sse_payloads(raw)
    texts = sum(len(e[0]) for e in _load_stream(raw) if isinstance(e, tuple))
    assert len(payloads) >= 10 and texts >= len(payloads) - 3, (texts, len(payloads), payloads[:3])
    keys = ("response_id", "model_name", "model_revision", "finish_reason", "output_response", "prompt_tokens",
            "completion_tokens", "total_tokens", "usage_source", "error_type", "error_message")  # fmt: skip
    fast: dict[str, Any] = dict.fromkeys(keys)
    slow = dict(fast)
    _parse_sse(raw, None, fast)
    _parse_sse(raw, None, slow, fast=False)
    assert fast == slow and fast["output_response"]



def test_upstream_down_is_recorded(gw: Gw, vllm_setup: harness.Setup, integrity: Integrity) -> None:
    """Last in the module (it stops vLLM): the gateway answers an error and records it."""
    gw.vllm.stop()
    rid = _rid("down")
    r = gw.via.post("/v1/completions", json=completion_body(), headers={"X-Request-Id": rid})
    assert r.status_code in (502, 503, 504), r.text
    assert "error" in r.json(), r.text
    rec = record_for(gw.log_dir, rid)
    assert rec["http_status"] == r.status_code, rec
    assert rec["status"] == "upstream_error", rec
    assert rec["prompt_tokens"] is None, rec
    verify_log(vllm_setup, integrity, gw.log_dir)

