"""The central PostgreSQL store: the query store's records table plus the collector's chain state.

The records table, its indexes, the reader role and the row-level-security policy are the query
store's own (:class:`vllm_audit.access.store.PostgresStore`, rows made by
:func:`~vllm_audit.access.store.row_from_entry`), so the audit API and raw-SQL tenants read the
central store exactly as they read a replica's. Two tables are the collector's:

* ``<prefix>_collect_chains``: one row per writer — next expected seq, last leaf hash, the
  compact range (concatenated 32-byte hashes), the last verified signed checkpoint, whether the
  writer stopped cleanly, why it is broken (if it is), an open hole (seen since when);
* ``<prefix>_collect_alerts``: gaps, forks, bad signatures (unique per writer, kind and seq).

One transaction per fetched batch: lock the batch's writers' chain rows (``FOR UPDATE``, in
writer-id order, so concurrent collectors serialise per writer and never deadlock), insert the
rows (copied straight in; through ``ON CONFLICT DO NOTHING`` when one is there already: a row keyed
by its record id / ``(writer_id, seq)`` exists once), update the chain rows, add the alerts,
commit. Only then are the messages acknowledged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vllm_audit.access.config import StoreConfig
from vllm_audit.access.store import COLUMNS, PostgresStore
from vllm_audit.collect.verifier import ChainState
from vllm_audit.errors import ConfigError

if TYPE_CHECKING:
    import psycopg


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """A problem with a writer's chain, stored and appended to the collector's own chain."""

    writer_id: str
    kind: str  # gap, fork, bad_signature, modified, malformed
    first_seq: int
    last_seq: int
    message: str

    def record(self) -> dict[str, Any]:
        """The ``alert`` entry appended to the collector's own chain."""
        return {
            "record_type": "alert",
            "rule": f"collect.{self.kind}",
            "severity": "high",
            "message": self.message,
            "target_writer_id": self.writer_id,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }


@dataclasses.dataclass(slots=True)
class Hole:
    """Entries of a writer arrived ahead of ``next_seq`` (first seen at ``since``)."""

    ahead: int
    since: float


class CentralStore:
    """The collector's side of the central PostgreSQL store (one connection, one thread)."""

    def __init__(self, cfg: StoreConfig, *, timeout_s: float = 0.0) -> None:
        if cfg.kind != "postgresql":
            raise ConfigError("[collect] needs [access.store] kind = 'postgresql' (the central store).")
        self.pg = PostgresStore(cfg)
        self.cfg = cfg
        p = cfg.table_prefix
        self.records = self.pg.records
        self.chains = f"{p}_collect_chains"
        self.alerts = f"{p}_collect_alerts"
        self.timeout_s = timeout_s
        self._conn: psycopg.Connection[Any] | None = None

    def init(self) -> None:
        """Create the query store's schema (tables, role, RLS policy) and the collector's tables."""
        self.pg.init()
        conn = self.connect()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.chains,))
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {self.chains} (
                writer_id TEXT PRIMARY KEY, next_seq BIGINT NOT NULL DEFAULT 0,
                last_leaf TEXT NOT NULL DEFAULT '{"0" * 64}', tree BYTEA DEFAULT '\\x'::bytea,
                signed_size BIGINT NOT NULL DEFAULT 0, signed_at TEXT NOT NULL DEFAULT '',
                last_time TEXT NOT NULL DEFAULT '', stopped BOOLEAN NOT NULL DEFAULT false,
                broken TEXT NOT NULL DEFAULT '', received BIGINT NOT NULL DEFAULT 0,
                hole_ahead BIGINT, hole_since DOUBLE PRECISION,
                updated_at DOUBLE PRECISION NOT NULL DEFAULT 0)"""
            )
            # Added after the first release of the table.
            conn.execute(f"ALTER TABLE {self.chains} ADD COLUMN IF NOT EXISTS first_leaf TEXT NOT NULL DEFAULT ''")
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {self.alerts} (
                writer_id TEXT NOT NULL, kind TEXT NOT NULL, first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL,
                message TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (writer_id, kind, first_seq))"""
            )
            conn.execute(f"REVOKE ALL ON {self.chains}, {self.alerts} FROM PUBLIC")

    def connect(self) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        if self._conn is None or self._conn.closed:
            extra: dict[str, Any] = {}
            t = self.timeout_s
            if t > 0:
                # A peer that stops answering (a partition) is noticed within ``t`` on this side ...
                given = conninfo_to_dict(self.cfg.dsn)
                for k, v in (
                    ("tcp_user_timeout", int(t * 1000)),
                    ("keepalives", 1),
                    ("keepalives_idle", max(1, int(t / 3))),
                    ("keepalives_interval", max(1, int(t / 6))),
                    ("keepalives_count", 3),
                ):
                    if k not in given:
                        extra[k] = v
            conn = psycopg.connect(self.cfg.dsn, autocommit=True, **extra)
            if t > 0:
                # ... and on the server's, which ends the session and releases its row locks.
                ms = int(t * 1000)
                conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
                conn.execute(f"SET tcp_user_timeout = {ms}")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        conn = self.connect()
        try:
            with conn.transaction():
                yield Tx(self, conn)
        except BaseException:
            if conn.closed or conn.broken:
                self._conn = None
            raise

    # -- reading (status, tests) ------------------------------------------------------------------

    def states(self) -> dict[str, tuple[ChainState, Hole | None]]:
        conn = self.connect()
        rows = conn.execute(f"SELECT {_STATE_COLS} FROM {self.chains} ORDER BY writer_id").fetchall()
        return {str(r[0]): _state(r) for r in rows}

    def alert_rows(self) -> list[Alert]:
        conn = self.connect()
        rows = conn.execute(
            f"SELECT writer_id, kind, first_seq, last_seq, message FROM {self.alerts} ORDER BY at, writer_id"
        ).fetchall()
        return [Alert(str(w), str(k), int(a), int(b), str(m)) for w, k, a, b, m in rows]


