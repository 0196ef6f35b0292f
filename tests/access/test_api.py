"""The audit API driven in-process (httpx ASGITransport): roles, cross-tenant 404s, every read audited,
key administration for platform admins only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.access.conftest import TENANTS, project, sample_entries, write_log
from vllm_audit.access import build_audit_api
from vllm_audit.access.apikeys import KeyStore
from vllm_audit.config import Config, load_config

BASE = "/audit/v1"


class Api:
    def __init__(
        self, client: httpx.AsyncClient, keys: dict[str, str], events: list[dict[str, Any]], config: Config
    ) -> None:
        self.client, self.keys, self.events, self.config = client, keys, events, config

    async def get(self, who: str | None, path: str, **params: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.keys[who]}"} if who else {}
        return await self.client.get(BASE + path, params=params, headers=headers)

    async def post(self, who: str, path: str, body: Any = None) -> httpx.Response:
        return await self.client.post(BASE + path, json=body, headers={"authorization": f"Bearer {self.keys[who]}"})


def api_config(tmp_path: Path, store: dict[str, Any] | None = None) -> Config:
    return load_config(
        None,
        {
            "log": {"dir": str(tmp_path / "log")},
            "access": {"auth": "api_key", "api_keys": {"file": str(tmp_path / "keys.json")}, "store": store or {}},
        },
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    store: dict[str, Any] = {}
    if request.param == "postgresql":
        names = request.getfixturevalue("pg_names")
        store = {
            "kind": "postgresql",
            "dsn": request.getfixturevalue("pg_dsn"),
            "table_prefix": names["prefix"],
            "reader_role": names["role"],
        }
    config = api_config(tmp_path, store)
    ks = KeyStore(tmp_path / "keys.json")
    keys = {user: ks.add(user, org, roles)[0] for user, (org, roles) in TENANTS.items()}
    write_log(tmp_path / "log", sample_entries())
    project(config)
    events: list[dict[str, Any]] = []
    app = build_audit_api(config, events.append)
    assert app is not None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client:
        yield Api(client, keys, events, config)


def ids(resp: httpx.Response) -> set[str]:
    assert resp.status_code == 200, resp.text
    return {r["request_id"] for r in resp.json()["records"]}


async def test_each_role_sees_what_it_may(api: Api) -> None:
    assert ids(await api.get("alice", "/records")) == {f"req-alice-{i}" for i in range(3)}
    assert ids(await api.get("audrey", "/records")) == {f"req-{u}-{i}" for u in ("alice", "bob") for i in range(3)}
    assert ids(await api.get("gary", "/records")) == {f"req-carol-{i}" for i in range(3)}
    assert len(ids(await api.get("root", "/records"))) == 9
    assert ids(await api.get("root", "/records", org_id="globex", status="client_error")) == {"req-carol-2"}
    assert ids(await api.get("alice", "/records", org_id="globex")) == set()
    assert ids(await api.get("audrey", "/records", q="plan of bob", limit=2)) == {"req-bob-2", "req-bob-1"}

    usage = (await api.get("audrey", "/usage", group_by="org_id,user_id")).json()
    assert [(u["org_id"], u["user_id"], u["calls"], u["total_tokens"]) for u in usage["usage"]] == [
        ("acme", "alice", 3, 60),
        ("acme", "bob", 3, 60),
    ]
    who = (await api.get("gary", "/whoami")).json()
    assert (who["user_id"], who["org_id"], who["audit_role"]) == ("gary", "globex", "org_auditor")


async def test_single_record_and_cross_tenant_reads(api: Api) -> None:
    r = await api.get("carol", "/records/req-carol-1")
    assert r.status_code == 200
    body = r.json()
    assert body["record"]["request_id"] == "req-carol-1" and body["record"]["org_id"] == "globex"
    proof = body["proof"]  # from vllm_audit.integrity.proofs, for exactly this record
    assert proof is not None, body["proof_error"]
    assert proof["writer_id"] == body["record"]["writer_id"] and '"request_id":"req-carol-1"' in proof["record"]
    api.events.clear()
    for who in ("alice", "audrey", "bob"):
        r = await api.get(who, "/records/req-carol-1")
        assert r.status_code == 404 and r.json()["error"]["message"] == "no such record"
    missing = await api.get("alice", "/records/req-never-was")
    assert missing.status_code == 404 and missing.json() == r.json()  # indistinguishable from not-yours
    denied = [e for e in api.events if e["outcome"] == "not_found"]
    assert [(e["actor"]["user_id"], e["query"]["id"]) for e in denied] == [
        ("alice", "req-carol-1"),
        ("audrey", "req-carol-1"),
        ("bob", "req-carol-1"),
        ("alice", "req-never-was"),
    ]
    assert (await api.get("gary", "/records/req-carol-1")).status_code == 200
    assert (await api.get("root", "/records/req-alice-0")).status_code == 200


async def test_every_read_is_an_audit_event(api: Api) -> None:
    api.events.clear()
    await api.get("audrey", "/records", model="m-large")
    await api.get("audrey", "/usage")
    await api.get(None, "/records")
    await api.get("audrey", "/records", limit=0)
    kinds = [(e["record_type"], e["event"], e["endpoint"], e["outcome"], e["http_status"]) for e in api.events]
    assert kinds == [
        ("event", "audit_read", "records", "ok", 200),
        ("event", "audit_read", "usage", "ok", 200),
        ("event", "audit_read", "records", "unauthenticated", 401),
        ("event", "audit_read", "records", "bad_request", 400),
    ]
    first = api.events[0]
    assert first["actor"]["user_id"] == "audrey" and first["audit_role"] == "org_auditor"
    assert first["query"] == {"model": "m-large"}
    writers = {r["writer_id"] for r in (await api.get("root", "/records")).json()["records"]}
    assert len(first["result_ids"]) == 2 and all(k.split(":")[0] in writers for k in first["result_ids"])
    assert all(api.keys["audrey"] not in str(e) for e in api.events)


async def test_errors_are_json_with_a_reason(api: Api) -> None:
    r = await api.get(None, "/records")
    assert r.status_code == 401 and r.json()["error"]["message"] == "missing credentials"
    r = await api.client.get(BASE + "/records", headers={"authorization": "Bearer vak_0123456789ab_" + "x" * 43})
    assert r.status_code == 401 and r.json()["error"]["message"] == "unknown API key"
    for params, status in [
        ({"limit": "x"}, 400),
        ({"status": "weird"}, 400),
        ({"since": "soon"}, 400),
        ({"cursor": "@@"}, 400),
        ({"prompt_sha256": "xyz"}, 400),
    ]:
        r = await api.get("root", "/records", **params)
        assert r.status_code == status and r.json()["error"]["message"], params
    assert (await api.get("root", "/usage", group_by="planet")).status_code == 400
    assert (await api.get("root", "/nope")).status_code == 404
    r = await api.client.delete(BASE + "/records", headers={"authorization": f"Bearer {api.keys['root']}"})
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    spec = (await api.client.get(BASE + "/openapi.json")).json()
    assert spec["openapi"].startswith("3.") and f"{BASE}/records" in spec["paths"]


async def test_key_admin_is_platform_admin_only(api: Api) -> None:
    api.events.clear()
    for who in ("audrey", "alice"):
        assert (await api.get(who, "/keys")).status_code == 403
        assert (
            await api.post(who, "/keys", {"user_id": "eve", "org_id": "acme", "roles": ["platform_admin"]})
        ).status_code == 403
    assert [e["event"] for e in api.events] == ["key_admin_denied"] * 4
    listing = (await api.get("root", "/keys")).json()["keys"]
    assert len(listing) == len(TENANTS) and all("sha256" not in k for k in listing)
    r = await api.post("root", "/keys", {"user_id": "dave", "org_id": "globex", "roles": ["user"]})
    assert r.status_code == 201
    new = r.json()
    api.keys["dave"] = new["key"]
    assert (await api.get("dave", "/whoami")).json()["user_id"] == "dave"
    r = await api.post("root", f"/keys/{new['key_id']}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = await api.get("dave", "/whoami")
    assert r.status_code == 401 and r.json()["error"]["message"] == "revoked API key"
    assert [e["event"] for e in api.events if e["event"].startswith("key_")][-3:] == [
        "key_list",
        "key_added",
        "key_revoked",
    ]
    assert all(new["key"] not in str(e) for e in api.events)


async def test_no_proof_leaks_for_a_reused_request_id(api: Api, tmp_path: Path) -> None:
    """A client-chosen request id reused in another org: each tenant gets its own record, and a proof
    only when it proves that very record."""
    from tests.access.conftest import inference

    write_log(tmp_path / "log", [inference("req-carol-1", "acme", "alice", prompt="alice reuses the id")])
    project(api.config)
    r = await api.get("alice", "/records/req-carol-1")
    assert r.status_code == 200
    body = r.json()
    assert body["record"]["user_id"] == "alice"
    assert body["proof"] is None or '"user_id":"alice"' in body["proof"]["record"]
    assert "plan of carol" not in str(body) and "'user_id': 'carol'" not in str(body)


async def test_read_refused_when_it_cannot_be_recorded(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    key, _ = KeyStore(tmp_path / "keys.json").add("root", "platform", ("platform_admin",))

    def broken(entry: dict[str, Any]) -> None:
        raise RuntimeError("log down")

    app = build_audit_api(config, broken)
    assert app is not None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client:
        r = await client.get(BASE + "/records", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 503


async def test_reused_request_id_never_shadows_another_record(api: Api) -> None:
    """Records are keyed by their server record_id: a client reusing an X-Request-Id (in its own org and
    in another) shadows nothing; a lookup by request id returns every match the caller may see, never
    another tenant's, and a lookup by record_id returns exactly that record."""
    from tests.access.conftest import inference

    dup = [
        inference("dup-1", "acme", "alice", prompt="alice first", ts="2026-02-01T00:00:01.000Z"),
        inference("dup-1", "acme", "bob", prompt="bob reuses", ts="2026-02-01T00:00:02.000Z"),
        inference("dup-1", "globex", "carol", prompt="carol reuses", ts="2026-02-01T00:00:03.000Z"),
    ]
    for i, rec in enumerate(dup):
        rec["record_id"] = f"0190a000-0000-7000-8000-00000000000{i}"
    write_log(Path(api.config.log.dir), dup)
    project(api.config)

    async def who_sees(who: str) -> list[str]:
        r = await api.get(who, "/records/dup-1")
        if r.status_code == 404:
            return []
        body = r.json()
        assert body["record"] == body["matches"][0]["record"]
        return [m["record"]["user_id"] for m in body["matches"]]

    assert await who_sees("alice") == ["alice"]
    assert await who_sees("bob") == ["bob"]
    assert await who_sees("carol") == ["carol"]
    assert await who_sees("audrey") == ["bob", "alice"]  # both of the org, newest first
    assert await who_sees("gary") == ["carol"]
    assert await who_sees("root") == ["carol", "bob", "alice"]
    rows = (await api.get("root", "/records", request_id="dup-1")).json()["records"]
    assert len(rows) == 3
    # By record_id: exactly one record, and still only for whom may see it.
    r = await api.get("audrey", f"/records/{dup[0]['record_id']}")
    assert r.status_code == 200 and [m["record"]["user_id"] for m in r.json()["matches"]] == ["alice"]
    assert (await api.get("carol", f"/records/{dup[0]['record_id']}")).status_code == 404
    assert (await api.get("root", "/records", record_id=dup[2]["record_id"])).json()["records"][0]["user_id"] == "carol"


