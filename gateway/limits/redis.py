"""The shared limiter: GCRA and concurrency slots in Redis, one atomic Lua script per decision.

- The script reads the clock with `TIME`, so instances with skewed clocks agree.
- Scripts run with EVALSHA and are reloaded on NOSCRIPT (redis-py's `Script` does this), as
  the script cache is lost on restart and failover.
- One caller's keys share a hash tag (`prefix:{caller}:rpm`), so a Redis Cluster keeps them in
  one slot and the script may touch them together.
- Every call is bounded by the socket timeout. When Redis fails, `fail_open` decides locally
  with each limit divided by the number of instances (every such decision is counted), and
  `fail_closed` raises LimiterUnavailable. After a failure Redis is skipped for
  `retry_redis_after_s`, then tried again: the gateway recovers by itself.
- Concurrency slots live in two sorted sets per caller (`conc`: open streams, `reqs`: every
  in-flight request), scored by expiry; an admitted request's slots share one lease id. This
  instance renews the slots it holds every third of the slot TTL (`LEASE_TTL_S` by default),
  so a crashed instance's slots expire within that TTL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.limits.base import (
    PERIOD_S,
    Decision,
    Lease,
    LimiterUnavailable,
    LimitSpec,
    Usage,
)
from gateway.limits.memory import MemoryLimiter
from gateway.logs import get_logger
from gateway.tasks import Tasks

_log = get_logger("gateway.limits")

LEASE_TTL_S = 60.0

# KEYS: rpm, tpm, concurrent streams, concurrent requests.
# ARGV: rpm limit, tpm limit, tpm cost, streams limit, lease id, lease ttl ms, period ms,
#       requests limit (a limit of 0 = no such limit).
# Returns: allowed, denied_by (1 rpm, 2 tpm, 3 concurrency, 4 requests), retry_after_ms,
#          rpm remaining, rpm reset ms, tpm remaining, tpm reset ms, streams remaining,
#          requests remaining (-1 = not reported).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[7])
local out = {1, 0, 0, -1, 0, -1, 0, -1, -1}
local function check(key, limit, cost)
  local interval = period / limit
  if cost > limit then cost = limit end
  if cost < 0 then cost = 0 end
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - period
  if allow_at - now > 0.001 then
    local left = math.floor((period - (tat - now) + 0.001) / interval)
    return false, tat, allow_at - now, left, tat - now
  end
  return true, new_tat, 0, math.floor((period - (new_tat - now) + 0.001) / interval), new_tat - now
end
local writes = {}
local before = {}
local limits = {{KEYS[1], tonumber(ARGV[1]), 1}, {KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3])}}
-- On a denial nothing is charged: the figures reported are those before this request.
local function deny(by, retry_ms)
  for i, b in pairs(before) do
    out[2 + 2 * i] = b[1]
    out[3 + 2 * i] = b[2]
  end
  out[1] = 0
  out[2] = by
  out[3] = retry_ms
  return out
end
for i = 1, 2 do
  local key, limit, cost = limits[i][1], limits[i][2], limits[i][3]
  if limit > 0 then
    local ok, tat, retry, rem, reset = check(key, limit, cost)
    out[2 + 2 * i] = rem
    out[3 + 2 * i] = math.ceil(reset)
    if not ok then
      return deny(i, math.ceil(retry))
    end
    local _, t0, _, rem0, reset0 = check(key, limit, 0)
    before[i] = {rem0, math.ceil(reset0)}
    writes[#writes + 1] = {key, tat}
  end
end
-- Both concurrency limits are checked before either slot is taken.
local sets = {{KEYS[3], tonumber(ARGV[4])}, {KEYS[4], tonumber(ARGV[8])}}
local slots = {}
for i = 1, 2 do
  local key, limit = sets[i][1], sets[i][2]
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = redis.call('ZCARD', key)
    if n >= limit then
      out[7 + i] = 0
      return deny(2 + i, 1000)
    end
    out[7 + i] = limit - n  -- what is left without this request (reported on a denial)
    slots[#slots + 1] = {key, 7 + i}
  end
end
local ttl = tonumber(ARGV[6])
for _, s in ipairs(slots) do
  redis.call('ZADD', s[1], now + ttl, ARGV[5])
  redis.call('PEXPIRE', s[1], math.ceil(ttl * 2))
  out[s[2]] = out[s[2]] - 1
end
for _, w in ipairs(writes) do
  redis.call('SET', w[1], string.format('%.3f', w[2]), 'PX', math.max(1, math.ceil(w[2] - now)))
end
return out
"""

