"""Query store: ingestion from a real chain, idempotent rebuild, filters, pagination, tenant isolation
(SQLite in code; PostgreSQL with row-level security, checked with direct SQL as a tenant role)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.access.conftest import TENANTS, inference, sample_entries, write_log
from vllm_audit.access.ingest import Ingester, catch_up, rebuild
from vllm_audit.access.store import BadQuery, RecordQuery, Store, Viewer, open_store
from vllm_audit.config import Config, load_config


def make_config(tmp_path: Path, kind: str, pg_dsn: str = "", names: dict[str, str] | None = None) -> Config:
    store: dict[str, Any] = {"kind": kind}
    if kind == "postgresql":
        assert names is not None
        store.update(dsn=pg_dsn, table_prefix=names["prefix"], reader_role=names["role"])
    return load_config(None, {"log": {"dir": str(tmp_path / "log")}, "access": {"store": store}})


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    if request.param == "sqlite":
        return make_config(tmp_path, "sqlite")
    pg_dsn = request.getfixturevalue("pg_dsn")
    names = request.getfixturevalue("pg_names")
    return make_config(tmp_path, "postgresql", pg_dsn, names)


def viewer(user: str) -> Viewer:
    org, roles = TENANTS[user]
    role = "platform_admin" if "platform_admin" in roles else "org_auditor" if "org_auditor" in roles else "user"
    return Viewer(role, org, user)  # type: ignore[arg-type]


def ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["request_id"] for r in records}


def ingested(config: Config) -> Store:
    write_log(Path(config.log.dir), sample_entries())
    assert catch_up(config) > 0
    store = open_store(config)
    store.init()
    return store


def test_roles_see_exactly_their_scope(store_config: Config) -> None:
    store = ingested(store_config)
    everything = RecordQuery(limit=500)
    alice, _ = store.query(viewer("alice"), everything)
    assert ids(alice) == {"req-alice-0", "req-alice-1", "req-alice-2"}
    audrey, _ = store.query(viewer("audrey"), everything)
    assert ids(audrey) == {f"req-{u}-{i}" for u in ("alice", "bob") for i in range(3)}
    gary, _ = store.query(viewer("gary"), everything)
    assert ids(gary) == {f"req-carol-{i}" for i in range(3)}
    root, _ = store.query(viewer("root"), everything)
    assert len(root) == 9
    # Filters cannot widen the scope.
    sneaky, _ = store.query(viewer("alice"), RecordQuery(org_id="globex", limit=500))
    assert sneaky == []
    assert store.get(viewer("alice"), "req-carol-0") is None
    assert store.get(viewer("gary"), "req-carol-0") is not None
    assert store.get(viewer("root"), "req-carol-0")["org_id"] == "globex"  # type: ignore[index]


def test_filters_text_search_and_pagination(store_config: Config) -> None:
    store = ingested(store_config)
    root = viewer("root")
    recs, _ = store.query(root, RecordQuery(model="m-large", limit=50))
    assert ids(recs) == {"req-alice-2", "req-bob-2", "req-carol-2"}
    recs, _ = store.query(root, RecordQuery(status="client_error", user_id="bob", limit=50))
    assert ids(recs) == {"req-bob-2"}
    recs, _ = store.query(root, RecordQuery(q="PLAN OF CAROL", limit=50))
    assert ids(recs) == {f"req-carol-{i}" for i in range(3)}
    recs, _ = store.query(root, RecordQuery(q="100%_", limit=50))
    assert recs == []
    recs, _ = store.query(root, RecordQuery(since="2026-01-02", until="2026-01-03T00:00:00+00:00", limit=50))
    assert ids(recs) == {"req-alice-1", "req-bob-1", "req-carol-1"}
    # Cursor pagination walks everything once, newest first.
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.query(root, RecordQuery(limit=4, cursor=cursor))
        seen += [r["request_id"] for r in page]
        if cursor is None:
            break
    assert len(seen) == 9 and len(set(seen)) == 9
    stamps = [r["timestamp"] for r in store.query(root, RecordQuery(limit=50))[0]]
    assert stamps == sorted(stamps, reverse=True)
    with pytest.raises(BadQuery):
        store.query(root, RecordQuery(cursor="garbage!", limit=5))
    with pytest.raises(BadQuery):
        store.query(root, RecordQuery(since="yesterday", limit=5))


def test_usage_aggregates_respect_scope(store_config: Config) -> None:
    store = ingested(store_config)
    rows = store.usage(viewer("root"), RecordQuery(), ["org_id"])
    assert rows == [
        {"org_id": "acme", "calls": 6, "prompt_tokens": 108, "completion_tokens": 12, "total_tokens": 120, "errors": 2},
        {"org_id": "globex", "calls": 3, "prompt_tokens": 54, "completion_tokens": 6, "total_tokens": 60, "errors": 1},
    ]
    rows = store.usage(viewer("alice"), RecordQuery(), ["day", "model"])
    assert [(r["day"], r["model"], r["calls"], r["total_tokens"]) for r in rows] == [
        ("2026-01-01", "m-small", 1, 10),
        ("2026-01-02", "m-small", 1, 20),
        ("2026-01-03", "m-large", 1, 30),
    ]
    rows = store.usage(viewer("gary"), RecordQuery(), ["org_id", "user_id"])
    assert [(r["org_id"], r["user_id"], r["calls"]) for r in rows] == [("globex", "carol", 3)]


def test_ingestion_is_incremental_idempotent_and_rebuildable(store_config: Config) -> None:
    log_dir = Path(store_config.log.dir)
    write_log(log_dir, [inference("r1", "acme", "alice")])
    store = open_store(store_config)
    store.init()
    ing = Ingester(log_dir, store)
    assert ing.run_once() >= 2  # writer_started event + r1
    assert ing.run_once() == 0
    # A second writer (another process) and more entries on the first one (resumed chain).
    write_log(log_dir, [inference("r2", "acme", "alice")])
    seg = next(log_dir.glob("writers/*/seg-*.jsonl"))
    with seg.open("ab") as f:
        f.write(b'{"seq":999,"prev":"00","writer_id":"x","record_type":"inf')  # torn, unterminated tail
    ing.run_once()
    root = Viewer("platform_admin", "platform", "root")
    assert ids(store.query(root, RecordQuery(limit=50))[0]) == {"r1", "r2"}
    cursors = store.load_cursors()
    assert len(cursors) == len(list(log_dir.glob("writers/*")))
    # A fresh ingester (restart) reads nothing twice; rebuild gives the same store.
    assert Ingester(log_dir, store).run_once() == 0
    assert rebuild(store_config) >= 4
    assert ids(store.query(root, RecordQuery(limit=50))[0]) == {"r1", "r2"}
    assert store.load_cursors() == cursors


def test_postgres_row_level_security_with_direct_sql(tmp_path: Path, pg_dsn: str, pg_names: dict[str, str]) -> None:
    """Isolation is enforced by PostgreSQL itself: a tenant role running raw SQL sees only its rows."""
    import psycopg

    config = make_config(tmp_path, "postgresql", pg_dsn, pg_names)
    ingested(config)
    table, reader, tenant = f"{pg_names['prefix']}_records", pg_names["role"], pg_names["tenant_role"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {tenant} LOGIN IN ROLE {reader}")
        owner = conn.execute(f"SELECT tableowner FROM pg_tables WHERE tablename = '{table}'").fetchone()
        assert owner is not None and owner[0] != tenant
    tenant_dsn = pg_dsn.replace("postgres@", f"{tenant}@")

    def visible(role: str | None, org: str | None, user: str | None) -> list[tuple[str, str, str]]:
        with psycopg.connect(tenant_dsn) as conn, conn.transaction():
            for name, value in (("role", role), ("org_id", org), ("user_id", user)):
                if value is not None:
                    conn.execute(f"SELECT set_config('vllm_audit.{name}', %s, true)", (value,))
            rows = conn.execute(f"SELECT org_id, user_id, request_id FROM {table} ORDER BY request_id").fetchall()
            return [(str(a), str(b), str(c)) for a, b, c in rows]

    assert visible(None, None, None) == []  # nothing set: nothing visible
    assert visible("user", "acme", "alice") == [("acme", "alice", f"req-alice-{i}") for i in range(3)]
    assert {r[1] for r in visible("org_auditor", "acme", "audrey")} == {"alice", "bob"}
    assert {r[0] for r in visible("org_auditor", "globex", "gary")} == {"globex"}
    assert len(visible("platform_admin", "platform", "root")) == 9
    assert visible("superuser", "acme", "x") == []  # unknown role: nothing
    # Even an explicit WHERE for another tenant returns nothing, and the tenant cannot write.
    with psycopg.connect(tenant_dsn) as conn, conn.transaction():
        conn.execute(
            "SELECT set_config('vllm_audit.role', 'user', true), set_config('vllm_audit.org_id', 'acme', true),"
            " set_config('vllm_audit.user_id', 'alice', true)"
        )
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE org_id = 'globex'").fetchone() == (0,)
    with psycopg.connect(tenant_dsn) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {table}")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SELECT * FROM {pg_names['prefix']}_cursors")
    # The settings are transaction-local: a new transaction starts with nothing visible.
    with psycopg.connect(tenant_dsn) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('vllm_audit.role', 'platform_admin', true)")
        with conn.transaction():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
