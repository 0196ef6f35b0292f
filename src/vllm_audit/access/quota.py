"""Requests/min and tokens/min per API key, user and org.

Fixed one-minute windows that open with the first hit (``INCR`` + ``PEXPIRE`` when new), atomic
in Redis through Lua scripts so every replica shares the same counters; an in-process table when
there is a single replica. ``check`` runs on the event loop before a request goes upstream: it
rejects when any request counter is at its limit or any token counter has reached its limit
(tokens are known only afterwards, so the call that crosses the limit is served and the next ones
wait), otherwise it counts the request. ``charge_tokens`` runs in the writer thread after a record
is finalized and never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

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

_CHARGE_LUA = """
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 0
"""

# (counter key, limit, increment)
Counter = tuple[str, int, int]


class Quota:
    def __init__(self, cfg: QuotaConfig) -> None:
        self.cfg = cfg
        self._dims: tuple[tuple[str, QuotaLimits], ...] = (
            ("key", cfg.per_key),
            ("user", cfg.per_user),
            ("org", cfg.per_org),
        )
        self._routes = frozenset(cfg.routes)
        self._charges_tokens = any(lim.tokens_per_min > 0 for _, lim in self._dims)
        self._lock = threading.Lock()
        self._local: dict[str, tuple[int, float]] = {}  # key -> (count, window end, monotonic s)
        self._aredis: Any = None
        self._acheck: Any = None
        self._sredis: Any = None
        self._scharge: Any = None

    # -- the counters that apply ----------------------------------------------------------------

    def _ids(self, fields: Mapping[str, Any]) -> list[tuple[str, QuotaLimits, str]]:
        out = []
        for dim, lim in self._dims:
            ident = fields.get(f"{dim}_id")
            if ident:
                out.append((dim, lim, str(ident)))
        return out

    def _key(self, dim: str, ident: str, what: str) -> str:
        return f"{self.cfg.redis_prefix}:{dim}:{ident}:{what}"

    def counters(self, identity: Identity) -> list[Counter]:
        fields = {"key_id": identity.key_id, "user_id": identity.user_id, "org_id": identity.org_id}
        out: list[Counter] = []
        for dim, lim, ident in self._ids(fields):
            if lim.requests_per_min > 0:
                out.append((self._key(dim, ident, "req"), lim.requests_per_min, 1))
            if lim.tokens_per_min > 0:
                out.append((self._key(dim, ident, "tok"), lim.tokens_per_min, 0))
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
        with self._lock:
            wait = 0.0
            for key, limit, _ in counters:
                count, end = self._local.get(key, (0, 0.0))
                if end <= now:
                    count = 0
                if count >= limit:
                    wait = max(wait, end - now)
            if wait > 0:
                return max(wait, 0.001)
            for key, _, inc in counters:
                if inc:
                    self._bump(key, inc, now)
        return None

    def _bump(self, key: str, inc: int, now: float) -> None:
        count, end = self._local.get(key, (0, 0.0))
        if end <= now:
            count, end = 0, now + WINDOW_MS / 1000.0
        self._local[key] = (count + inc, end)

    # -- charge (writer thread) -----------------------------------------------------------------

    def charge_tokens(self, identity_fields: Mapping[str, Any], total_tokens: int) -> None:
        """Add a finalized call's tokens to its counters. Synchronous; never raises."""
        try:
            if not self._charges_tokens or not total_tokens or total_tokens <= 0:
                return
            keys = [
                self._key(dim, ident, "tok") for dim, lim, ident in self._ids(identity_fields) if lim.tokens_per_min > 0
            ]
            if not keys:
                return
            if not self.cfg.redis_url:
                now = time.monotonic()
                with self._lock:
                    for key in keys:
                        self._bump(key, int(total_tokens), now)
                return
            if self._scharge is None:
                import redis

                self._sredis = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=2.0)
                self._scharge = self._sredis.register_script(_CHARGE_LUA)
            self._scharge(keys=keys, args=[WINDOW_MS, int(total_tokens)])
        except Exception as exc:  # the writer thread must never fail because of quotas
            log.warning("quota charge failed: %s", exc)

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = self._acheck = None
        if self._sredis is not None:
            self._sredis.close()
            self._sredis = self._scharge = None


def quota_enabled(cfg: QuotaConfig) -> bool:
    return any(lim.requests_per_min > 0 or lim.tokens_per_min > 0 for lim in (cfg.per_key, cfg.per_user, cfg.per_org))
