"""The query store: a projection of the local log that the audit API reads.

Two back ends with one SQL shape:

* SQLite (embedded default, ``<log dir>/index.sqlite``): tenant isolation is a ``WHERE`` clause
  added to every query from the caller's role.
* PostgreSQL (production): tenant isolation is enforced by the database with row-level security.
  The owner role creates the schema and ingests; the API reads as a non-owning reader role
  (``reader_dsn``, or ``SET LOCAL ROLE`` from the owner connection) and sets
  ``vllm_audit.role``, ``vllm_audit.org_id`` and ``vllm_audit.user_id`` with
  ``set_config(..., true)`` (transaction-local) before each query. No application ``WHERE``
  clause restricts tenants there: a reader transaction that has not set them sees nothing.

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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from vllm_audit.access.config import StoreConfig
from vllm_audit.errors import ConfigError

if TYPE_CHECKING:
    from vllm_audit.config import Config

Role = Literal["platform_admin", "org_auditor", "user"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")

#: Columns of the records table, in insert order.
COLUMNS = (
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
    prompt_sha256: str | None = None
    q: str | None = None
    limit: int = 50
    cursor: str | None = None


class BadQuery(ValueError):
    """A query parameter is invalid (the API answers 400 with this message)."""


# -- normalization ------------------------------------------------------------------------------


def norm_time(value: str) -> str:
    """ISO 8601 (date, or date-time with offset or Z) -> ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
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


def row_from_entry(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """The records-table row of one ``inference`` log entry."""
    rec: dict[str, Any] = dict(entry)
    nested = rec.get("record")
    if isinstance(nested, Mapping):  # tolerate a nested layout
        rec = {**rec, **nested}
    try:
        ts = norm_time(str(rec.get("timestamp", "")))
    except BadQuery:
        ts = "1970-01-01T00:00:00.000Z"
    search = (_text(rec.get("input_prompt")) + "\n" + _text(rec.get("output_response"))).lower()
    return (
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
        orjson.dumps(entry).decode(),
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

    def close(self) -> None:
        """Release resources (connections are per operation)."""

    # -- ingestion (owner) ----------------------------------------------------------------------

    def load_cursors(self) -> dict[str, int]:
        with self._owner() as conn:
            return {str(w): int(s) for w, s in self._exec(conn, f"SELECT writer_id, last_seq FROM {self.cursors}")}

    def ingest(self, writer_id: str, rows: Sequence[tuple[Any, ...]], last_seq: int) -> None:
        """Insert rows (idempotent) and advance the writer's cursor, in one transaction."""
        cols = ", ".join(COLUMNS)
        marks = ", ".join(["%s"] * len(COLUMNS))
        with self._owner() as conn:
            if rows:
                sql = self._sql(
                    f"INSERT INTO {self.records} ({cols}) VALUES ({marks}) ON CONFLICT (writer_id, seq) DO NOTHING"
                )
                conn.cursor().executemany(sql, [tuple(r) for r in rows])
            self._exec(
                conn,
                f"INSERT INTO {self.cursors} (writer_id, last_seq) VALUES (%s, %s) "
                f"ON CONFLICT (writer_id) DO UPDATE SET last_seq = "
                f"CASE WHEN excluded.last_seq > {self.cursors}.last_seq THEN excluded.last_seq "
                f"ELSE {self.cursors}.last_seq END",
                (writer_id, last_seq),
            )

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

    def get(self, viewer: Viewer, request_id: str) -> dict[str, Any] | None:
        """The newest record with this request id that the viewer may see."""
        recs, _ = self.query(viewer, RecordQuery(request_id=request_id, limit=1))
        return recs[0] if recs else None

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
            writer_id TEXT NOT NULL, seq BIGINT NOT NULL, request_id TEXT NOT NULL, ts TEXT NOT NULL,
            org_id TEXT NOT NULL, user_id TEXT NOT NULL, auth_status TEXT, model_name TEXT, route TEXT,
            method TEXT, http_status INTEGER, status TEXT, prompt_tokens BIGINT, completion_tokens BIGINT,
            total_tokens BIGINT, latency_ms DOUBLE PRECISION, prompt_sha256 TEXT, search_text TEXT NOT NULL,
            record {json_type} NOT NULL, PRIMARY KEY (writer_id, seq))""",
        f"CREATE TABLE IF NOT EXISTS {store.cursors} (writer_id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {r}_ts ON {r} (ts, writer_id, seq)",
        f"CREATE INDEX IF NOT EXISTS {r}_org_ts ON {r} (org_id, ts)",
        f"CREATE INDEX IF NOT EXISTS {r}_user_ts ON {r} (org_id, user_id, ts)",
        f"CREATE INDEX IF NOT EXISTS {r}_request_id ON {r} (request_id)",
        f"CREATE INDEX IF NOT EXISTS {r}_prompt_sha256 ON {r} (prompt_sha256)",
    ]


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
            conn.execute("PRAGMA journal_mode = WAL")
            for stmt in _schema(self, "TEXT"):
                conn.execute(stmt)
        finally:
            conn.close()

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
    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        if not cfg.dsn:
            raise ConfigError("[access.store] dsn is required when kind = 'postgresql'.")
        if not _IDENT.match(cfg.reader_role):
            raise ConfigError(f"[access.store] reader_role {cfg.reader_role!r} is not a plain identifier.")

    def init(self) -> None:
        """Create tables, the reader role (if missing), grants and the row-level security policy."""
        r, role = self.records, self.cfg.reader_role
        policy = f"{r}_tenant"
        with self._owner() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (r,))
            for stmt in _schema(self, "JSONB"):
                conn.execute(stmt)
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if not exists:
                conn.execute(f"CREATE ROLE {role} NOLOGIN")
            conn.execute(f"REVOKE ALL ON {r}, {self.cursors} FROM PUBLIC")
            conn.execute(f"GRANT SELECT ON {r} TO {role}")
            conn.execute(f"ALTER TABLE {r} ENABLE ROW LEVEL SECURITY")
            conn.execute(f"DROP POLICY IF EXISTS {policy} ON {r}")
            conn.execute(
                f"""CREATE POLICY {policy} ON {r} FOR SELECT TO {role} USING (
                    CASE current_setting('vllm_audit.role', true)
                      WHEN 'platform_admin' THEN true
                      WHEN 'org_auditor' THEN org_id = current_setting('vllm_audit.org_id', true)
                      WHEN 'user' THEN org_id = current_setting('vllm_audit.org_id', true)
                                   AND user_id = current_setting('vllm_audit.user_id', true)
                      ELSE false
                    END)"""
            )

    @contextlib.contextmanager
    def _owner(self) -> Iterator[Any]:
        import psycopg

        with psycopg.connect(self.cfg.dsn, autocommit=False) as conn, conn.transaction():
            yield conn

    @contextlib.contextmanager
    def _reader(self, viewer: Viewer) -> Iterator[Any]:
        import psycopg

        dsn = self.cfg.reader_dsn or self.cfg.dsn
        with psycopg.connect(dsn, autocommit=False) as conn, conn.transaction():
            if not self.cfg.reader_dsn:
                conn.execute(f"SET LOCAL ROLE {self.cfg.reader_role}")
            conn.execute(
                "SELECT set_config('vllm_audit.role', %s, true), set_config('vllm_audit.org_id', %s, true), "
                "set_config('vllm_audit.user_id', %s, true)",
                (viewer.role, viewer.org_id, viewer.user_id),
            )
            yield conn


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
