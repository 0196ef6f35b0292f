"""The query store: a projection of the local log that the audit API reads.

Two back ends with one SQL shape:

* SQLite (embedded default, ``<log dir>/index.sqlite``): tenant isolation is a ``WHERE`` clause
  added to every query from the caller's role.
* PostgreSQL (production): tenant isolation is enforced by the database with row-level security,
  and it does not rest on anything a reader can set. The policy asks a ``SECURITY DEFINER``
  function, ``<prefix>_viewer()``, whose eyes the current query runs with; the function answers
  from two owner-only tables:

  - ``<prefix>_viewers``: one row per audit API transaction, inserted by ``<prefix>_act_as(...)``
    (executable only by the owner and the API's login role) for *this* backend and *this*
    transaction id. The API always rolls its read transactions back, so the row never becomes
    visible to anyone else;
  - ``<prefix>_db_tenants``: raw-SQL tenants, mapped by their *login* role (``session_user``,
    which ``SET ROLE`` cannot change) to a role, org and user (:meth:`PostgresStore.map_db_role`).

  ``set_config`` of any setting, ``SET ROLE`` / ``RESET ROLE`` and calling functions do not
  widen what a member of the reader role sees.

The records table is keyed by ``record_key``: the record's server-generated ``record_id`` (UUIDv7),
or ``<writer_id>:<seq>`` for records written before it existed. ``request_id`` (chosen by clients,
so not unique) is a searchable column. Per-writer cursors ``(next_seq, last_leaf)`` live in the
same database and are committed in the same transaction as the rows
(:class:`vllm_audit.access.projection.QueryStoreProjection`).

Timestamps are stored as normalized ISO 8601 text (``YYYY-MM-DDTHH:MM:SS.mmmZ``), which sorts
chronologically in both back ends. Every store method is synchronous; the API calls them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from vllm_audit.access.config import StoreConfig
from vllm_audit.errors import ConfigError
from vllm_audit.integrity.reader import Cursor

if TYPE_CHECKING:
    from vllm_audit.config import Config

Role = Literal["platform_admin", "org_auditor", "user"]
ROLES: tuple[Role, ...] = ("platform_admin", "org_auditor", "user")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")

#: Columns of the records table, in insert order.
COLUMNS = (
    "record_key",
    "record_id",
    "writer_id",
    "seq",
    "request_id",
    "ts",
    "org_id",
    "user_id",
    "auth_status",
    "model_name",
    "route",
    "method",
    "http_status",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms",
    "prompt_sha256",
    "search_text",
    "record",
)

USAGE_GROUPS = ("day", "org_id", "user_id", "model")

#: SQLite page size of a new query store (bytes).
PAGE_SIZE = 16384

#: Most records a single-record lookup (``/records/{id}``) returns.
FIND_MAX = 50


@dataclasses.dataclass(frozen=True, slots=True)
class Viewer:
    """Whose eyes a query runs with."""

    role: Role
    org_id: str
    user_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class RecordQuery:
    since: str | None = None
    until: str | None = None
    user_id: str | None = None
    org_id: str | None = None
    model: str | None = None
    status: str | None = None
    route: str | None = None
    request_id: str | None = None
    record_id: str | None = None
    prompt_sha256: str | None = None
    q: str | None = None
    limit: int = 50
    cursor: str | None = None


class BadQuery(ValueError):
    """A query parameter is invalid (the API answers 400 with this message)."""


# -- normalization ------------------------------------------------------------------------------


#: The stored form itself (what the writer writes), for years 1000-9999.
_STORED_TIME = re.compile(r"[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def norm_time(value: str) -> str:
    """ISO 8601 (date, or date-time with offset or Z) -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    if _STORED_TIME.fullmatch(value):
        # Already in the stored form (every record's timestamp): only check that it is a real
        # date and time, a fifth of the full parse and format below, which returns it unchanged.
        try:
            dt.datetime.fromisoformat(value[:-1])
        except ValueError:
            raise BadQuery(f"not an ISO 8601 time: {value!r}") from None
        return value
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadQuery(f"not an ISO 8601 time: {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return orjson.dumps(v).decode()


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else (None if v is None else str(v))


def record_key(rec: Mapping[str, Any]) -> str:
    """The store's key of a record: its ``record_id``, or ``<writer_id>:<seq>`` for older records."""
    rid = rec.get("record_id")
    if isinstance(rid, str) and rid:
        return rid
    return f"{rec['writer_id']}:{int(rec['seq'])}"


def row_from_entry(entry: Mapping[str, Any], line: bytes | None = None) -> tuple[Any, ...]:
    """The records-table row of one ``inference`` log entry (as parsed from its stored line).

    ``line``: the stored line ``entry`` was parsed from; its bytes are stored as the ``record``
    column instead of encoding ``entry`` again (it is the same JSON object).
    """
    rec = entry
    try:
        ts = norm_time(str(rec.get("timestamp", "")))
    except BadQuery:
        ts = "1970-01-01T00:00:00.000Z"
    search = (_text(rec.get("input_prompt")) + "\n" + _text(rec.get("output_response"))).lower()
    rid = rec.get("record_id")
    return (
        record_key(rec),
        rid if isinstance(rid, str) and rid else None,
        str(rec["writer_id"]),
        int(rec["seq"]),
        _str(rec.get("request_id")) or "",
        ts,
        _str(rec.get("org_id")) or "unknown",
        _str(rec.get("user_id")) or "anonymous",
        _str(rec.get("auth_status")),
        _str(rec.get("model_name")),
        _str(rec.get("route")),
        _str(rec.get("method")),
        _int(rec.get("http_status")),
        _str(rec.get("status")),
        _int(rec.get("prompt_tokens")),
        _int(rec.get("completion_tokens")),
        _int(rec.get("total_tokens")),
        _num(rec.get("latency_ms")),
        _str(rec.get("prompt_sha256")),
        search,
        line.decode() if line is not None else orjson.dumps(entry).decode(),
    )


def encode_cursor(ts: str, writer_id: str, seq: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts, writer_id, seq])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, wid, seq = orjson.loads(raw)
        if isinstance(ts, str) and isinstance(wid, str) and isinstance(seq, int):
            return ts, wid, seq
    except (ValueError, TypeError, orjson.JSONDecodeError):
        pass
    raise BadQuery("invalid cursor")


