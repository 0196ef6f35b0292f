"""The access area's projections of the log: the query store and quota charging.

Both are driven by the lead's :class:`~vllm_audit.ship.runner.Runner` (off the writer thread and
the event loop), read link-checked entries through the one :class:`~vllm_audit.integrity.reader.LogReader`,
and commit their cursor *atomically with their output*:

* :class:`QueryStoreProjection` inserts the batch's inference rows and moves the writer's cursor
  ``(next_seq, last_leaf)`` in one database transaction, so a crash anywhere loses nothing and
  duplicates nothing; the reader link-checks the first entry it reads against ``last_leaf``.
* :class:`QuotaProjection` charges each inference record's ``total_tokens`` to the token counters
  of its ``quota_subject`` and moves the cursor in one Redis Lua script (Redis runs a script
  atomically), and the script charges only entries at or after the stored cursor, so a replay
  never charges twice. A slow or unreachable Redis slows only this projection's thread.

``build_projections(config)`` returns the projections a configuration asks for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm_audit.access.config import QuotaConfig
from vllm_audit.access.quota import WINDOW_MS, Quota, local_table, quota_enabled
from vllm_audit.access.store import Store, open_store, row_from_entry
from vllm_audit.integrity.codec import Entry
from vllm_audit.integrity.reader import Cursor
from vllm_audit.ship.base import Context, CursorFile, Projection
from vllm_audit.ship.config import state_dir

if TYPE_CHECKING:
    from vllm_audit.config import Config

log = logging.getLogger(__name__)

__all__ = ["QueryStoreProjection", "QuotaProjection", "build_projections"]


class QueryStoreProjection(Projection):
    """Inference records into the query store (SQLite or PostgreSQL), cursor in the same transaction."""

    name = "query_store"
    kind = "query_store"

    def __init__(self, store: Store, *, batch_max: int = 1000) -> None:
        self.store = store
        self.batch_max = batch_max
        self._ready = False

    def open(self) -> None:
        if not self._ready:
            self.store.init()
            self._ready = True

    def load_cursors(self) -> dict[str, Cursor]:
        return self.store.load_cursors()

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        rows = []
        by_seq: dict[int, Entry] = {}
        for e in entries:
            if e.record_type != "inference":
                continue
            rows.append(row_from_entry(e.record(), e.line))
            by_seq[e.seq] = e
        last = entries[-1]
        clashes = self.store.apply(rows, Cursor(writer_id, last.seq + 1, last.leaf_hex))
        for seq in clashes:
            ctx.quarantine(by_seq[seq], "record_id already used by another entry in the query store")

    def reset(self) -> None:
        """Empty the store and its cursors (``vllm-audit index --rebuild``)."""
        self.open()
        self.store.reset()

    def close(self) -> None:
        self.store.close()


# KEYS[1]: the writer's cursor hash; KEYS[2..]: token counters.
# ARGV: window_ms, next_seq, last_leaf, n_entries, then per entry: seq, tokens, k, k key indexes (into KEYS).
# Charges only entries with seq >= the stored cursor, then moves the cursor: one atomic step.
_APPLY_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'next_seq') or '0')
local window = tonumber(ARGV[1])
local n = tonumber(ARGV[4])
local i = 5
local charged = 0
for _ = 1, n do
  local seq = tonumber(ARGV[i])
  local tokens = tonumber(ARGV[i + 1])
  local k = tonumber(ARGV[i + 2])
  if seq >= cur then
    for j = 1, k do
      local key = KEYS[tonumber(ARGV[i + 2 + j])]
      redis.call('INCRBY', key, tokens)
      if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, window) end
    end
    charged = charged + 1
  end
  i = i + 3 + k
end
if tonumber(ARGV[2]) > cur then
  redis.call('HSET', KEYS[1], 'next_seq', ARGV[2], 'last_leaf', ARGV[3])
end
return charged
"""


