from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vllm_audit.config import Config, config_from_mapping
from vllm_audit.privacy.keystore import generate_master_key


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config with a fresh master key file and the given ``[privacy]`` table."""

    def make(privacy: dict[str, Any] | None = None, *, keys: bool = True) -> Config:
        table: dict[str, Any] = dict(privacy or {})
        if keys:
            key_file = tmp_path / "keys" / "master.json"
            if not key_file.exists():
                generate_master_key(key_file)
            table.setdefault("key_file", str(key_file))
        return config_from_mapping({"privacy": table, "log": {"dir": str(tmp_path / "log")}})

    return make


def record(**fields: Any) -> dict[str, Any]:
    """A finalized record shaped like the core's, with the given fields overridden."""
    base: dict[str, Any] = {
        "record_type": "inference",
        "request_id": "req-1",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "org_id": "acme",
        "user_id": "alice",
        "client_ip": "203.0.113.7",
        "input_prompt": None,
        "output_response": None,
        "error_message": None,
    }
    base.update(fields)
    return base
