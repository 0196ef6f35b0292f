"""The ECS view of a record: mapped names, ECS types respected, nothing of the record dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.sinks.conftest import LiveLog, inference
from vllm_audit.integrity.reader import Cursor, LogReader
from vllm_audit.sinks.ecs import record_to_ecs, to_ecs

HEADER = {"seq": 7, "prev": "ab" * 32, "writer_id": "gw-1"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix + k != "vllm_audit.":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_inference_record_maps_to_ecs_and_genai_names() -> None:
    rec = {**HEADER, **inference(3), "served_model": "demo-model-v2"}
    doc = record_to_ecs(rec, "cd" * 32)
    f = _flat(doc)
    assert f["@timestamp"] == rec["timestamp"]
    assert (f["event.id"], f["event.sequence"], f["event.kind"]) == ("cd" * 32, 7, "event")
    assert (f["event.outcome"], f["event.type"], f["event.category"]) == ("success", ["access", "allowed"], ["web"])
    assert f["event.duration"] == int(rec["latency_ms"] * 1_000_000)
    assert (f["client.ip"], f["source.ip"]) == ("203.0.113.7", "127.0.0.1")
    assert (f["user.id"], f["organization.id"], f["user.roles"]) == ("user-3", "acme", ["caller"])
    assert (f["http.request.method"], f["url.path"], f["http.response.status_code"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert f["http.request.id"] == rec["request_id"]
    assert f["gen_ai.operation.name"] == "chat"
    assert (f["gen_ai.request.model"], f["gen_ai.response.model"]) == ("demo-model", "demo-model-v2")
    assert f["gen_ai.response.finish_reasons"] == ["stop"]
    assert (f["gen_ai.usage.input_tokens"], f["gen_ai.usage.output_tokens"]) == (53, 83)
    assert f["labels.status"] == "ok"
    meta = doc["vllm_audit"]
    assert (meta["writer_id"], meta["seq"], meta["prev"], meta["leaf_hash"]) == ("gw-1", 7, "ab" * 32, "cd" * 32)
    assert meta["input_prompt"] == rec["input_prompt"] and meta["output_response"] == rec["output_response"]
    assert "user_id" not in meta and "model_name" not in meta  # mapped fields are not repeated


def test_nothing_of_the_record_is_dropped() -> None:
    rec = {**HEADER, **inference(1), "notes": ["n"], "redaction": {"policy": "p"}, "future_field": 1}
    doc = record_to_ecs(rec, "00" * 32)
    f = _flat(doc)
    values = [repr(v) for v in f.values()] + [repr(v) for v in doc["vllm_audit"].values()]
    for key, value in rec.items():
        if value is None:
            continue
        assert key in doc["vllm_audit"] or any(repr(value) in v for v in values), key


def test_a_pseudonymised_ip_stays_out_of_the_ip_fields() -> None:
    rec = {**HEADER, **inference(1), "client_ip": "ip-7f3a9c", "http_status": 0, "status": "cancelled"}
    doc = record_to_ecs(rec, "00" * 32)
    assert "client" not in doc and doc["vllm_audit"]["client_ip"] == "ip-7f3a9c"
    assert "status_code" not in doc["http"].get("response", {}) and doc["vllm_audit"]["http_status"] == 0
    assert doc["event"]["outcome"] == "unknown"


def test_failures_map_to_failure_outcomes_and_errors() -> None:
    rec = {**HEADER, **inference(1), "status": "upstream_error", "error_type": "server_error", "error_message": "boom"}
    doc = record_to_ecs(rec, "00" * 32)
    assert doc["event"]["outcome"] == "failure" and doc["event"]["type"] == ["access", "error"]
    assert doc["error"] == {"type": "server_error", "message": "boom"}
    rejected = record_to_ecs({**HEADER, **inference(1), "status": "rejected", "http_status": 401}, "00" * 32)
    assert rejected["event"]["type"] == ["access", "denied"]


def test_events_and_alerts_map_too() -> None:
    ev = {
        **HEADER,
        "record_type": "event",
        "event": "key_admin_denied",
        "timestamp": "2026-07-01T00:00:00.000Z",
        "actor": {"user_id": "mallory", "org_id": "acme", "roles": ["viewer"]},
        "endpoint": "/audit/v1/keys",
        "outcome": "denied",
        "http_status": 403,
    }
    doc = record_to_ecs(ev, "11" * 32)
    assert (doc["event"]["kind"], doc["event"]["action"], doc["event"]["outcome"]) == (
        "event",
        "key_admin_denied",
        "failure",
    )
    assert doc["event"]["category"] == ["iam"] and doc["event"]["type"] == ["denied"]
    assert doc["user"] == {"id": "mallory", "roles": ["viewer"]} and doc["organization"] == {"id": "acme"}
    assert doc["url"]["path"] == "/audit/v1/keys" and doc["http"]["response"]["status_code"] == 403
    assert doc["vllm_audit"]["actor"] == ev["actor"]
    alert = {
        **HEADER,
        "record_type": "alert",
        "timestamp": "2026-07-01T00:00:00.000Z",
        "rule": {"id": "r1", "name": "token burst"},
        "severity": "high",
        "reason": "10x tokens",
        "user_id": "u",
    }
    doc = record_to_ecs(alert, "22" * 32)
    assert (doc["event"]["kind"], doc["event"]["severity"], doc["event"]["reason"]) == ("alert", 73, "10x tokens")
    assert doc["rule"] == {"id": "r1", "name": "token burst"} and doc["event"]["action"] == "token burst"
    assert doc["user"] == {"id": "u"} and doc["vllm_audit"]["rule"] == alert["rule"]


def test_to_ecs_of_real_entries(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / "log")
    log.write(3)
    entries = LogReader(tmp_path / "log").read(Cursor(log.writer_id), 10)
    docs = [to_ecs(e) for e in entries]
    assert [d["event"]["id"] for d in docs] == [e.leaf_hex for e in entries]
    assert docs[0]["event"]["action"] == "writer_started" and docs[0]["event"]["type"] == ["start"]
    assert [d["vllm_audit"]["seq"] for d in docs] == [0, 1, 2, 3]
