"""The console's reads of the query store, always as the signed-in viewer.

Every query runs on the store's *reader* connection for the viewer (``Store._reader(viewer)``):
on PostgreSQL that is the row-level-security role with the viewer declared by the store's
``act_as`` function, on SQLite the store's tenant clauses (``Store._scope(viewer)``) are added.
So what a page can show is decided by the store exactly as for the audit API; the console adds
filters and a sort order (and, on PostgreSQL, the viewer's own scope again as plain predicates,
for the planner's index choice only — row-level security enforces it regardless).

Paging is by key (no OFFSET): the cursor holds the last row's sort value and its
``(ts, writer_id, seq)`` tie-breakers.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import orjson

from vllm_audit.access.openapi import STATUSES
from vllm_audit.access.store import BadQuery, PostgresStore, Store, Viewer, norm_time

SortKey = Literal["ts", "latency_ms", "total_tokens", "http_status"]
SORT_KEYS: tuple[SortKey, ...] = ("ts", "latency_ms", "total_tokens", "http_status")
AUTH_STATUSES = ("authenticated", "anonymous", "failed", "trusted_header")
FILTERS = ("user_id", "org_id", "model", "route", "status", "auth_status", "request_id", "prompt_sha256")
_COLUMN = {"model": "model_name"}
#: A sort value standing in for NULL, below every real value (latency, tokens, status are >= 0).
_NULL = -1


@dataclasses.dataclass(frozen=True, slots=True)
class Search:
    """One search page request (already validated)."""

    since: str | None = None
    until: str | None = None
    filters: tuple[tuple[str, str], ...] = ()
    sort: SortKey = "ts"
    descending: bool = True
    limit: int = 50
    cursor: tuple[Any, str, str, int] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One search result row (the columns a results table shows)."""

    record_key: str
    ts: str
    user_id: str
    org_id: str
    model: str
    route: str
    status: str
    http_status: int | None
    total_tokens: int | None
    latency_ms: float | None
    request_id: str
    sort_value: Any
    writer_id: str
    seq: int


def encode_cursor(value: Any, ts: str, writer_id: str, seq: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([value, ts, writer_id, seq])).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[Any, str, str, int]:
    try:
        v, ts, wid, seq = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadQuery("invalid page cursor") from None
    if not (isinstance(ts, str) and isinstance(wid, str) and isinstance(seq, int)):
        raise BadQuery("invalid page cursor")
    if not (isinstance(v, str | int | float) and not isinstance(v, bool)):
        raise BadQuery("invalid page cursor")
    return v, ts, wid, seq


