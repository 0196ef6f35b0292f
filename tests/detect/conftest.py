"""Shared fixtures for the detector tests: scripted traffic, real Redis, logs written by the real Chain."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_service
from tests.sinks.conftest import inference

REDIS_URL = os.environ.get("VLLM_AUDIT_TEST_REDIS", "redis://127.0.0.1:6379/0")
BASE = "2026-07-01T12:00:"


def redis_ok() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh Redis key prefix (every key under it is removed afterwards)."""
    need_service(redis_ok(), f"Redis at {REDIS_URL}")
    from vllm_audit.detect.state import RedisState

    p = f"test-detect-{uuid.uuid4().hex[:10]}:"
    yield p
    RedisState(REDIS_URL, "cleanup", p).reset()


def rec(i: int, *, user: str = "", second: float = 0.0, **fields: Any) -> dict[str, Any]:
    """A benign (redacted) inference record; ``fields`` override any field."""
    r = inference(i)
    r["user_id"] = user or f"user-{i % 10}"
    r["key_id"] = f"key-{r['user_id']}"
    r["client_ip"] = f"198.51.100.{i % 10 + 1}"
    r["request_id"] = f"req-{uuid.uuid4().hex[:12]}"
    r["record_id"] = str(uuid.uuid4())
    sec = int(second)
    r["timestamp"] = f"{BASE}{sec:02d}.{int((second - sec) * 1000):03d}Z"
    r["input_prompt"] = [{"role": "user", "content": f"Summarise support ticket {i} about a late delivery."}]
    r["output_response"] = f"Ticket {i}: the parcel is late; the customer wants a new date."
    r["completion_tokens"] = 80 + i % 17
    r.update(fields)
    return r


def attack_traffic(half: int) -> list[dict[str, Any]]:
    """Scripted attacks for one of two logs (``half`` 0 or 1), each split or placed as the test needs.

    - a burst: user ``scraper`` sends 90 calls in this log (180 in both: over 120/min, and still
      over it in the batches after the crossing: one alert all the same);
    - 10 users of each log send the same prompt (20 users in both);
    - log 0 only: 60 normal outputs then one of 4000 tokens; a SQL-injection prompt; an
      output holding a (redacted) ID number.
    """
    out: list[dict[str, Any]] = []
    n = 1000 * half
    for k in range(90):
        out.append(rec(n + k, user="scraper", second=k * 0.35))
    for k in range(10):
        u = f"bot-{half}-{k}"
        same = [{"role": "user", "content": "Write me 50 fake reviews for shop 4411"}]
        out.append(rec(n + 100 + k, user=u, second=36 + k, input_prompt=same))
    if half == 0:
        for k in range(60):
            out.append(rec(n + 200 + k, second=40 + k * 0.2))
        out.append(rec(n + 300, user="user-3", second=53, completion_tokens=4000, output_response="y" * 4000))
        out.append(rec(n + 301, user="mallory", second=54,
                       input_prompt=[{"role": "user", "content": "Look up customer name' OR '1'='1' -- please"}]))
        out.append(rec(n + 302, user="user-4", second=55, output_response="Sure: her ID number is <CN_ID>."))
    return out


def benign_traffic(half: int, volume: int) -> list[dict[str, Any]]:
    """``volume`` benign records for one log: many users, distinct prompts, usual lengths."""
    n = 1000 * half
    out = []
    for k in range(volume):
        out.append(rec(n + k, user=f"user-{half}-{k % 12}", second=k * 58 / volume,
                       input_prompt=[{"role": "user", "content": f"How do I index table t{n + k} on email in SQL?"}],
                       output_response=f"Use CREATE INDEX ON t{n + k} (email); contact <EMAIL> for help."))
    return out


def write_log(log_dir: Path, records: list[dict[str, Any]]) -> None:
    from tests.sinks.conftest import LiveLog

    live = LiveLog(log_dir)
    try:
        live.write(0, records=records, batch=50)
    finally:
        live.close()
