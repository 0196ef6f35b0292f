"""The OTel GenAI mapping: what a record becomes, and that the exported field map tells the truth."""

from __future__ import annotations

from collections.abc import Mapping

from tests.sinks.conftest import inference
from vllm_audit.integrity.codec import Entry
from vllm_audit.sinks import otel


def _entry(rec: Mapping[str, object]) -> Entry:
    return Entry("w-1", 7, "ab" * 32, b"\x01" * 32, b"{}", str(rec.get("record_type", "")))


def test_inference_record_attributes() -> None:
    rec = dict(inference(3), upstream="http://10.0.0.5:8000", served_model="m-served", error_type=None)
    attrs = dict(otel.attributes(rec, _entry(rec)))
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == attrs["gen_ai.system"] == "vllm"
    assert attrs["gen_ai.request.model"] == "demo-model" and attrs["gen_ai.response.model"] == "m-served"
    assert attrs["gen_ai.response.id"] == "chatcmpl-req-0000003"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == rec["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == rec["completion_tokens"]
    assert attrs["server.address"] == "10.0.0.5" and attrs["server.port"] == 8000
    assert attrs["client.address"] == "203.0.113.7" and attrs["user.id"] == "user-3"
    assert attrs["http.request.method"] == "POST" and attrs["url.path"] == "/v1/chat/completions"
    assert attrs["http.response.status_code"] == 200
    assert "error.type" not in attrs and "vllm_audit.ttft_ms" not in attrs  # null fields: no attribute
    assert attrs["vllm_audit.record_hash"] == "01" * 32 and attrs["vllm_audit.seq"] == 7
    assert attrs["vllm_audit.prev"] == "ab" * 32 and attrs["vllm_audit.writer_id"] == "w-1"
    assert otel.severity(rec) == (9, "INFO")


def test_failures_events_and_alerts() -> None:
    rec = dict(inference(1), status="upstream_error", http_status=502, error_type="bad_gateway", upstream="demo")
    attrs = dict(otel.attributes(rec, _entry(rec)))
    assert attrs["error.type"] == "bad_gateway" and "server.address" not in attrs
    assert otel.severity(rec) == (17, "ERROR")
    left = dict(inference(2), status="cancelled", http_status=0)
    a2 = dict(otel.attributes(left, _entry(left)))
    assert a2["error.type"] == "cancelled" and "http.response.status_code" not in a2
    ev = {"record_type": "event", "event": "writer_started", "timestamp": "2026-07-01T00:00:00.000Z"}
    a3 = dict(otel.attributes(ev, _entry(ev)))
    assert a3["vllm_audit.event"] == "writer_started" and "gen_ai.provider.name" not in a3
    assert otel.severity(ev) == (9, "INFO")
    assert otel.severity({"record_type": "alert", "severity": "critical"}) == (17, "ERROR")
    assert otel.severity({"record_type": "alert", "severity": "low"}) == (13, "WARN")
    assert otel.time_unix_nano("2026-07-01T00:00:01.250Z") == 1782864001_250_000_000
    assert otel.time_unix_nano("garbage") == 0


def test_field_map_lists_every_attribute_produced() -> None:
    rec = dict(inference(5), upstream="https://h:1", served_model="s", error_type="x", ttft_ms=3.0, event="e")
    produced = {k for k, _ in otel.attributes(rec, _entry(rec))}
    documented = {m.otel for m in otel.FIELD_MAP}
    assert produced - documented <= {"server.port", "gen_ai.system"}, produced - documented