class QuotaProjection(Projection):
    """Tokens of finished calls into the token-per-minute counters, never twice.

    The counter keys come from the record's ``quota_subject`` (computed by the edge from the raw
    identity exactly as :meth:`Quota.check` computes them: :func:`vllm_audit.access.quota.quota_subject`),
    never from redactable fields such as ``user_id``. Records older than one quota window are not charged:
    their window has closed (after an outage the projection catches up without punishing callers
    now for calls made then).

    With ``redis_url`` the cursor lives in Redis next to the counters (``<prefix>:cursor:<writer>``)
    and moves in the same script as the charge. Without it the counters are this process's
    (:func:`vllm_audit.access.quota.local_table`) and so is the cursor (a file in the state
    directory): a restart loses both together.
    """

    name = "quota"
    kind = "quota"

    def __init__(self, cfg: QuotaConfig, cursor_file: CursorFile, *, clock: Any = time.time) -> None:
        self.cfg = cfg
        self.quota = Quota(cfg)
        self.cursor_file = cursor_file
        self.clock = clock
        self.batch_max = 1000
        self._redis: Any = None
        self._script: Any = None

    def open(self) -> None:
        if self.cfg.redis_url and self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
            self._script = self._redis.register_script(_APPLY_LUA)

    def _cursor_key(self, writer_id: str) -> str:
        return f"{self.cfg.redis_prefix}:cursor:{writer_id}"

    def load_cursors(self) -> dict[str, Cursor]:
        if self._redis is None:
            return self.cursor_file.load()
        out: dict[str, Cursor] = {}
        prefix = self._cursor_key("")
        for key in self._redis.scan_iter(match=prefix + "*", count=500):
            k = key.decode() if isinstance(key, bytes) else str(key)
            h = self._redis.hgetall(k)
            seq, leaf = h.get(b"next_seq"), h.get(b"last_leaf")
            if seq is not None:
                wid = k[len(prefix) :]
                out[wid] = Cursor(wid, int(seq), (leaf or b"").decode())
        return out

    def charges(self, entries: Sequence[Entry]) -> list[tuple[int, int, list[str]]]:
        """``(seq, tokens, counter keys)`` of the entries to charge."""
        oldest = self.clock() - WINDOW_MS / 1000.0
        out = []
        for e in entries:
            if e.record_type != "inference":
                continue
            rec = e.record()
            tokens = rec.get("total_tokens")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
                continue
            if _epoch(rec.get("timestamp")) < oldest:
                continue
            keys = self.quota.token_keys(rec)
            if keys:
                out.append((e.seq, tokens, keys))
        return out

    def apply(self, writer_id: str, entries: Sequence[Entry], ctx: Context) -> None:
        last = entries[-1]
        charges = self.charges(entries)
        if self._redis is None:
            table = local_table(self.cfg)
            for _seq, tokens, ckeys in charges:
                for key in ckeys:
                    table.bump(key, tokens)
            self.cursor_file.commit(Cursor(writer_id, last.seq + 1, last.leaf_hex))
            return
        keys: list[str] = [self._cursor_key(writer_id)]
        index: dict[str, int] = {}
        argv: list[Any] = [WINDOW_MS, last.seq + 1, last.leaf_hex, len(charges)]
        for seq, tokens, ckeys in charges:
            argv += [seq, tokens, len(ckeys)]
            for k in ckeys:
                if k not in index:
                    keys.append(k)
                    index[k] = len(keys)
                argv.append(index[k])
        self._script(keys=keys, args=argv)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = self._script = None


def _epoch(ts: Any) -> float:
    import datetime as dt

    if not isinstance(ts, str):
        return 0.0
    try:
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def build_projections(config: Config) -> list[Projection]:
    """The access area's projections for ``config``: the query store (when the audit API is on)
    and quota charging (when a token limit is set). The runner drives them."""
    out: list[Projection] = []
    if config.access.api.enabled:
        out.append(QueryStoreProjection(open_store(config), batch_max=config.ship.batch_max))
    q = config.access.quota
    if quota_enabled(q) and any(lim.tokens_per_min > 0 for lim in (q.per_key, q.per_user, q.per_org)):
        cursor_file = CursorFile(state_dir(config.ship, config.log.dir) / "quota" / "cursors.json")
        out.append(QuotaProjection(q, cursor_file))
    return out