async def test_malformed_or_repeated_parameters_are_identified_then_audited(api: Api) -> None:
    """The caller is identified before the request is validated: without credentials a malformed request
    is 401 (not 400); with them it is 400; both leave an audit event naming the caller and the outcome."""
    api.events.clear()
    qs = "limit=1&limit=2"
    r = await api.client.get(f"{BASE}/records?{qs}")
    assert r.status_code == 401
    r = await api.client.get(f"{BASE}/usage?{qs}", headers={"authorization": f"Bearer {api.keys['alice']}"})
    assert r.status_code == 400 and "more than once" in r.json()["error"]["message"]
    many = "&".join(f"p{i}=1" for i in range(100))
    r = await api.client.get(f"{BASE}/records?{many}", headers={"authorization": f"Bearer {api.keys['bob']}"})
    assert r.status_code == 400
    r = await api.client.get(f"{BASE}/nowhere?{qs}", headers={"authorization": f"Bearer {api.keys['bob']}"})
    assert r.status_code == 404
    got = [(e["endpoint"], e["actor"]["user_id"], e["outcome"], e["http_status"]) for e in api.events]
    assert got == [
        ("records", "anonymous", "unauthenticated", 401),
        ("usage", "alice", "bad_request", 400),
        ("records", "bob", "bad_request", 400),
        ("unknown", "bob", "not_found", 404),
    ]
    assert api.events[1]["query"] == {"raw": qs}