def parse_search(params: dict[str, str], *, max_limit: int = 500) -> Search:
    """Validate a search form's parameters (``BadQuery`` names the bad one)."""
    since = params.get("since") or None
    until = params.get("until") or None
    if since:
        since = norm_time(since)
    if until:
        until = norm_time(until)
    filters = []
    for name in FILTERS:
        v = (params.get(name) or "").strip()
        if not v:
            continue
        if len(v) > 256:
            raise BadQuery(f"{name} is too long")
        if name == "status" and v not in STATUSES:
            raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
        if name == "auth_status" and v not in AUTH_STATUSES:
            raise BadQuery(f"auth_status must be one of {', '.join(AUTH_STATUSES)}")
        if name == "prompt_sha256" and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise BadQuery("prompt hash must be 64 lowercase hex digits")
        filters.append((name, v))
    sort = params.get("sort") or "ts"
    if sort not in SORT_KEYS:
        raise BadQuery(f"sort must be one of {', '.join(SORT_KEYS)}")
    direction = params.get("dir") or "desc"
    if direction not in ("asc", "desc"):
        raise BadQuery("dir must be asc or desc")
    try:
        limit = int(params.get("limit") or 50)
    except ValueError:
        raise BadQuery("limit must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise BadQuery(f"limit must be between 1 and {max_limit}")
    cursor = decode_cursor(params["cursor"]) if params.get("cursor") else None
    key: SortKey = next(k for k in SORT_KEYS if k == sort)
    return Search(since, until, tuple(filters), key, direction == "desc", limit, cursor)


def _sort_expr(sort: SortKey) -> str:
    return "ts" if sort == "ts" else f"COALESCE({sort}, {_NULL})"


def _where(store: Store, viewer: Viewer, s: Search, *, paged: bool) -> tuple[list[str], list[Any]]:
    clauses, params = store._scope(viewer)  # SQLite's tenant clauses; [] where RLS enforces them
    if not clauses and viewer.role != "platform_admin":
        # The same scope as plain predicates, only so that PostgreSQL's planner can pick the
        # (org_id, user_id, ts) index: row-level security enforces the scope whatever they say.
        clauses.append("org_id = %s")
        params.append(viewer.org_id)
        if viewer.role == "user":
            clauses.append("user_id = %s")
            params.append(viewer.user_id)
    if s.since:
        clauses.append("ts >= %s")
        params.append(s.since)
    if s.until:
        clauses.append("ts < %s")
        params.append(s.until)
    for name, value in s.filters:
        clauses.append(f"{_COLUMN.get(name, name)} = %s")
        params.append(value)
    if paged and s.cursor is not None:
        op = "<" if s.descending else ">"
        v, ts, wid, seq = s.cursor
        if s.sort == "ts":
            clauses.append(f"(ts, writer_id, seq) {op} (%s, %s, %s)")
            params += [ts, wid, seq]
        else:
            clauses.append(f"({_sort_expr(s.sort)}, ts, writer_id, seq) {op} (%s, %s, %s, %s)")
            params += [v, ts, wid, seq]
    return clauses, params


def search(store: Store, viewer: Viewer, s: Search) -> tuple[list[Row], str | None]:
    """One page of rows and the cursor of the next page (None at the end)."""
    clauses, params = _where(store, viewer, s, paged=True)
    d = "DESC" if s.descending else "ASC"
    expr = _sort_expr(s.sort)
    order = f"ts {d}, writer_id {d}, seq {d}" if s.sort == "ts" else f"{expr} {d}, ts {d}, writer_id {d}, seq {d}"
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = (
        f"SELECT record_key, ts, user_id, org_id, model_name, route, status, http_status, total_tokens, "
        f"latency_ms, request_id, {expr}, writer_id, seq FROM {store.records}{where} ORDER BY {order} LIMIT %s"
    )
    with store._reader(viewer) as conn:
        raw = list(store._exec(conn, sql, [*params, s.limit + 1]))
    more = len(raw) > s.limit
    rows = [
        Row(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4] or ""),
            str(r[5] or ""),
            str(r[6] or ""),
            None if r[7] is None else int(r[7]),
            None if r[8] is None else int(r[8]),
            None if r[9] is None else float(r[9]),
            str(r[10] or ""),
            r[11],
            str(r[12]),
            int(r[13]),
        )
        for r in raw[: s.limit]
    ]
    nxt = None
    if more and rows:
        last = rows[-1]
        value = last.sort_value if s.sort != "ts" else 0
        nxt = encode_cursor(value, last.ts, last.writer_id, last.seq)
    return rows, nxt


@dataclasses.dataclass(frozen=True, slots=True)
class UsagePoint:
    """Totals of one day for one group value."""

    day: str
    group: str
    calls: int
    tokens: int
    latency_sum: float
    latency_n: int


def usage(store: Store, viewer: Viewer, group: str, since: str | None, until: str | None) -> list[UsagePoint]:
    """Calls, tokens and latency per day and per ``group`` (org_id, user_id or model), as the viewer."""
    col = {"org_id": "org_id", "user_id": "user_id", "model": "model_name"}[group]
    s = Search(since=since, until=until)
    clauses, params = _where(store, viewer, s, paged=False)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = (
        f"SELECT substr(ts, 1, 10) AS day, COALESCE({col}, '') AS g, COUNT(*), COALESCE(SUM(total_tokens), 0), "
        f"COALESCE(SUM(latency_ms), 0), COUNT(latency_ms) FROM {store.records}{where} GROUP BY 1, 2 ORDER BY 1, 2"
    )
    with store._reader(viewer) as conn:
        raw = list(store._exec(conn, sql, params))
    return [UsagePoint(str(r[0]), str(r[1]), int(r[2]), int(r[3]), float(r[4]), int(r[5])) for r in raw]


def keys_of(rows: Sequence[Row]) -> list[str]:
    return [r.record_key for r in rows]


def index_statements(store: Store) -> list[str]:
    """Indexes the console adds to the query store's records table (beside the store's own):
    one per sort order other than time, and a covering one for the usage aggregates."""
    r = store.records
    out = [
        f"CREATE INDEX IF NOT EXISTS {r}_c_{k} ON {r} ({_sort_expr(k)}, ts, writer_id, seq)"
        for k in SORT_KEYS
        if k != "ts"
    ]
    if isinstance(store, PostgresStore):
        out.append(
            f"CREATE INDEX IF NOT EXISTS {r}_c_usage ON {r} (ts) "
            "INCLUDE (org_id, user_id, model_name, total_tokens, latency_ms)"
        )
    else:
        out.append(
            f"CREATE INDEX IF NOT EXISTS {r}_c_usage ON {r} (ts, org_id, user_id, model_name, total_tokens, latency_ms)"
        )
    return out


def ensure_indexes(store: Store) -> None:
    """Create the console's indexes (idempotent; minutes on a large existing store, done once)."""
    store.init()
    for stmt in index_statements(store):
        with store._owner() as conn:
            store._exec(conn, stmt)
