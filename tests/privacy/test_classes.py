"""Every stored field has a privacy class, and the default policy covers them all (issue 15 item 10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_audit.config import Config
from vllm_audit.privacy.classes import DEFAULT_CLASS, FIELD_CLASSES, field_class
from vllm_audit.privacy.redactor import build_redactor
from vllm_audit.record import json_schema

from .conftest import record


def test_every_published_field_has_a_class() -> None:
    """Walks the published JSON Schema: a property added without a privacy class fails here."""
    missing = sorted(name for name in json_schema()["properties"] if name not in FIELD_CLASSES)
    assert missing == [], f"give these fields a class in vllm_audit/privacy/classes.py: {missing}"


def test_unknown_fields_fall_back_to_the_strictest_class() -> None:
    """A field the table does not name is scanned like an identifier."""
    assert DEFAULT_CLASS == "identifier" == field_class("a_field_added_later")
    rec = build_redactor(Config())(record(a_field_added_later={"note": "call 13812345678"}))
    assert rec["a_field_added_later"] == {"note": "call <CN_PHONE>"}


def test_identifiers_are_scanned() -> None:
    """PII sent as X-Request-Id, model name, route or a role does not reach the record raw."""
    rec = build_redactor(Config())(record(
        request_id="bob@example.com", request_id_source="client", model_name="13812345678",
        route="/v1/users/alice@example.org/chat", roles=["admin", "carol@example.net"],
        response_id="chatcmpl-bob@example.com",
    ))  # fmt: skip
    assert rec["request_id"] == "<EMAIL>"
    assert rec["model_name"] == "<CN_PHONE>"
    assert rec["route"] == "/v1/users/<EMAIL>/chat"
    assert "carol" not in repr(rec["roles"])
    assert "bob" not in rec["response_id"]
    assert rec["redaction"]["entities"]["EMAIL"] == 4


def test_operational_and_tenant_fields_are_kept() -> None:
    """Values the server computes, and the tenant key, are stored as they are."""
    kept = {"org_id": "acme", "prompt_sha256": "0" * 64, "http_status": 200, "timestamp": "2026-01-01T00:00:00.000Z",
            "request_id": "13812345678", "request_id_source": "generated"}  # fmt: skip
    rec = build_redactor(Config())(record(**kept))
    assert {k: rec[k] for k in kept} == kept


def test_peer_ip_follows_the_client_ip_policy(make_config: Callable[..., Config]) -> None:
    """``[privacy.default.fields.client_ip]`` covers ``peer_ip`` too (same pseudonym for the same address)."""
    redact = build_redactor(make_config({"default": {"fields": {"client_ip": {"mode": "pseudonym"}}}}))
    rec = redact(record(client_ip="203.0.113.7", peer_ip="203.0.113.7"))
    assert rec["peer_ip"].startswith("ps_")
    assert rec["peer_ip"] == rec["client_ip"]
    masked = build_redactor(make_config({"default": {"fields": {"client_ip": {"mode": "mask"}}}}))
    assert masked(record(peer_ip="198.51.100.77"))["peer_ip"] == "198.51.100.0"


def test_peer_ip_can_have_its_own_rule(make_config: Callable[..., Config]) -> None:
    """Naming ``peer_ip`` overrides what it inherits from ``client_ip``."""
    cfg: dict[str, Any] = {"default": {"fields": {"client_ip": {"mode": "drop"}, "peer_ip": {"mode": "keep"}}}}
    rec = build_redactor(make_config(cfg))(record(client_ip="203.0.113.7", peer_ip="10.0.0.2"))
    assert (rec["client_ip"], rec["peer_ip"]) == ("", "10.0.0.2")
