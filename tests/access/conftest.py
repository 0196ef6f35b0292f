"""Fixtures for the access tests: real PostgreSQL and Redis (never mocked), chain-written logs.

A missing service skips the test with a reason, unless ``VLLM_AUDIT_REQUIRE_SERVICES=1``, where
it fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_audit.integrity.chain import Chain

REQUIRE = os.environ.get("VLLM_AUDIT_REQUIRE_SERVICES") == "1"
PG_DSN = os.environ.get("VLLM_AUDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VLLM_AUDIT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def need(ok: bool, what: str, why: str = "") -> None:
    if ok:
        return
    msg = f"{what} unavailable{': ' + why if why else ''}"
    if REQUIRE:
        pytest.fail(f"{msg} (VLLM_AUDIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(msg)


def _pg_ok() -> tuple[bool, str]:
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True, ""
    except Exception as exc:
        return False, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _redis_ok() -> tuple[bool, str]:
    try:
        import redis

        r = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        r.ping()
        r.close()
        return True, ""
    except Exception as exc:
        return False, str(exc)


@pytest.fixture
def pg_dsn() -> str:
    ok, why = _pg_ok()
    need(ok, f"PostgreSQL at {PG_DSN}", why)
    return PG_DSN


@pytest.fixture
def redis_url() -> str:
    ok, why = _redis_ok()
    need(ok, f"Redis at {REDIS_URL}", why)
    return REDIS_URL


@pytest.fixture
def pg_names(pg_dsn: str) -> Iterator[dict[str, str]]:
    """A unique table prefix and reader role for one test, dropped afterwards."""
    import psycopg

    tag = secrets.token_hex(4)
    names = {"prefix": f"vat_{tag}", "role": f"vat_reader_{tag}", "tenant_role": f"vat_tenant_{tag}"}
    yield names
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for t in ("records", "cursors", "viewers", "db_tenants"):
            conn.execute(f"DROP TABLE IF EXISTS {names['prefix']}_{t}")
        conn.execute(f"DROP FUNCTION IF EXISTS {names['prefix']}_viewer()")
        conn.execute(f"DROP FUNCTION IF EXISTS {names['prefix']}_act_as(TEXT, TEXT, TEXT)")
        for role in (names["role"], names["tenant_role"]):
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def inference(
    request_id: str,
    org_id: str,
    user_id: str,
    *,
    ts: str = "2026-01-02T03:04:05.678Z",
    model: str = "demo-model",
    status: str = "ok",
    prompt: str = "hello",
    output: str = "world",
    total: int = 7,
    route: str = "/v1/chat/completions",
) -> dict[str, Any]:
    """An inference entry with the lead's record fields (what the writer would seal)."""
    return {
        "record_type": "inference",
        "schema_version": 1,
        "timestamp": ts,
        "request_id": request_id,
        "client_ip": "10.0.0.1",
        "user_id": user_id,
        "org_id": org_id,
        "auth_status": "authenticated",
        "model_name": model,
        "route": route,
        "method": "POST",
        "http_status": 200 if status == "ok" else 400,
        "status": status,
        "input_prompt": {"messages": [{"role": "user", "content": prompt}]},
        "output_response": output,
        "prompt_tokens": total - 2,
        "completion_tokens": 2,
        "total_tokens": total,
        "latency_ms": 12.5,
        "ttft_ms": None,
        "finish_reason": "stop",
        "prompt_sha256": "ab" * 32,
        "stream": False,
    }


def write_log(log_dir: Path, entries: list[dict[str, Any]]) -> str:
    """Seal entries into a real chain (as the writer does); returns the writer id."""
    chain = Chain(log_dir)
    try:
        chain.append([*chain.pending_events(), *entries])
        chain.sync()
        chain.after_commit()
        return chain.writer_id
    finally:
        chain.close()


#: Two orgs, each with a user and an auditor, plus a platform admin.
TENANTS = {
    "alice": ("acme", ("user",)),
    "bob": ("acme", ("user",)),
    "audrey": ("acme", ("org_auditor",)),
    "carol": ("globex", ("user",)),
    "gary": ("globex", ("org_auditor",)),
    "root": ("platform", ("platform_admin",)),
}


def sample_entries() -> list[dict[str, Any]]:
    out = []
    n = 0
    for user, (org, _) in TENANTS.items():
        if user in ("audrey", "gary", "root"):
            continue
        for i in range(3):
            n += 1
            out.append(
                inference(
                    f"req-{user}-{i}",
                    org,
                    user,
                    ts=f"2026-01-0{1 + i}T10:00:{n:02d}.000Z",
                    model="m-large" if i == 2 else "m-small",
                    status="ok" if i < 2 else "client_error",
                    prompt=f"secret plan of {user} number {i}",
                    total=10 * (i + 1),
                )
            )
    return out


def project(config: Any, timeout: float = 60.0) -> int:
    """Run the query-store projection until it has caught up with the log; returns entries read."""
    from vllm_audit.access.projection import QueryStoreProjection
    from vllm_audit.access.store import open_store
    from vllm_audit.ship.config import state_dir
    from vllm_audit.ship.runner import Runner

    proj = QueryStoreProjection(open_store(config), batch_max=config.ship.batch_max)
    runner = Runner(config.log.dir, state_dir(config.ship, config.log.dir), [proj], config.ship)
    assert runner.run_until_caught_up(timeout), runner.statuses[proj.name]
    return runner.statuses[proj.name].delivered