_STATE_COLS = (
    "writer_id, next_seq, last_leaf, tree, signed_size, signed_at, last_time, stopped, broken, received, "
    "hole_ahead, hole_since, first_leaf"
)


def _state(r: Sequence[Any]) -> tuple[ChainState, Hole | None]:
    wid, next_seq, last_leaf, tree, signed_size, signed_at, last_time, stopped, broken, received, ha, hs, first = r
    st = ChainState(
        str(wid),
        int(next_seq),
        str(last_leaf),
        ChainState.tree_from(int(next_seq), bytes(tree) if tree is not None else None),
        int(signed_size),
        str(signed_at),
        str(last_time),
        bool(stopped),
        str(broken),
        int(received),
        str(first),
    )
    hole = Hole(int(ha), float(hs)) if ha is not None and hs is not None else None
    return st, hole


class Tx:
    """One batch's transaction (see the module docstring)."""

    def __init__(self, store: CentralStore, conn: psycopg.Connection[Any]) -> None:
        self.store = store
        self.conn = conn

    def lock(self, writer_ids: Sequence[str]) -> dict[str, tuple[ChainState, Hole | None]]:
        """The chain rows of ``writer_ids``, created when new, locked until commit."""
        s = self.store
        ids = sorted(set(writer_ids))
        self.conn.execute(
            f"INSERT INTO {s.chains} (writer_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (ids,)
        )
        rows = self.conn.execute(
            f"SELECT {_STATE_COLS} FROM {s.chains} WHERE writer_id = ANY(%s) ORDER BY writer_id FOR UPDATE", (ids,)
        ).fetchall()
        return {str(r[0]): _state(r) for r in rows}

    def insert_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert records-table rows, skipping any already present; returns how many were new.

        The rows are the entries past each writer's ``next_seq``, taken under its row lock, so
        normally none is in the table yet: they are copied straight in, inside a savepoint. When
        one is there after all (the same record id stored by another path), the savepoint is
        rolled back and the batch goes through a temporary table and ``INSERT … ON CONFLICT DO
        NOTHING`` instead."""
        import psycopg

        if not rows:
            return 0
        s = self.store
        cols = ", ".join(COLUMNS)
        try:
            with self.conn.transaction(), self.conn.cursor().copy(f"COPY {s.records} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return len(rows)
        except psycopg.errors.UniqueViolation:
            pass
        tmp = f"{s.records}_incoming"
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {tmp} (LIKE {s.records} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with self.conn.cursor().copy(f"COPY {tmp} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur = self.conn.execute(f"INSERT INTO {s.records} ({cols}) SELECT {cols} FROM {tmp} ON CONFLICT DO NOTHING")
        return cur.rowcount

    def save(self, state: ChainState, hole: Hole | None) -> None:
        s = self.store
        self.conn.execute(
            f"""UPDATE {s.chains} SET next_seq = %s, last_leaf = %s, tree = %s, signed_size = %s, signed_at = %s,
            last_time = %s, stopped = %s, broken = %s, received = %s, hole_ahead = %s, hole_since = %s,
            first_leaf = %s, updated_at = %s WHERE writer_id = %s""",
            (
                state.next_seq,
                state.last_leaf,
                state.tree_bytes(),
                state.signed_size,
                state.signed_at,
                state.last_time,
                state.stopped,
                state.broken,
                state.received,
                hole.ahead if hole else None,
                hole.since if hole else None,
                state.first_leaf,
                time.time(),
                state.writer_id,
            ),
        )

    def add_alert(self, alert: Alert) -> bool:
        """Store ``alert``; False when the same alert was stored before (by any collector)."""
        cur = self.conn.execute(
            f"INSERT INTO {self.store.alerts} (writer_id, kind, first_seq, last_seq, message, at) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (alert.writer_id, alert.kind, alert.first_seq, alert.last_seq, alert.message, time.time()),
        )
        return cur.rowcount == 1
