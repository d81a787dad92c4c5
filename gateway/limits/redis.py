"""The shared limiter: GCRA and stream leases in Redis, one atomic Lua script per decision.

- The script reads the clock with `TIME`, so instances with skewed clocks agree.
- Scripts run with EVALSHA and are reloaded on NOSCRIPT (redis-py's `Script` does this), as
  the script cache is lost on restart and failover.
- One caller's keys share a hash tag (`prefix:{caller}:rpm`), so a Redis Cluster keeps them in
  one slot and the script may touch them together.
- Every call is bounded by the socket timeout. When Redis fails, `fail_open` decides locally
  with each limit divided by the number of instances (every such decision is counted), and
  `fail_closed` raises LimiterUnavailable. After a failure Redis is skipped for
  `retry_redis_after_s`, then tried again: the gateway recovers by itself.
- Stream leases live in a sorted set scored by expiry; this instance renews the ones it holds
  every `LEASE_TTL_S / 3`, so a crashed instance's leases expire within `LEASE_TTL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
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

_log = get_logger("gateway.limits")

LEASE_TTL_S = 60.0

# KEYS: rpm, tpm, concurrency.  ARGV: rpm limit, tpm limit, tpm cost, concurrency limit,
# lease id, lease ttl ms, period ms (0 = no such limit).
# Returns: allowed, denied_by (1 rpm, 2 tpm, 3 concurrency), retry_after_ms,
#          rpm remaining, rpm reset ms, tpm remaining, tpm reset ms, concurrency remaining.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[7])
local out = {1, 0, 0, -1, 0, -1, 0, -1}
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
local conc = tonumber(ARGV[4])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local n = redis.call('ZCARD', KEYS[3])
  if n >= conc then
    out[8] = 0
    return deny(3, 1000)
  end
  local ttl = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 2))
  out[8] = conc - n - 1
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

# KEYS: concurrency.  ARGV: lease id, ttl ms.  Renews a lease this instance still holds.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[2])
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2))
return n
"""

_NAMES = {1: "rpm", 2: "tpm", 3: "concurrency"}
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
    ) -> None:
        self.name = "redis"
        self._redis = client or redis_client(url, socket_timeout_s)
        self._timeout = socket_timeout_s
        self._prefix = prefix
        self._fail_open = fail_open
        self._instances = instances
        self._retry_after = retry_redis_after_s
        self._down_until = 0.0
        self._fallback = MemoryLimiter(name="fallback")
        self._admit = self._redis.register_script(_ADMIT)
        self._reconcile = self._redis.register_script(_RECONCILE)
        self._renew = self._redis.register_script(_RENEW)
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        # Counters (exported as metrics): decisions taken without Redis, Redis errors.
        self.degraded_decisions = 0
        self.redis_errors = 0

    def _keys(self, subject: str) -> list[str]:
        tag = f"{self._prefix}:{{{subject}}}"
        return [f"{tag}:rpm", f"{tag}:tpm", f"{tag}:conc"]

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
                        int(LEASE_TTL_S * 1000),
                        int(PERIOD_S * 1000),
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
        if not allowed:
            return Decision(False, _NAMES.get(int(out[1])), out[2] / 1000, tuple(usage))
        if spec.tokens_per_minute is not None:
            # A cost above the limit was charged as the limit: reconcile from what was charged.
            tokens = min(max(0, tokens), spec.tokens_per_minute)
        lease = None
        if spec.concurrent_streams is not None:
            lease = Lease(subject, lease_id, self.name)
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
            async with asyncio.timeout(self._timeout * 2):
                await self._redis.zrem(self._keys(lease.subject)[2], lease.lease_id)
        except _FAILURES as exc:
            # The lease expires on its own within LEASE_TTL_S (it is no longer renewed).
            self._failed(exc, "release")

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="redis-lease-renewer"
            )

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(LEASE_TTL_S / 3)
            for lease in list(self._held.values()):
                try:
                    await self._call(
                        self._renew,
                        [self._keys(lease.subject)[2]],
                        [lease.lease_id, int(LEASE_TTL_S * 1000)],
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
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()
