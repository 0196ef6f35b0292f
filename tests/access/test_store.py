"""Query store: the projection of a real chain (resumable, idempotent, rebuildable), filters,
pagination, tenant isolation (SQLite in code; PostgreSQL with row-level security, attacked with
direct SQL as a tenant's own database role)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.access.conftest import TENANTS, inference, project, sample_entries, write_log
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
    assert project(config) > 0
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
    assert store.find(viewer("alice"), "req-carol-0") == []
    assert len(store.find(viewer("gary"), "req-carol-0")) == 1
    assert store.find(viewer("root"), "req-carol-0")[0]["org_id"] == "globex"


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


def test_projection_is_incremental_idempotent_and_rebuildable(store_config: Config) -> None:
    """The cursor (next_seq, last_leaf) is stored with the rows: a restart reads nothing twice, a torn
    tail waits, a second writer is followed, and a rebuild gives the same store."""
    from vllm_audit.access.projection import QueryStoreProjection

    log_dir = Path(store_config.log.dir)
    write_log(log_dir, [inference("r1", "acme", "alice")])
    assert project(store_config) >= 2  # writer_started event + r1
    assert project(store_config) == 0
    write_log(log_dir, [inference("r2", "acme", "alice")])  # a second writer (another process)
    seg = next(log_dir.glob("writers/*/seg-*.jsonl"))
    with seg.open("ab") as f:
        f.write(b'{"seq":999,"prev":"00","writer_id":"x","record_type":"inf')  # torn, unterminated tail
    project(store_config)
    store = open_store(store_config)
    root = Viewer("platform_admin", "platform", "root")
    assert ids(store.query(root, RecordQuery(limit=50))[0]) == {"r1", "r2"}
    cursors = store.load_cursors()
    assert len(cursors) == len(list(log_dir.glob("writers/*")))
    assert all(len(c.last_leaf) == 64 and c.next_seq >= 2 for c in cursors.values())
    assert project(store_config) == 0
    proj = QueryStoreProjection(store)
    proj.reset()
    assert store.load_cursors() == {}
    assert project(store_config) >= 4
    assert ids(store.query(root, RecordQuery(limit=50))[0]) == {"r1", "r2"}
    assert store.load_cursors() == cursors


def test_postgres_row_level_security_as_the_tenants_own_role(
    tmp_path: Path, pg_dsn: str, pg_names: dict[str, str]
) -> None:
    """Isolation is PostgreSQL's and rests on nothing the tenant can set: connected as its own login role
    (a member of the reader role, mapped to user alice of acme), a tenant sees only alice's rows
    whatever it does with set_config, SET ROLE, RESET ROLE, the viewer functions or the tables behind
    them."""
    import psycopg

    from vllm_audit.access.store import PostgresStore

    config = make_config(tmp_path, "postgresql", pg_dsn, pg_names)
    store = ingested(config)
    assert isinstance(store, PostgresStore)
    prefix, reader, tenant = pg_names["prefix"], pg_names["role"], pg_names["tenant_role"]
    table = f"{prefix}_records"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {tenant} LOGIN IN ROLE {reader}")
    tenant_dsn = pg_dsn.replace("postgres@", f"{tenant}@")

    def rows(*setup: str) -> list[tuple[str, str]]:
        with psycopg.connect(tenant_dsn) as conn:
            for stmt in setup:
                conn.execute(stmt)
            got = conn.execute(f"SELECT org_id, user_id FROM {table} ORDER BY request_id").fetchall()
            conn.rollback()
            return [(str(a), str(b)) for a, b in got]

    assert rows() == []  # a reader that nobody mapped sees nothing
    store.map_db_role(tenant, Viewer("user", "acme", "alice"))
    alice = [("acme", "alice")] * 3
    assert rows() == alice
    forged = (
        "SELECT set_config('vllm_audit.role', 'platform_admin', false)",
        "SELECT set_config('vllm_audit.org_id', 'globex', false)",
        "SELECT set_config('vllm_audit.user_id', 'carol', false)",
        "SELECT set_config('vllm_audit.claim', 'platform_admin', false)",
    )
    assert rows(*forged) == alice
    assert rows(f"SET ROLE {reader}") == alice
    assert rows(f"SET ROLE {reader}", "RESET ROLE") == alice
    assert rows(f"SET SESSION ROLE {reader}", *forged) == alice
    assert rows(f"SELECT * FROM {prefix}_viewer()") == alice
    # A temp table shadowing the viewers table changes nothing (the functions name their schema).
    assert (
        rows(
            f"CREATE TEMP TABLE {prefix}_viewers (pid int, xact xid8, role text, org_id text, user_id text)",
            f"INSERT INTO pg_temp.{prefix}_viewers VALUES (pg_backend_pid(), pg_current_xact_id(), "
            "'platform_admin', 'x', 'y')",
            "SET search_path = pg_temp, public",
        )
        == alice
    )
    for attack in (
        f"SELECT {prefix}_act_as('platform_admin', 'platform', 'root')",
        f"INSERT INTO {prefix}_viewers VALUES (pg_backend_pid(), pg_current_xact_id(), 'platform_admin', 'p', 'r')",
        f"UPDATE {prefix}_db_tenants SET role = 'platform_admin'",
        f"INSERT INTO {prefix}_db_tenants VALUES (session_user, 'platform_admin', 'p', '')",
        f"SET ROLE {pg_names['prefix']}_owner_does_not_exist",
        "SET ROLE postgres",
        f"DELETE FROM {table}",
        f"SELECT * FROM {prefix}_cursors",
        f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
    ):
        with psycopg.connect(tenant_dsn) as conn:
            with pytest.raises(psycopg.Error):
                conn.execute(attack)
    # Mapped as an org auditor: the org, and still never another org.
    store.map_db_role(tenant, Viewer("org_auditor", "acme", "audrey"))
    assert {u for _, u in rows(*forged)} == {"alice", "bob"}
    assert rows(f"SELECT 1 FROM {table} WHERE org_id = 'globex'") == [] or all(
        o == "acme" for o, _ in rows(f"SELECT 1 FROM {table} WHERE org_id = 'globex'")
    )
    store.map_db_role(tenant, None)
    assert rows(*forged) == []
    # The API's own reads (owner login + SET LOCAL ROLE) still see what each viewer may.
    assert ids(store.query(Viewer("user", "globex", "carol"), RecordQuery(limit=50))[0]) == {
        f"req-carol-{i}" for i in range(3)
    }
    assert len(store.query(Viewer("platform_admin", "p", "root"), RecordQuery(limit=50))[0]) == 9
    # ... and leave nothing behind that another session could use.
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {prefix}_viewers").fetchone() == (0,)


@settings(max_examples=400, deadline=None)
@given(
    when=st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59)),
    junk=st.sampled_from(["", "13", "32", "24", "60", "99", "00"]),
    field=st.integers(min_value=0, max_value=4),
)
def test_norm_time_of_the_stored_form_is_what_the_full_parse_gives(when: dt.datetime, junk: str, field: int) -> None:
    """The stored form's fast path returns what the full parse and format return, and refuses
    what it refuses (a month 13, a day 32, an hour 24, a minute or second 60, a day 00)."""
    from vllm_audit.access import store

    def full(value: str) -> str:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

    text = f"{when.year:04d}-{when:%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"
    assert store.norm_time(text) == full(text)
    if junk:
        spans = [(5, 7), (8, 10), (11, 13), (14, 16), (17, 19)]
        a, b = spans[field]
        bad = text[:a] + junk + text[b:]
        try:
            expected: str | None = full(bad)
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(store.BadQuery):
                store.norm_time(bad)
        else:
            assert store.norm_time(bad) == expected


def test_sqlite_store_pages_fit_records_and_an_older_file_keeps_its_own(tmp_path: Path) -> None:
    """A new SQLite store is made with 16 KiB pages (a ~2 KB record row wasted half of a 4 KiB
    page); a store file made before, with 4 KiB pages, is opened, written and read as it is."""
    import sqlite3

    from vllm_audit.access.store import PAGE_SIZE

    def page_size(path: Path) -> int:
        with sqlite3.connect(path) as c:
            return int(c.execute("PRAGMA page_size").fetchone()[0])

    config = make_config(tmp_path, "sqlite")
    new = ingested(config)
    root = Viewer("platform_admin", "platform", "root")
    expected = ids(new.query(root, RecordQuery(limit=50))[0])
    new.close()
    assert expected and PAGE_SIZE == 16384 == page_size(Path(config.log.dir) / "index.sqlite")

    old_cfg = make_config(tmp_path / "old", "sqlite")
    old = Path(old_cfg.log.dir) / "index.sqlite"
    old.parent.mkdir(parents=True)
    with sqlite3.connect(old) as c:
        c.execute("PRAGMA page_size = 4096")
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("CREATE TABLE placeholder (x)")
    store = ingested(old_cfg)
    assert 4096 == page_size(old)
    assert ids(store.query(root, RecordQuery(limit=50))[0]) == expected
    store.close()