def _like(q: str) -> str:
    return "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# -- the store ----------------------------------------------------------------------------------


class Store:
    """Common SQL; subclasses provide connections, placeholders and tenant scoping."""

    records: str
    cursors: str

    def __init__(self, cfg: StoreConfig) -> None:
        if not _IDENT.match(cfg.table_prefix):
            raise ConfigError(f"[access.store] table_prefix {cfg.table_prefix!r} is not a plain identifier.")
        self.cfg = cfg
        self.records = f"{cfg.table_prefix}_records"
        self.cursors = f"{cfg.table_prefix}_cursors"
        self._kept = threading.local()

    # subclass hooks
    def init(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _owner(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def _reader(self, viewer: Viewer) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _scope(self, viewer: Viewer) -> tuple[list[str], list[Any]]:
        """Application-level tenant clauses (none where the database enforces them)."""
        return [], []

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self._sql(sql), tuple(params))

    def _connect_owner(self) -> Any:
        """A new owner connection for :meth:`_batch` (kept across batches)."""
        raise NotImplementedError

    def _begin(self, conn: Any) -> None:
        """Start a write transaction on a kept owner connection."""

    def _commit(self, conn: Any) -> None:
        conn.commit()

    @contextlib.contextmanager
    def _batch(self) -> Iterator[Any]:
        """One write transaction on this thread's kept owner connection (the projection's batches).

        Opening a connection per batch cost more than the batch (SQLite checkpoints its WAL when
        the last connection closes; PostgreSQL authenticates). The connection is dropped on any
        error, so the next batch starts on a fresh one.
        """
        conn = getattr(self._kept, "conn", None)
        if conn is None:
            conn = self._kept.conn = self._connect_owner()
        try:
            self._begin(conn)
            yield conn
            self._commit(conn)
        except BaseException:
            self._kept.conn = None
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def close(self) -> None:
        """Close this thread's kept projection connection (other operations open their own)."""
        conn = getattr(self._kept, "conn", None)
        self._kept.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- the projection's side (owner) ------------------------------------------------------------

    def load_cursors(self) -> dict[str, Cursor]:
        """Committed per-writer positions: entries before ``next_seq`` are in the store."""
        with self._owner() as conn:
            rows = self._exec(conn, f"SELECT writer_id, next_seq, last_leaf FROM {self.cursors}")
            return {str(w): Cursor(str(w), int(s), str(leaf)) for w, s, leaf in rows}

    def apply(self, rows: Sequence[tuple[Any, ...]], cursor: Cursor) -> list[int]:
        """Insert ``rows`` and move the writer's cursor to ``cursor``, in ONE transaction.

        Idempotent: a row already present for the same ``(writer_id, seq)`` is skipped. Returns the
        seqs of rows *not* inserted because their ``record_key`` is held by another entry (a
        reused record id: the caller quarantines them). The cursor only moves forward.
        """
        cols = ", ".join(COLUMNS)
        marks = ", ".join(["%s"] * len(COLUMNS))
        clashes: list[int] = []
        with self._batch() as conn:
            if rows:
                keys = [r[0] for r in rows]
                taken: dict[str, tuple[str, int]] = {}
                for i in range(0, len(keys), 500):
                    part = keys[i : i + 500]
                    marks_in = ", ".join(["%s"] * len(part))
                    q = f"SELECT record_key, writer_id, seq FROM {self.records} WHERE record_key IN ({marks_in})"
                    for k, w, s in self._exec(conn, q, part):
                        taken[str(k)] = (str(w), int(s))
                fresh = []
                seen: dict[str, tuple[str, int]] = {}
                for r in rows:
                    pos = (str(r[2]), int(r[3]))
                    owner = taken.get(r[0]) or seen.get(r[0])
                    if owner is None:
                        seen[r[0]] = pos
                        fresh.append(tuple(r))
                    elif owner != pos:
                        clashes.append(pos[1])
                if fresh:
                    sql = self._sql(f"INSERT INTO {self.records} ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING")
                    conn.cursor().executemany(sql, fresh)
            self._exec(
                conn,
                f"INSERT INTO {self.cursors} (writer_id, next_seq, last_leaf) VALUES (%s, %s, %s) "
                f"ON CONFLICT (writer_id) DO UPDATE SET next_seq = excluded.next_seq, last_leaf = excluded.last_leaf "
                f"WHERE excluded.next_seq > {self.cursors}.next_seq",
                (cursor.writer_id, cursor.next_seq, cursor.last_leaf),
            )
        return clashes

    def reset(self) -> None:
        """Forget everything (``vllm-audit index --rebuild``): the log is the source of truth."""
        with self._owner() as conn:
            self._exec(conn, f"DELETE FROM {self.records}")
            self._exec(conn, f"DELETE FROM {self.cursors}")

    # -- reading (as a viewer) ------------------------------------------------------------------

    def _where(self, viewer: Viewer, q: RecordQuery) -> tuple[str, list[Any]]:
        clauses, params = self._scope(viewer)
        if q.since:
            clauses.append("ts >= %s")
            params.append(norm_time(q.since))
        if q.until:
            clauses.append("ts < %s")
            params.append(norm_time(q.until))
        for col, val in (
            ("user_id", q.user_id),
            ("org_id", q.org_id),
            ("model_name", q.model),
            ("status", q.status),
            ("route", q.route),
            ("request_id", q.request_id),
            ("record_id", q.record_id),
            ("prompt_sha256", q.prompt_sha256),
        ):
            if val is not None:
                clauses.append(f"{col} = %s")
                params.append(val)
        if q.q:
            clauses.append("search_text LIKE %s ESCAPE '\\'")
            params.append(_like(q.q))
        if q.cursor:
            ts, wid, seq = decode_cursor(q.cursor)
            clauses.append("(ts < %s OR (ts = %s AND (writer_id < %s OR (writer_id = %s AND seq < %s))))")
            params += [ts, ts, wid, wid, seq]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def query(self, viewer: Viewer, q: RecordQuery) -> tuple[list[dict[str, Any]], str | None]:
        """One page of records, newest first, and the cursor of the next page (or None)."""
        where, params = self._where(viewer, q)
        sql = (
            f"SELECT ts, writer_id, seq, record FROM {self.records}{where} "
            f"ORDER BY ts DESC, writer_id DESC, seq DESC LIMIT %s"
        )
        with self._reader(viewer) as conn:
            rows = list(self._exec(conn, sql, [*params, q.limit + 1]))
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        out = [_load(r[3]) for r in rows]
        nxt = encode_cursor(rows[-1][0], rows[-1][1], int(rows[-1][2])) if more and rows else None
        return out, nxt

    def find(self, viewer: Viewer, ident: str) -> list[dict[str, Any]]:
        """The records the viewer may see whose ``record_id``, store key or ``request_id`` is ``ident``.

        A record id (or ``<writer>:<seq>`` key) names one record; a request id, chosen by clients,
        may name several (newest first, at most :data:`FIND_MAX`) — never one the viewer may not see.
        """
        clauses, params = self._scope(viewer)
        clauses.append("(record_key = %s OR record_id = %s OR request_id = %s)")
        params += [ident, ident, ident]
        sql = (
            f"SELECT record_key, request_id, record FROM {self.records} WHERE {' AND '.join(clauses)} "
            f"ORDER BY ts DESC, writer_id DESC, seq DESC LIMIT %s"
        )
        with self._reader(viewer) as conn:
            rows = list(self._exec(conn, sql, [*params, FIND_MAX]))
        exact = [r for r in rows if r[0] == ident]
        return [_load(r[2]) for r in (exact or rows)]

    def usage(self, viewer: Viewer, q: RecordQuery, group_by: Sequence[str]) -> list[dict[str, Any]]:
        exprs = {"day": "substr(ts, 1, 10)", "org_id": "org_id", "user_id": "user_id", "model": "model_name"}
        keys = [g for g in USAGE_GROUPS if g in group_by]
        where, params = self._where(viewer, dataclasses.replace(q, cursor=None))
        sel = [f"{exprs[k]} AS {k}" for k in keys]
        agg = (
            "COUNT(*) AS calls, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(completion_tokens), 0) AS completion_tokens, COALESCE(SUM(total_tokens), 0) AS total_tokens, "
            "SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END) AS errors"
        )
        sql = f"SELECT {', '.join([*sel, agg])} FROM {self.records}{where}"
        if keys:
            grp = ", ".join(str(i + 1) for i in range(len(keys)))
            sql += f" GROUP BY {grp} ORDER BY {grp}"
        with self._reader(viewer) as conn:
            rows = list(self._exec(conn, sql, params))
        names = [*keys, "calls", "prompt_tokens", "completion_tokens", "total_tokens", "errors"]
        return [{n: (int(v) if n in names[len(keys) :] else v) for n, v in zip(names, r, strict=True)} for r in rows]


def _load(v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    out = orjson.loads(v)
    assert isinstance(out, dict)
    return out


def _schema(store: Store, json_type: str) -> list[str]:
    r = store.records
    return [
        f"""CREATE TABLE IF NOT EXISTS {r} (
            record_key TEXT PRIMARY KEY, record_id TEXT,
            writer_id TEXT NOT NULL, seq BIGINT NOT NULL, request_id TEXT NOT NULL, ts TEXT NOT NULL,
            org_id TEXT NOT NULL, user_id TEXT NOT NULL, auth_status TEXT, model_name TEXT, route TEXT,
            method TEXT, http_status INTEGER, status TEXT, prompt_tokens BIGINT, completion_tokens BIGINT,
            total_tokens BIGINT, latency_ms DOUBLE PRECISION, prompt_sha256 TEXT, search_text TEXT NOT NULL,
            record {json_type} NOT NULL, UNIQUE (writer_id, seq))""",
        f"""CREATE TABLE IF NOT EXISTS {store.cursors} (
            writer_id TEXT PRIMARY KEY, next_seq BIGINT NOT NULL, last_leaf TEXT NOT NULL)""",
        f"CREATE INDEX IF NOT EXISTS {r}_ts ON {r} (ts, writer_id, seq)",
        f"CREATE INDEX IF NOT EXISTS {r}_org_ts ON {r} (org_id, ts)",
        f"CREATE INDEX IF NOT EXISTS {r}_user_ts ON {r} (org_id, user_id, ts)",
        f"CREATE INDEX IF NOT EXISTS {r}_request_id ON {r} (request_id)",
        f"CREATE INDEX IF NOT EXISTS {r}_record_id ON {r} (record_id)",
        f"CREATE INDEX IF NOT EXISTS {r}_prompt_sha256 ON {r} (prompt_sha256)",
    ]


def _outdated(columns: set[str], table: str, records: str) -> bool:
    """Whether an existing table predates this layout (then the projection is dropped and rebuilt)."""
    if not columns:
        return False
    if table == records:
        return "record_key" not in columns
    return "next_seq" not in columns or "last_leaf" not in columns


class SqliteStore(Store):
    def __init__(self, cfg: StoreConfig, path: Path) -> None:
        super().__init__(cfg)
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def init(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            # Before the first table exists (an existing file keeps its page size): a record row is
            # ~2 KB, so a 4 KiB page held one and wasted the rest; with 16 KiB pages the same
            # records take ~40 % less space and a batch commit writes ~60 % fewer WAL bytes.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            for table in (self.records, self.cursors):
                cols = {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
                if _outdated(cols, table, self.records):  # an older layout: rebuilt from the log
                    conn.execute(f"DROP TABLE {self.records}")
                    conn.execute(f"DROP TABLE IF EXISTS {self.cursors}")
                    break
            for stmt in _schema(self, "TEXT"):
                conn.execute(stmt)
        finally:
            conn.close()

    def _connect_owner(self) -> Any:
        conn = self._connect()
        # A projection: a commit lost to a power cut takes its cursor with it, and the rows are
        # projected again from the log. WAL with NORMAL stays consistent; it skips an fsync per batch.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _owner(self) -> Iterator[Any]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    @contextlib.contextmanager
    def _reader(self, viewer: Viewer) -> Iterator[Any]:
        conn = self._connect()
        try:
            conn.execute("PRAGMA query_only = ON")
            yield conn
        finally:
            conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?")

    def _scope(self, viewer: Viewer) -> tuple[list[str], list[Any]]:
        if viewer.role == "platform_admin":
            return [], []
        if viewer.role == "org_auditor":
            return ["org_id = %s"], [viewer.org_id]
        return ["org_id = %s", "user_id = %s"], [viewer.org_id, viewer.user_id]


class PostgresStore(Store):
    """PostgreSQL with row-level security that a reader cannot talk its way around (module docstring)."""

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        if not cfg.dsn:
            raise ConfigError("[access.store] dsn is required when kind = 'postgresql'.")
        if not _IDENT.match(cfg.reader_role):
            raise ConfigError(f"[access.store] reader_role {cfg.reader_role!r} is not a plain identifier.")
        p = cfg.table_prefix
        self.viewers = f"{p}_viewers"
        self.db_tenants = f"{p}_db_tenants"
        self.viewer_fn = f"{p}_viewer"
        self.act_as_fn = f"{p}_act_as"

    def init(self) -> None:
        """Create tables, the reader role (NOLOGIN, if missing), grants, the viewer functions and the policy.

        Needs, as the owner (``dsn``): ``CREATE`` on the schema, ownership of the tables it made,
        and ``CREATEROLE`` unless the reader role exists already. With ``reader_dsn`` it connects
        once with it to learn the API's login role, which alone (with the owner) may call
        ``<prefix>_act_as``.
        """
        r, role = self.records, self.cfg.reader_role
        api_login = self._reader_login() if self.cfg.reader_dsn else None
        policy = f"{r}_tenant"
        with self._owner() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (r,))
            schema_row = conn.execute("SELECT quote_ident(current_schema())").fetchone()
            assert schema_row is not None
            schema = str(schema_row[0])
            for table in (r, self.cursors):
                cols = {
                    str(c[0])
                    for c in conn.execute(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = %s",
                        (table,),
                    )
                }
                if _outdated(cols, table, r):  # an older layout: rebuilt from the log
                    conn.execute(f"DROP TABLE IF EXISTS {r}, {self.cursors}")
                    break
            for stmt in _schema(self, "JSONB"):
                conn.execute(stmt)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.viewers} (pid INTEGER NOT NULL, xact XID8 NOT NULL, "
                f"role TEXT NOT NULL, org_id TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (pid, xact))"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.db_tenants} (rolname TEXT PRIMARY KEY, "
                f"role TEXT NOT NULL CHECK (role IN ('platform_admin', 'org_auditor', 'user')), "
                f"org_id TEXT NOT NULL, user_id TEXT NOT NULL DEFAULT '')"
            )
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if not exists:
                conn.execute(f"CREATE ROLE {role} NOLOGIN")
            conn.execute(f"REVOKE ALL ON {r}, {self.cursors}, {self.viewers}, {self.db_tenants} FROM PUBLIC")
            conn.execute(f"GRANT SELECT ON {r} TO {role}")
            conn.execute(
                f"""CREATE OR REPLACE FUNCTION {schema}.{self.viewer_fn}()
                RETURNS TABLE (role TEXT, org_id TEXT, user_id TEXT)
                LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
                  (SELECT v.role, v.org_id, v.user_id FROM {schema}.{self.viewers} v
                    WHERE v.pid = pg_backend_pid() AND v.xact = pg_current_xact_id_if_assigned()
                   UNION ALL
                   SELECT t.role, t.org_id, t.user_id FROM {schema}.{self.db_tenants} t
                    WHERE t.rolname = session_user::text)
                  LIMIT 1
                $fn$"""
            )
            conn.execute(
                f"""CREATE OR REPLACE FUNCTION {schema}.{self.act_as_fn}(v_role TEXT, v_org TEXT, v_user TEXT)
                RETURNS void LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
                  INSERT INTO {schema}.{self.viewers} (pid, xact, role, org_id, user_id)
                  VALUES (pg_backend_pid(), pg_current_xact_id(), v_role, v_org, v_user)
                  ON CONFLICT (pid, xact) DO UPDATE SET role = excluded.role, org_id = excluded.org_id,
                    user_id = excluded.user_id
                $fn$"""
            )
            conn.execute(f"REVOKE ALL ON FUNCTION {schema}.{self.viewer_fn}() FROM PUBLIC")
            conn.execute(f"REVOKE ALL ON FUNCTION {schema}.{self.act_as_fn}(TEXT, TEXT, TEXT) FROM PUBLIC")
            conn.execute(f"GRANT EXECUTE ON FUNCTION {schema}.{self.viewer_fn}() TO {role}")
            if api_login is not None:
                conn.execute(
                    f"GRANT EXECUTE ON FUNCTION {schema}.{self.act_as_fn}(TEXT, TEXT, TEXT) TO {api_login}"
                )
            conn.execute(f"ALTER TABLE {r} ENABLE ROW LEVEL SECURITY")
            conn.execute(f"DROP POLICY IF EXISTS {policy} ON {r}")
            v = f"{schema}.{self.viewer_fn}()"
            # Uncorrelated sub-selects: evaluated once per query (init plans), not per row.
            conn.execute(
                f"""CREATE POLICY {policy} ON {r} FOR SELECT TO {role} USING (
                    CASE (SELECT role FROM {v})
                      WHEN 'platform_admin' THEN true
                      WHEN 'org_auditor' THEN org_id = (SELECT org_id FROM {v})
                      WHEN 'user' THEN org_id = (SELECT org_id FROM {v}) AND user_id = (SELECT user_id FROM {v})
                      ELSE false
                    END)"""
            )

    def _reader_login(self) -> str:
        import psycopg

        with psycopg.connect(self.cfg.reader_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT quote_ident(session_user::text)").fetchone()
        assert row is not None
        return str(row[0])

    def map_db_role(self, rolname: str, viewer: Viewer | None) -> None:
        """Confine a raw-SQL login role (a member of the reader role) to ``viewer``'s scope; None unmaps.

        The mapping is by login role (``session_user``), which ``SET ROLE`` cannot change.
        """
        with self._owner() as conn:
            conn.execute(f"DELETE FROM {self.db_tenants} WHERE rolname = %s", (rolname,))
            if viewer is not None:
                conn.execute(
                    f"INSERT INTO {self.db_tenants} (rolname, role, org_id, user_id) VALUES (%s, %s, %s, %s)",
                    (rolname, viewer.role, viewer.org_id, viewer.user_id),
                )

    def _connect_owner(self) -> Any:
        import psycopg

        return psycopg.connect(self.cfg.dsn, autocommit=False)

    @contextlib.contextmanager
    def _owner(self) -> Iterator[Any]:
        import psycopg

        with psycopg.connect(self.cfg.dsn, autocommit=False) as conn, conn.transaction():
            yield conn

    @contextlib.contextmanager
    def _reader(self, viewer: Viewer) -> Iterator[Any]:
        import psycopg

        dsn = self.cfg.reader_dsn or self.cfg.dsn
        with psycopg.connect(dsn, autocommit=False) as conn:
            try:
                conn.execute(
                    f"SELECT {self.act_as_fn}(%s, %s, %s)", (viewer.role, viewer.org_id, viewer.user_id)
                )
                if not self.cfg.reader_dsn:
                    conn.execute(f"SET LOCAL ROLE {self.cfg.reader_role}")
                yield conn
            finally:
                # Never commit: the viewer row must not outlive this transaction.
                conn.rollback()


def open_store(config: Config) -> Store:
    """The configured store (schema not yet created: call ``init()``)."""
    cfg = config.access.store
    if cfg.kind == "postgresql":
        return PostgresStore(cfg)
    if cfg.path:
        path = Path(cfg.path)
        if not path.is_absolute() and config.source:
            path = Path(config.source).resolve().parent / path
    else:
        path = Path(config.log.dir) / "index.sqlite"  # next to the log, as the writer opens it
    return SqliteStore(cfg, path)
