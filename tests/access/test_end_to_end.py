"""The issue's "must show", through real gateway processes (demo engine) on PostgreSQL and Redis.

Two orgs, each with a user and an auditor, plus a platform admin: each sees exactly what the role
allows; cross-tenant reads get 404 and leave a record; tampered, expired and wrong-audience JWTs get
401 and a record; a revoked key stops working at once; a rate limit holds across two gateway
processes sharing Redis; the same isolation holds at the SQL level.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.access.conftest import TENANTS
from tests.helpers import gateway, read_entries
from vllm_audit.access.apikeys import KeyStore

pytestmark = [pytest.mark.service, pytest.mark.slow]

ISS, AUD = "https://idp.e2e/", "vllm-e2e"
SIGNER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(**over: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "carol",
        "org_id": "globex",
        "roles": ["user"],
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(over)
    return jwt.encode(claims, SIGNER, algorithm="RS256", headers={"kid": "e2e"})


def chat(base: str, auth: str, text: str = "hello") -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "demo-model", "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {auth}"},
        timeout=30,
    )


@pytest.fixture
def setup(tmp_path: Path, pg_dsn: str, pg_names: dict[str, str], redis_url: str) -> Iterator[dict[str, Any]]:
    keys_file = tmp_path / "keys.json"
    store = KeyStore(keys_file)
    keys: dict[str, tuple[str, str]] = {}
    for user, (org, roles) in {**TENANTS, "rita": ("acme", ("user",))}.items():
        key, entry = store.add(user, org, roles)
        keys[user] = (key, entry.key_id)
    jwks = tmp_path / "jwks.json"
    pub = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNER.public_key()))
    jwks.write_text(json.dumps({"keys": [{**pub, "kid": "e2e", "alg": "RS256", "use": "sig"}]}))
    log_dir = tmp_path / "log"
    config = f"""