async def test_record_path_is_percent_decoded_once(api: Api) -> None:
    """``/records/a%2541`` names the id ``a%41`` (decoded once), not ``aA``."""
    from tests.access.conftest import inference

    write_log(Path(api.config.log.dir), [inference("a%41", "acme", "alice"), inference("aA", "acme", "alice")])
    project(api.config)
    r = await api.get("alice", "/records/a%2541")
    assert r.status_code == 200 and [m["record"]["request_id"] for m in r.json()["matches"]] == ["a%41"]
    r = await api.get("alice", "/records/a%2Fb")  # an encoded slash stays inside the one segment
    assert r.status_code == 404 and api.events[-1]["query"] == {"id": "a/b"}


async def test_lifespan_is_answered(tmp_path: Path) -> None:
    """The API answers the ASGI lifespan protocol (the handler used to be imported only for type checking)."""
    app = build_audit_api(api_config(tmp_path), lambda e: None)
    assert app is not None
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return inbox.pop(0)

    async def send(msg: Any) -> None:
        sent.append(msg)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_read_refused_when_its_event_is_not_durable(tmp_path: Path) -> None:
    """A read whose audit event cannot be made durable is refused (503) and returns nothing: the
    API awaits the writer's future, which fails when the log is down (a real AuditWriter whose log
    directory cannot be created)."""
    import asyncio

    from vllm_audit import hooks
    from vllm_audit.writer import AuditWriter

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    config = load_config(
        None,
        {
            "log": {"dir": str(blocker / "log")},
            "ship": {"in_process": False},
            "access": {
                "auth": "api_key",
                "api_keys": {"file": str(tmp_path / "keys.json")},
                "store": {"path": str(tmp_path / "index.sqlite"), "read_wait_s": 0},
            },
        },
    )
    key, _ = KeyStore(tmp_path / "keys.json").add("root", "platform", ("platform_admin",))
    writer = AuditWriter(config)
    writer.start()
    try:
        assert writer.failure is not None
        app = hooks.build_audit_api(config, writer.submit_event)
        assert app is not None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client:
            r = await client.get(BASE + "/records", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 503 and "records" not in r.json()
            r = await client.get(BASE + "/records")  # unauthenticated: refused too, not a silent 401
            assert r.status_code == 503

        async def failing(entry: dict[str, Any]) -> None:
            raise OSError("disk full")

        app = build_audit_api(config, lambda e: asyncio.ensure_future(failing(e)))
        assert app is not None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://audit") as client:
            r = await client.get(BASE + "/whoami", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 503
    finally:
        await asyncio.to_thread(writer.stop)
