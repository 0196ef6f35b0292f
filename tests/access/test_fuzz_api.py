"""Fuzz the audit API against its own OpenAPI document with schemathesis: no 5xx, responses conform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.access.conftest import TENANTS, project, sample_entries, write_log  # noqa: E402
from vllm_audit.access.api import AuditApi  # noqa: E402
from vllm_audit.access.apikeys import KeyStore  # noqa: E402
from vllm_audit.config import load_config  # noqa: E402

_TMP = Path(__import__("tempfile").mkdtemp(prefix="vat-fuzz-"))
_CONFIG = load_config(
    None,
    {"log": {"dir": str(_TMP / "log")}, "access": {"auth": "api_key", "api_keys": {"file": str(_TMP / "keys.json")}}},
)
_KEYS = {u: KeyStore(_TMP / "keys.json").add(u, org, roles)[0] for u, (org, roles) in TENANTS.items()}
write_log(_TMP / "log", sample_entries())
project(_CONFIG)
EVENTS: list[dict[str, Any]] = []
APP = AuditApi(_CONFIG, EVENTS.append)


def _schema(who: str) -> Any:
    schema = schemathesis.openapi.from_asgi("/audit/v1/openapi.json", APP)

    @schema.auth()
    class _Key:
        def get(self, case: Any, context: Any) -> str:
            return _KEYS[who]

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}
            case.headers.pop("x-api-key", None)
            if isinstance(case.query, dict):
                # The cursor is an opaque token from a previous page: random strings are rightly
                # refused (400, covered in test_api); drop it so schema-valid requests stay valid.
                case.query.pop("cursor", None)

    return schema


AUDITOR = _schema("audrey")
ADMIN = _schema("root")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@AUDITOR.parametrize()  # type: ignore[untyped-decorator]
@FUZZ
def test_audit_api_fuzz_as_auditor(case: Any) -> None:
    case.call_and_validate()


@ADMIN.parametrize()  # type: ignore[untyped-decorator]
@FUZZ
def test_audit_api_fuzz_as_admin(case: Any) -> None:
    case.call_and_validate()


def test_fuzzing_reads_were_audited() -> None:
    assert EVENTS and all(e["record_type"] == "event" for e in EVENTS)
