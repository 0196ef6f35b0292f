"""Detection state: windows, baselines, dedupe keys, rate limits, cursors and pending alerts.

:class:`RedisState` keeps all of it in Redis, so several detectors — one per gateway replica or
vLLM host, each reading its own log directory — share windows and dedupe keys: a burst split over
two replicas is counted once and alerted once. One Lua script per batch applies every window
update, claims dedupe keys, counts the rate limit, queues the winning alerts as *pending* and
commits the cursor, atomically: a detector that dies before the script ran replays the batch
(nothing of it was applied); one that dies after it finds the cursor advanced (nothing is applied
twice) and its pending alerts still queued. Pending alerts leave the queue only after they are
durable in the log; a restart re-appends those the log does not already hold (by ``alert_id``).

Key layout under ``prefix`` (default ``vllm-audit:detect:``): ``r:`` rate buckets, ``d:`` distinct
sets, ``b:`` baselines, ``dd:`` dedupe keys, ``rl:`` per-rule per-minute alert counts, ``cur:<instance>``
cursors, ``pending:<instance>`` alerts not yet durable. Not for Redis Cluster (the script touches
keys it computes).

:class:`MemoryState` has the same semantics in one process (``vllm-audit rules test`` offline).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from vllm_audit.detect.engine import Plan
from vllm_audit.integrity.reader import Cursor


@dataclasses.dataclass(slots=True)
class Outcome:
    """What committing one batch decided."""

    #: ``(candidate index, value)`` of candidates that won their dedupe key and the rate limit.
    emitted: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    #: Candidates that won their dedupe key but were over the rule's alerts-per-minute.
    suppressed: list[int] = dataclasses.field(default_factory=list)
    #: The batch was already applied (the stored cursor is past it): nothing was changed.
    stale: bool = False


class State(Protocol):
    def load_cursors(self) -> dict[str, Cursor]: ...

    def baselines(self, keys: Iterable[str]) -> dict[str, list[float]]: ...

    def commit(self, plan: Plan, start: Cursor, end: Cursor, templates: Sequence[bytes]) -> Outcome: ...

    def pending(self) -> list[tuple[float, bytes]]: ...

    def done(self, n: int) -> None: ...


def _minute(t: float) -> int:
    return int(t // 60)


def _cand_rows(plan: Plan) -> list[list[Any]]:
    return [
        [c.dedupe_key, max(1, math.ceil(c.rule.dedupe_s)), c.rule.threshold, c.rule.id, _minute(c.t),
         c.rule.max_alerts_per_minute, c.value]
        for c in plan.cands
    ]


_SCRIPT = r"""
local a = cjson.decode(ARGV[1])
local P = a.p
local ck = P .. 'cur:' .. a.inst
local stored = redis.call('HGET', ck, a.w)
local have = 0
if stored then have = tonumber(string.match(stored, '^(%d+)|')) end
if have ~= a.s then return '{"stale":true}' end
local out = {}
local function claim(ci, v)
  local c = a.cands[ci + 1]
  if redis.call('SET', P .. 'dd:' .. c[1], a.inst, 'NX', 'EX', c[2]) then
    local rl = P .. 'rl:' .. c[4] .. ':' .. c[5]
    local n = redis.call('INCR', rl)
    if n == 1 then redis.call('EXPIRE', rl, 180) end
    if n > c[6] then
      out[#out + 1] = {ci, v, 0}
    else
      out[#out + 1] = {ci, v, 1}
      redis.call('RPUSH', P .. 'pending:' .. a.inst, tostring(v) .. '|' .. ARGV[ci + 2])
    end
  end
end
for _, r in ipairs(a.rate) do
  local k = P .. r[2] .. ':'
  local cur = tonumber(redis.call('INCRBYFLOAT', k .. r[3], r[4]))
  redis.call('EXPIRE', k .. r[3], r[6])
  local prev = tonumber(redis.call('GET', k .. (r[3] - 1)) or '0')
  local est = cur + prev * r[5]
  if est >= a.cands[r[1] + 1][3] then claim(r[1], est) end
end
for _, d in ipairs(a.dist) do
  local k = P .. d[2]
  local m = d[3]
  for i = 1, #m, 2 do redis.call('ZADD', k, 'GT', m[i + 1], m[i]) end
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (d[5] - d[4]))
  redis.call('PEXPIRE', k, d[4] + 60000)
  local n = redis.call('ZCARD', k)
  if n >= a.cands[d[1] + 1][3] then claim(d[1], n) end
end
for _, ci in ipairs(a.hits) do claim(ci, a.cands[ci + 1][7]) end
for _, b in ipairs(a.base) do
  local k = P .. 'b:' .. b[1]
  local vals = b[3]
  for i = 1, #vals, 500 do
    redis.call('RPUSH', k, unpack(vals, i, math.min(i + 499, #vals)))
  end
  redis.call('LTRIM', k, -b[2], -1)
  redis.call('EXPIRE', k, 2592000)
end
redis.call('HSET', ck, a.w, a.e)
return cjson.encode({won = out})
"""


def _decode_outcome(raw: Any) -> Outcome:
    data = orjson.loads(raw)
    if data.get("stale"):
        return Outcome(stale=True)
    won = data.get("won") or []
    out = Outcome()
    if isinstance(won, list):
        for ci, v, emitted in won:
            if emitted:
                out.emitted.append((int(ci), float(v)))
            else:
                out.suppressed.append(int(ci))
    return out


def _cursor_value(c: Cursor) -> bytes:
    return b"%d|" % c.next_seq + orjson.dumps(c.to_json())


class RedisState:
    """Shared detection state in Redis (see the module docstring); ``instance`` names this log directory."""

    def __init__(self, url: str, instance: str, prefix: str = "vllm-audit:detect:", *, timeout_s: float = 5.0) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - the redis extra
            raise ImportError("the detector needs the 'redis' extra: pip install 'vllm-audit[redis]'") from exc
        self.prefix = prefix
        self.instance = instance
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self.client.register_script(_SCRIPT)
        self._cur = f"{prefix}cur:{instance}"
        self._pending = f"{prefix}pending:{instance}"

    def ping(self) -> None:
        self.client.ping()

    def load_cursors(self) -> dict[str, Cursor]:
        raw: Mapping[Any, Any] = self.client.hgetall(self._cur)
        out = {}
        for wid, value in raw.items():
            _, _, js = bytes(value).partition(b"|")
            out[bytes(wid).decode()] = Cursor.from_json(orjson.loads(js))
        return out

    def baselines(self, keys: Iterable[str]) -> dict[str, list[float]]:
        ks = sorted(keys)
        if not ks:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for k in ks:
            pipe.lrange(f"{self.prefix}b:{k}", 0, -1)
        return {k: [float(v) for v in vals] for k, vals in zip(ks, pipe.execute(), strict=True)}

    def commit(self, plan: Plan, start: Cursor, end: Cursor, templates: Sequence[bytes]) -> Outcome:
        control = {
            "p": self.prefix,
            "inst": self.instance,
            "w": start.writer_id,
            "s": start.next_seq,
            "e": _cursor_value(end).decode(),
            "cands": _cand_rows(plan) or None,
            "rate": [[r.cand, r.key, r.bucket, r.inc, r.prev_weight, r.ttl] for r in plan.rate] or None,
            "dist": [
                [d.cand, d.key, [x for m, ms in d.members.items() for x in (m, ms)], d.window_ms, d.now_ms]
                for d in plan.distinct
            ]
            or None,
            "hits": plan.hits or None,
            "base": [[k, size, vals] for k, (vals, size) in plan.baseline.items() if vals] or None,
        }
        # cjson decodes an empty JSON array as a table too; None keeps ipairs() happy on absent keys.
        control = {k: v for k, v in control.items() if v is not None}
        for k in ("cands", "rate", "dist", "hits", "base"):
            control.setdefault(k, [])
        raw = self._script(args=[orjson.dumps(control), *templates])
        return _decode_outcome(raw)

    def pending(self) -> list[tuple[float, bytes]]:
        out = []
        for item in self.client.lrange(self._pending, 0, -1):
            v, _, tpl = item.partition(b"|") if isinstance(item, bytes) else item.encode().partition(b"|")
            out.append((float(v), tpl))
        return out

    def done(self, n: int) -> None:
        if n > 0:
            self.client.ltrim(self._pending, n, -1)

    def reset(self) -> None:
        """Forget every key under the prefix (tests and ``rules test`` with a scratch prefix)."""
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            self.client.delete(*keys[i : i + 500])

    def close(self) -> None:
        self.client.close()


class MemoryState:
    """The same decisions as :class:`RedisState`, in this process only."""

    def __init__(self) -> None:
        self.cursors: dict[str, Cursor] = {}
        self.counters: dict[str, float] = {}
        self.sets: dict[str, dict[str, int]] = {}
        self.lists: dict[str, list[float]] = {}
        self.dedupe: set[str] = set()
        self.minutes: dict[str, int] = {}
        self.queue: list[tuple[float, bytes]] = []

    def load_cursors(self) -> dict[str, Cursor]:
        return dict(self.cursors)

    def baselines(self, keys: Iterable[str]) -> dict[str, list[float]]:
        return {k: list(self.lists.get(k, [])) for k in keys}

    def commit(self, plan: Plan, start: Cursor, end: Cursor, templates: Sequence[bytes]) -> Outcome:
        have = self.cursors.get(start.writer_id)
        if (have.next_seq if have else 0) != start.next_seq:
            return Outcome(stale=True)
        out = Outcome()
        rows = _cand_rows(plan)

        def claim(ci: int, v: float) -> None:
            row = rows[ci]
            if row[0] in self.dedupe:
                return
            self.dedupe.add(row[0])
            rl = f"{row[3]}:{row[4]}"
            self.minutes[rl] = self.minutes.get(rl, 0) + 1
            if self.minutes[rl] > row[5]:
                out.suppressed.append(ci)
            else:
                out.emitted.append((ci, v))
                self.queue.append((v, templates[ci]))

        for r in plan.rate:
            k = f"{r.key}:{r.bucket}"
            self.counters[k] = self.counters.get(k, 0.0) + r.inc
            est = self.counters[k] + self.counters.get(f"{r.key}:{r.bucket - 1}", 0.0) * r.prev_weight
            if est >= rows[r.cand][2]:
                claim(r.cand, est)
        for d in plan.distinct:
            s = self.sets.setdefault(d.key, {})
            for m, ms in d.members.items():
                s[m] = max(s.get(m, 0), ms)
            for m in [m for m, ms in s.items() if ms < d.now_ms - d.window_ms]:
                del s[m]
            if len(s) >= rows[d.cand][2]:
                claim(d.cand, float(len(s)))
        for ci in plan.hits:
            claim(ci, float(rows[ci][6]))
        for k, (vals, size) in plan.baseline.items():
            lst = self.lists.setdefault(k, [])
            lst.extend(vals)
            del lst[:-size]
        self.cursors[start.writer_id] = end
        return out

    def pending(self) -> list[tuple[float, bytes]]:
        return list(self.queue)

    def done(self, n: int) -> None:
        del self.queue[:n]
