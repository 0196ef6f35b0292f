"""Requests/min and tokens/min per API key, user and org.

Fixed one-minute windows that open with the first hit (``INCR`` + ``PEXPIRE`` when new), atomic
in Redis through Lua scripts so every replica shares the same counters; an in-process table when
there is a single replica. ``check`` runs on the event loop before a request goes upstream: it
rejects when any request counter is at its limit or any token counter has reached its limit
(tokens are known only afterwards, so the call that crosses the limit is served and the next ones
wait), otherwise it counts the request. Tokens are charged from the log, off the writer thread, by
:class:`vllm_audit.access.projection.QuotaProjection`.

Counters are keyed by the caller's *quota subject* (:func:`quota_subject`): one-way hashes of
the raw identity that the edge records in every inference record (``quota_subject``), so the
check (from the identity) and the charge (from the record, after redaction) name the same
counters whatever the privacy policy does to ``user_id``. The user dimension hashes the org with
the user id: users of different tenants with the same id never share a counter.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson

from vllm_audit.access.config import QuotaConfig, QuotaLimits
from vllm_audit.access.identity import Identity

log = logging.getLogger(__name__)

WINDOW_MS = 60_000

# KEYS: n counters; ARGV: window_ms, then n limits, then n increments (0 = only look).
# Returns 0 when allowed (and the increments are applied), else the largest remaining window in ms.
_CHECK_LUA = """
local window = tonumber(ARGV[1])
local n = #KEYS
local wait = 0
for i = 1, n do
  local limit = tonumber(ARGV[1 + i])
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  if cur >= limit then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = window end
    if ttl > wait then wait = ttl end
  end
end
if wait > 0 then return wait end
for i = 1, n do
  local inc = tonumber(ARGV[1 + n + i])
  if inc > 0 then
    redis.call('INCRBY', KEYS[i], inc)
    if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], window) end
  end
end
return 0
"""

# (counter key, limit, increment)
Counter = tuple[str, int, int]

#: The quota dimensions, in the order they are checked.
DIMENSIONS = ("key", "user", "org")


def _h(*parts: str) -> str:
    return hashlib.sha256(b"vllm-audit/quota/v1\x00" + orjson.dumps(list(parts))).hexdigest()[:32]


def quota_subject(user_id: str, org_id: str, key_id: str | None) -> dict[str, str]:
    """The counter names of one caller: ``{"key": ..., "user": ..., "org": ...}`` (one-way hashes).

    ``user`` is scoped by the org. ``key`` is present only for callers authenticated by API key.
    """
    out = {"user": _h("user", org_id, user_id), "org": _h("org", org_id)}
    if key_id:
        out["key"] = _h("key", key_id)
    return out


class LocalCounters:
    """In-process fixed-window counters (one replica without Redis), shared by check and charge."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, tuple[int, float]] = {}  # key -> (count, window end, monotonic s)

    def bump(self, key: str, inc: int, now: float | None = None) -> None:
        with self.lock:
            self._bump(key, inc, time.monotonic() if now is None else now)

    def _bump(self, key: str, inc: int, now: float) -> None:
        count, end = self.counts.get(key, (0, 0.0))
        if end <= now:
            count, end = 0, now + WINDOW_MS / 1000.0
        self.counts[key] = (count + inc, end)

    def value(self, key: str) -> int:
        with self.lock:
            count, end = self.counts.get(key, (0, 0.0))
            return count if end > time.monotonic() else 0


_LOCAL: dict[str, LocalCounters] = {}
_LOCAL_LOCK = threading.Lock()


def local_table(cfg: QuotaConfig) -> LocalCounters:
    """This process's counters for ``cfg.redis_prefix`` (the quota check and the projection share them)."""
    with _LOCAL_LOCK:
        return _LOCAL.setdefault(cfg.redis_prefix, LocalCounters())


class Quota:
    def __init__(self, cfg: QuotaConfig) -> None:
        self.cfg = cfg
        self._dims: tuple[tuple[str, QuotaLimits], ...] = (
            ("key", cfg.per_key),
            ("user", cfg.per_user),
            ("org", cfg.per_org),
        )
        self._routes = frozenset(cfg.routes)
        self._local = local_table(cfg)
        self._aredis: Any = None
        self._acheck: Any = None

    # -- the counters that apply ----------------------------------------------------------------

    def _key(self, dim: str, subject: str, what: str) -> str:
        return f"{self.cfg.redis_prefix}:{dim}:{subject}:{what}"

    def counters(self, identity: Identity) -> list[Counter]:
        subject = identity.quota_subject
        out: list[Counter] = []
        for dim, lim in self._dims:
            sid = subject.get(dim)
            if not sid:
                continue
            if lim.requests_per_min > 0:
                out.append((self._key(dim, sid, "req"), lim.requests_per_min, 1))
            if lim.tokens_per_min > 0:
                out.append((self._key(dim, sid, "tok"), lim.tokens_per_min, 0))
        return out

    def token_keys(self, record: Mapping[str, Any]) -> list[str]:
        """The token counters an inference record is charged to: those of its ``quota_subject``.

        A record without one (written before the edge recorded it) falls back to its identity
        fields, org-scoped as the check is; those may have been changed by redaction.
        """
        subject = record.get("quota_subject")
        if not isinstance(subject, Mapping):
            user, org, key = record.get("user_id"), record.get("org_id"), record.get("key_id")
            if not isinstance(user, str) or not isinstance(org, str):
                return []
            subject = quota_subject(user, org, key if isinstance(key, str) else None)
        out = []
        for dim, lim in self._dims:
            sid = subject.get(dim)
            if lim.tokens_per_min > 0 and isinstance(sid, str) and sid:
                out.append(self._key(dim, sid, "tok"))
        return out

    # -- check (event loop) ---------------------------------------------------------------------

    async def check(self, identity: Identity, route: str) -> float | None:
        """None when the call may proceed (and it is counted), else seconds to wait."""
        if self._routes and route not in self._routes:
            return None
        counters = self.counters(identity)
        if not counters:
            return None
        if not self.cfg.redis_url:
            return self._check_local(counters)
        try:
            if self._acheck is None:
                from redis import asyncio as aioredis

                self._aredis = aioredis.Redis.from_url(self.cfg.redis_url, socket_timeout=2.0)
                self._acheck = self._aredis.register_script(_CHECK_LUA)
            wait_ms = await self._acheck(
                keys=[c[0] for c in counters],
                args=[WINDOW_MS, *(c[1] for c in counters), *(c[2] for c in counters)],
            )
        except Exception as exc:  # redis down, timeouts, script errors
            log.warning("quota check failed (%s): %s", self.cfg.on_redis_error, exc)
            return None if self.cfg.on_redis_error == "allow" else 1.0
        wait = int(wait_ms)
        return None if wait <= 0 else max(wait / 1000.0, 0.001)

    def _check_local(self, counters: list[Counter]) -> float | None:
        now = time.monotonic()
        table = self._local
        with table.lock:
            wait = 0.0
            for key, limit, _ in counters:
                count, end = table.counts.get(key, (0, 0.0))
                if end <= now:
                    count = 0
                if count >= limit:
                    wait = max(wait, end - now)
            if wait > 0:
                return max(wait, 0.001)
            for key, _, inc in counters:
                if inc:
                    table._bump(key, inc, now)
        return None

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = self._acheck = None


def quota_enabled(cfg: QuotaConfig) -> bool:
    return any(lim.requests_per_min > 0 or lim.tokens_per_min > 0 for lim in (cfg.per_key, cfg.per_user, cfg.per_org))