[log]
dir = "{log_dir}"
[access]
auth = "api_key+jwt"
[access.api_keys]
file = "{keys_file}"
[access.jwt]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = ["{AUD}"]
jwks_file = "{jwks}"
[access.quota]
redis_url = "{redis_url}"
redis_prefix = "vat-e2e:{secrets.token_hex(4)}"
[access.quota.per_user]
requests_per_min = 4
[access.store]
kind = "postgresql"
dsn = "{pg_dsn}"
table_prefix = "{pg_names["prefix"]}"
reader_role = "{pg_names["role"]}"
"""
    (tmp_path / "access.toml").write_text(config)
    with (
        gateway(tmp_path, config=config, log_dir=log_dir) as (gw1, _, _p1),
        gateway(tmp_path, config=config, log_dir=log_dir) as (gw2, _, _p2),
    ):
        yield {"gw1": gw1, "gw2": gw2, "keys": keys, "log": log_dir, "config": tmp_path / "access.toml"}


def audit(base: str, key: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{base}/audit/v1{path}", params=params, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_end_to_end(setup: dict[str, Any], pg_dsn: str, pg_names: dict[str, str]) -> None:
    gw1, gw2, keys, log_dir = setup["gw1"], setup["gw2"], setup["keys"], setup["log"]
    key = {u: k for u, (k, _) in keys.items()}

    # -- traffic: alice and bob (acme) by API key, carol (globex) by JWT -------------------------
    rid: dict[str, str] = {}
    for user, cred in (("alice", key["alice"]), ("bob", key["bob"]), ("carol", token())):
        r = chat(gw1, cred, f"the private plan of {user}")
        assert r.status_code == 200, r.text
        rid[user] = r.headers["x-request-id"]

    # -- each role sees exactly what it may (queried through the other gateway) --------------------
    def seen(who: str) -> set[str]:
        r = audit(gw2, key[who], "/records", limit=500)
        assert r.status_code == 200, r.text
        return {rec["request_id"] for rec in r.json()["records"] if rec["status"] == "ok"}

    assert seen("alice") == {rid["alice"]}
    assert seen("audrey") == {rid["alice"], rid["bob"]}
    assert seen("gary") == {rid["carol"]}
    assert seen("root") >= {rid["alice"], rid["bob"], rid["carol"]}
    usage = audit(gw2, key["gary"], "/usage", group_by="org_id").json()["usage"]
    assert [u["org_id"] for u in usage] == ["globex"]

    # -- cross-tenant single reads: 404, and a record of the attempt ------------------------------
    for who, target in (("alice", "carol"), ("gary", "bob"), ("audrey", "carol"), ("carol", "alice")):
        r = audit(gw1, key[who], f"/records/{rid[target]}")
        assert r.status_code == 404, (who, target, r.text)
    assert audit(gw1, key["gary"], f"/records/{rid['carol']}").status_code == 200
    assert audit(gw1, key["root"], f"/records/{rid['alice']}").json()["record"]["user_id"] == "alice"

    # -- bad JWTs: 401 with a reason, and a record ------------------------------------------------
    good = token()
    h, _, s = good.split(".")
    forged_payload = jwt.utils.base64url_encode(
        json.dumps({"sub": "mallory", "org_id": "acme", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 300}).encode()
    ).decode()
    bad = {
        "invalid token signature": f"{h}.{forged_payload}.{s}",
        "expired token": token(exp=int(time.time()) - 3600),
        "wrong audience": token(aud="another-service"),
    }
    for reason, tok in bad.items():
        r = chat(gw1, tok)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["message"] == reason and tok not in r.text

    # -- a revoked key stops working at once, on both running gateways ---------------------------
    assert chat(gw2, key["bob"]).status_code == 200
    out = subprocess.run(
        [sys.executable, "-m", "vllm_audit.cli", "keys", "revoke", "--config", str(setup["config"]), keys["bob"][1]],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "VLLM_AUDIT_CONFIG": ""},
        cwd=log_dir.parent,
    )
    assert out.returncode == 0, out.stderr
    for gw in (gw1, gw2):
        r = chat(gw, key["bob"])
        assert r.status_code == 401 and r.json()["error"]["message"] == "revoked API key"

    # -- the rate limit (4/min per user) holds across the two gateways -----------------------------
    codes = [chat(gw1 if i % 2 else gw2, key["rita"]) for i in range(7)]
    assert [r.status_code for r in codes] == [200] * 4 + [429] * 3
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in codes[4:])

    # -- everything above left records in the tamper-evident log ----------------------------------
    deadline = time.monotonic() + 30
    while True:  # 429 records may still be on their way to disk (durability is not strict here)
        entries = read_entries(log_dir)
        if sum(1 for e in entries if e.get("http_status") == 429) >= 3 or time.monotonic() > deadline:
            break
    reads = [e for e in entries if e.get("event") == "audit_read"]
    misses = {(e["actor"]["user_id"], e["query"].get("id")) for e in reads if e["outcome"] == "not_found"}
    assert misses >= {("alice", rid["carol"]), ("gary", rid["bob"]), ("audrey", rid["carol"]), ("carol", rid["alice"])}
    assert any(e["actor"]["user_id"] == "root" and e["outcome"] == "ok" for e in reads)
    records = [e for e in entries if e.get("record_type") == "inference"]
    failed = [r for r in records if r.get("auth_status") == "failed" and r.get("http_status") == 401]
    assert len(failed) >= len(bad) + 2  # three JWTs + bob's revoked key on both gateways
    assert all(t not in json.dumps(entries) for t in bad.values())
    assert sum(1 for r in records if r.get("http_status") == 429) == 3
    assert any(e.get("event") == "key_revoked" and e["key"]["key_id"] == keys["bob"][1] for e in entries)

    # -- the same isolation at the SQL level (a tenant role running raw SQL) ---------------------
    import psycopg

    tenant = pg_names["tenant_role"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {tenant} LOGIN IN ROLE {pg_names['role']}")
    table = f"{pg_names['prefix']}_records"
    from vllm_audit.access.store import PostgresStore, Viewer, open_store
    from vllm_audit.config import load_config

    store = open_store(load_config(setup["config"]))
    assert isinstance(store, PostgresStore)
    store.map_db_role(tenant, Viewer("user", "acme", "alice"))
    with psycopg.connect(pg_dsn.replace("postgres@", f"{tenant}@")) as conn, conn.transaction():
        conn.execute("SELECT set_config('vllm_audit.role', 'platform_admin', true)")  # changes nothing
        rows = conn.execute(f"SELECT DISTINCT org_id, user_id FROM {table}").fetchall()
        assert rows == [("acme", "alice")]
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE user_id = 'carol'").fetchone() == (0,)
