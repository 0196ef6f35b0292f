"""Quotas: requests/min and tokens/min per key, user and org; in-process and shared through a real Redis."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from vllm_audit.access import build_quota
from vllm_audit.access.identity import Identity
from vllm_audit.access.quota import Quota
from vllm_audit.config import Config, load_config

ALICE = Identity("alice", "acme", ("user",), "authenticated", "api_key", "aaaaaaaaaaaa")
ALICE_KEY2 = Identity("alice", "acme", ("user",), "authenticated", "api_key", "bbbbbbbbbbbb")
BOB = Identity("bob", "acme", ("user",), "authenticated", "api_key", "cccccccccccc")
CAROL = Identity("carol", "globex", ("user",), "authenticated", "jwt")


def cfg(tmp_path: Path, quota: dict[str, Any]) -> Config:
    return load_config(None, {"log": {"dir": str(tmp_path / "log")}, "access": {"quota": quota}})


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":  # in-process counters are per prefix: one per test
        return {"redis_prefix": f"vat-mem:{secrets.token_hex(4)}"}
    url = request.getfixturevalue("redis_url")
    return {"redis_url": url, "redis_prefix": f"vat:{secrets.token_hex(4)}"}


def test_no_limits_no_quota(tmp_path: Path) -> None:
    assert build_quota(cfg(tmp_path, {})) is None


async def test_requests_per_minute_per_key_user_org(tmp_path: Path, backend: dict[str, Any]) -> None:
    q = build_quota(
        cfg(
            tmp_path,
            {
                **backend,
                "per_key": {"requests_per_min": 2},
                "per_user": {"requests_per_min": 3},
                "per_org": {"requests_per_min": 4},
            },
        )
    )
    assert q is not None
    try:
        assert await q.check(ALICE, "/v1/chat/completions") is None
        assert await q.check(ALICE, "/v1/chat/completions") is None
        wait = await q.check(ALICE, "/v1/chat/completions")  # key limit
        assert wait is not None and 0 < wait <= 60
        assert await q.check(ALICE_KEY2, "/v1/chat/completions") is None  # another key, same user
        assert await q.check(ALICE_KEY2, "/v1/chat/completions") is not None  # user limit (3)
        assert await q.check(BOB, "/v1/chat/completions") is None  # org: 4th call
        assert await q.check(BOB, "/v1/chat/completions") is not None  # org limit
        assert await q.check(CAROL, "/v1/chat/completions") is None  # another org
    finally:
        await q.aclose()


async def test_same_user_id_in_two_orgs_has_two_counters(tmp_path: Path, backend: dict[str, Any]) -> None:
    """Per-user counters are scoped by the org: alice of acme exhausting hers leaves alice of globex alone."""
    q = build_quota(cfg(tmp_path, {**backend, "per_user": {"requests_per_min": 1}}))
    assert q is not None
    other_alice = Identity("alice", "globex", ("user",), "authenticated", "jwt")
    try:
        assert await q.check(ALICE, "/v1/chat/completions") is None
        assert await q.check(ALICE, "/v1/chat/completions") is not None
        assert await q.check(other_alice, "/v1/chat/completions") is None
    finally:
        await q.aclose()


async def test_routes_filter(tmp_path: Path) -> None:
    q = build_quota(
        cfg(
            tmp_path,
            {"per_user": {"requests_per_min": 1}, "routes": ["/v1/chat/completions"], "redis_prefix": "vat-routes"},
        )
    )
    assert q is not None
    assert await q.check(ALICE, "/v1/chat/completions") is None
    assert await q.check(ALICE, "/v1/chat/completions") is not None
    assert await q.check(ALICE, "/v1/models") is None


async def test_shared_across_replicas_through_redis(tmp_path: Path, redis_url: str) -> None:
    """Two Quota objects (two gateway processes) share one counter."""
    conf = cfg(
        tmp_path,
        {"redis_url": redis_url, "redis_prefix": f"vat:{secrets.token_hex(4)}", "per_user": {"requests_per_min": 5}},
    )
    a, b = Quota(conf.access.quota), Quota(conf.access.quota)
    try:
        results = []
        for i in range(8):
            results.append(await (a if i % 2 else b).check(ALICE, "/v1/chat/completions"))
        assert results[:5] == [None] * 5
        assert all(r is not None and 0 < r <= 60 for r in results[5:])
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_policy(tmp_path: Path) -> None:
    base = {"redis_url": "redis://127.0.0.1:1/0", "per_user": {"requests_per_min": 1}}
    allow = build_quota(cfg(tmp_path, base))
    deny = build_quota(cfg(tmp_path, {**base, "on_redis_error": "deny"}))
    assert allow is not None and deny is not None
    assert await allow.check(ALICE, "/v1/chat/completions") is None
    assert await deny.check(ALICE, "/v1/chat/completions") == 1.0