# KEYS: tpm.  ARGV: limit, delta tokens, period ms.
_RECONCILE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[3]) / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[2]) * interval
if new_tat > now then
  local px = math.max(1, math.ceil(new_tat - now))
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', px)
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: the slot sets a lease is in.  ARGV: lease id, ttl ms.  Renews the slots this instance
# still holds (one that already expired is not brought back).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[2])
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 2))
end
return n
"""

# KEYS: the slot sets a lease is in.  ARGV: lease id.  Frees all of its slots at once.
_RELEASE = """
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('ZREM', KEYS[i], ARGV[1])
end
return n
"""

_NAMES = {1: "rpm", 2: "tpm", 3: "concurrency", 4: "requests"}
_FAILURES = (RedisError, OSError, TimeoutError)


def redis_client(url: str, socket_timeout_s: float) -> aioredis.Redis:
    """A client whose every call is bounded by the socket timeout (one try, no retries)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        # One immediate retry, on connection errors only: a pooled connection the server closed
        # (a Redis restart) is replaced at once instead of failing the request. Timeouts are
        # not retried, and the caller bounds the whole call anyway.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        # RESP2: redis-py 8's RESP3 default skips the liveness check of pooled connections.
        protocol=2,
        health_check_interval=0,
    )


class RedisLimiter:
    """Limits shared by every instance through one Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "llmgw",
        socket_timeout_s: float = 0.25,
        fail_open: bool = True,
        instances: int = 1,
        retry_redis_after_s: float = 1.0,
        client: aioredis.Redis | None = None,
        slot_ttl_s: float = LEASE_TTL_S,
    ) -> None:
        """`slot_ttl_s`: how long a concurrency slot outlives its last renewal (renewed every
        third of it); admit's `lease_ttl_s` is for the local fallback only."""
        self.name = "redis"
        self._redis = client or redis_client(url, socket_timeout_s)
        self._timeout = socket_timeout_s
        self._prefix = prefix
        self._fail_open = fail_open
        self._instances = instances
        self._retry_after = retry_redis_after_s
        self._slot_ttl_ms = int(slot_ttl_s * 1000)
        self._down_until = 0.0
        self._fallback = MemoryLimiter(name="fallback")
        self._admit = self._redis.register_script(_ADMIT)
        self._reconcile = self._redis.register_script(_RECONCILE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._tasks = Tasks("redis-limiter")
        # Counters (exported as metrics): decisions taken without Redis, Redis errors.
        self.degraded_decisions = 0
        self.redis_errors = 0

    def _keys(self, subject: str) -> list[str]:
        tag = f"{self._prefix}:{{{subject}}}"
        return [f"{tag}:rpm", f"{tag}:tpm", f"{tag}:conc", f"{tag}:reqs"]

    def _slot_keys(self, lease: Lease) -> list[str]:
        """The sorted sets `lease` has a slot in."""
        keys = self._keys(lease.subject)
        return [
            k for k, held in ((keys[2], lease.stream_slot), (keys[3], lease.request_slot)) if held
        ]

    @property
    def redis_up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        # The socket timeout bounds each I/O; this bounds the whole call (connect + script load
        # + evalsha), so that nothing waits on Redis much beyond the configured timeout.
        async with asyncio.timeout(self._timeout * 2):
            return await script(keys=keys, args=args)

    def _failed(self, exc: BaseException, what: str) -> None:
        self.redis_errors += 1
        first = self.redis_up
        self._down_until = time.monotonic() + self._retry_after
        if first:
            _log.warning("redis unavailable", operation=what, error=type(exc).__name__)

    async def admit(
        self, subject: str, spec: LimitSpec, tokens: int, lease_ttl_s: float
    ) -> Decision:
        if self.redis_up:
            lease_id = uuid.uuid4().hex
            try:
                out = await self._call(
                    self._admit,
                    self._keys(subject),
                    [
                        spec.requests_per_minute or 0,
                        spec.tokens_per_minute or 0,
                        max(0, tokens),
                        spec.concurrent_streams or 0,
                        lease_id,
                        self._slot_ttl_ms,
                        int(PERIOD_S * 1000),
                        spec.concurrent_requests or 0,
                    ],
                )
            except _FAILURES as exc:
                self._failed(exc, "admit")
            else:
                return self._decision(subject, spec, tokens, lease_id, out)
        if not self._fail_open:
            raise LimiterUnavailable("the shared limiter (Redis) is unavailable")
        self.degraded_decisions += 1
        decision = self._fallback.admit_now(
            subject, spec.scaled(self._instances), tokens, lease_ttl_s
        )
        return Decision(
            decision.allowed,
            decision.denied_by,
            decision.retry_after_s,
            decision.usage,
            decision.lease,
            degraded=True,
            reserved_tokens=decision.reserved_tokens,
        )

    def _decision(
        self, subject: str, spec: LimitSpec, tokens: int, lease_id: str, out: list[int]
    ) -> Decision:
        allowed = out[0] == 1
        usage: list[Usage] = []
        if spec.requests_per_minute is not None and out[3] >= 0:
            usage.append(Usage("rpm", spec.requests_per_minute, int(out[3]), out[4] / 1000))
        if spec.tokens_per_minute is not None and out[5] >= 0:
            usage.append(Usage("tpm", spec.tokens_per_minute, int(out[5]), out[6] / 1000))
        if spec.concurrent_streams is not None and out[7] >= 0:
            usage.append(Usage("concurrency", spec.concurrent_streams, int(out[7]), 0.0))
        if spec.concurrent_requests is not None and out[8] >= 0:
            usage.append(Usage("requests", spec.concurrent_requests, int(out[8]), 0.0))
        if not allowed:
            return Decision(False, _NAMES.get(int(out[1])), out[2] / 1000, tuple(usage))
        if spec.tokens_per_minute is not None:
            # A cost above the limit was charged as the limit: reconcile from what was charged.
            tokens = min(max(0, tokens), spec.tokens_per_minute)
        lease = None
        if spec.concurrent_streams is not None or spec.concurrent_requests is not None:
            lease = Lease(
                subject,
                lease_id,
                self.name,
                stream_slot=spec.concurrent_streams is not None,
                request_slot=spec.concurrent_requests is not None,
            )
            self._held[lease_id] = lease
            self._ensure_renewer()
        return Decision(True, None, 0.0, tuple(usage), lease, reserved_tokens=tokens)

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        if spec.tokens_per_minute is None or delta_tokens == 0:
            return
        if not self.redis_up:
            await self._fallback.reconcile(subject, spec.scaled(self._instances), delta_tokens)
            return
        try:
            await self._call(
                self._reconcile,
                [self._keys(subject)[1]],
                [spec.tokens_per_minute, delta_tokens, int(PERIOD_S * 1000)],
            )
        except _FAILURES as exc:
            self._failed(exc, "reconcile")

    async def release(self, lease: Lease) -> None:
        if lease.backend != self.name:
            await self._fallback.release(lease)
            return
        if self._held.pop(lease.lease_id, None) is None:
            return
        try:
            await self._call(self._release, self._slot_keys(lease), [lease.lease_id])
        except _FAILURES as exc:
            # The slots expire on their own within the slot TTL (they are no longer renewed).
            self._failed(exc, "release")

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = self._tasks.spawn(self._renew_loop(), "redis-lease-renewer")

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self._slot_ttl_ms / 3000)
            for lease in list(self._held.values()):
                try:
                    await self._call(
                        self._renew, self._slot_keys(lease), [lease.lease_id, self._slot_ttl_ms]
                    )
                except _FAILURES as exc:
                    self._failed(exc, "renew")
                    break

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout * 2):
                return bool(await self._redis.ping())
        except _FAILURES:
            return False

    async def close(self) -> None:
        await self._tasks.cancel()
        await self._redis.aclose()
