from __future__ import annotations

import os

import pytest

REQUIRE_SERVICES = os.environ.get("VLLM_AUDIT_REQUIRE_SERVICES") == "1"


def need_service(ok: bool, what: str) -> None:
    """Skip when a real service is missing; in CI (VLLM_AUDIT_REQUIRE_SERVICES=1) fail instead."""
    if ok:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {what}")
    pytest.skip(f"service unavailable: {what}")
