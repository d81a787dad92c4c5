"""The shared limiter: GCRA and concurrency slots in Redis, one atomic Lua script per decision.

- The script reads the clock with `TIME`, so instances with skewed clocks agree.
- Scripts run with EVALSHA and are loaded again on NOSCRIPT, as the script cache is lost on
  restart and failover.
- One caller's keys share a hash tag (`prefix:{caller}:rpm`), so a Redis Cluster keeps them in
  one slot and the script may touch them together.
- A request costs two round trips: `admit` before it, `settle` (slots freed and tokens
  reconciled in one script) after it.
- The script calls made during one event-loop iteration (by every concurrent request) go to
  Redis pipelined, up to `max_batch` per write: each is still its own atomic script and its
  caller's one round trip, but a batch costs one write and one read, and the commands are
  packed here once. At high concurrency one process is bound by its per-command client work
  (redis-py's packing, parsing and per-command machinery, one syscall per command), not by
  Redis; a few batches in flight keep both busy at once.
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
import dataclasses
import hashlib
import itertools
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.limits.base import (
    PERIOD_S,
    Decision,
    Lease,
    LimiterUnavailable,
    LimitSpec,
    Standing,
    Usage,
)
from gateway.limits.budget import WINDOW_GRACE_S, BudgetSpec, BudgetState, WindowClock, Windows
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
-- Until every limit allows, `out` holds what is left without this request: on a denial
-- nothing is charged and those are the figures reported.
local new_tats = {}
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local cost = 1
    if i == 2 then
      cost = math.max(0, math.min(tonumber(ARGV[3]), limit))
    end
    local interval = period / limit
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat == nil or tat < now then tat = now end
    out[2 + 2 * i] = math.floor((period - (tat - now) + 0.001) / interval)
    out[3 + 2 * i] = math.ceil(tat - now)
    local new_tat = tat + cost * interval
    local wait = new_tat - period - now
    if wait > 0.001 then
      out[1] = 0
      out[2] = i
      out[3] = math.ceil(wait)
      return out
    end
    new_tats[i] = {new_tat, interval}
  end
end
-- Both concurrency limits are checked before either slot is taken.
local counts = {}
for i = 1, 2 do
  local limit = tonumber(ARGV[i == 1 and 4 or 8])
  if limit > 0 then
    local key = KEYS[2 + i]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = redis.call('ZCARD', key)
    if n >= limit then
      out[7 + i] = 0
      out[1] = 0
      out[2] = 2 + i
      out[3] = 1000
      return out
    end
    out[7 + i] = limit - n
    counts[i] = true
  end
end
local ttl = tonumber(ARGV[6])
for i = 1, 2 do
  if counts[i] then
    local key = KEYS[2 + i]
    redis.call('ZADD', key, now + ttl, ARGV[5])
    redis.call('PEXPIRE', key, math.ceil(ttl * 2))
    out[7 + i] = out[7 + i] - 1
  end
end
for i = 1, 2 do
  local w = new_tats[i]
  if w then
    local new_tat, interval = w[1], w[2]
    redis.call('SET', KEYS[i], string.format('%.3f', new_tat), 'PX',
      math.max(1, math.ceil(new_tat - now)))
    out[2 + 2 * i] = math.floor((period - (new_tat - now) + 0.001) / interval)
    out[3 + 2 * i] = math.ceil(new_tat - now)
  end
end
return out
"""

# KEYS: tpm, then the slot sets a lease is in (none, one or two).
# ARGV: lease id, tpm limit (0 = no tokens to reconcile), delta tokens, period ms.
# Frees the lease's slots and charges (or refunds) the tokens: the end of a request in one call.
# Returns the number of slots freed.
_SETTLE = """
local n = 0
for i = 2, #KEYS do
  n = n + redis.call('ZREM', KEYS[i], ARGV[1])
end
local limit = tonumber(ARGV[2])
local delta = tonumber(ARGV[3])
if limit > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = tonumber(ARGV[4]) / limit
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + delta * interval
  if new_tat > now then
    local px = math.max(1, math.ceil(new_tat - now))
    redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', px)
  else
    redis.call('DEL', KEYS[1])
  end
end
return n
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

# KEYS: rpm, tpm, concurrent streams, concurrent requests (as _ADMIT).  Reads, charges nothing.
# Returns: now ms, rpm TAT ms, tpm TAT ms (-1 = none), open streams, open requests.
_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {math.floor(now), -1, -1, 0, 0}
for i = 1, 2 do
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat ~= nil then out[1 + i] = math.ceil(tat) end
  out[3 + i] = redis.call('ZCOUNT', KEYS[2 + i], '(' .. now, '+inf')
end
return out
"""

# KEYS: the subject's budget hash of the current day, then of the current month.
# ARGV: tokens, cost (nano-units; both 0: read only), the day's and the month's expiry (unix ms).
# Charges both windows at once (a refund stops at zero); returns tokens and cost used in the
# day, then in the month.
_BUDGET = """
local out = {}
local charge = ARGV[1] ~= '0' or ARGV[2] ~= '0'
for i = 1, 2 do
  if charge then
    -- A refund never takes a counter below zero.
    for j, field in ipairs({'t', 'c'}) do
      local v = redis.call('HINCRBY', KEYS[i], field, ARGV[j])
      if v < 0 then
        redis.call('HSET', KEYS[i], field, 0)
        v = 0
      end
      out[2 * i - 2 + j] = v
    end
    redis.call('PEXPIREAT', KEYS[i], ARGV[2 + i])
  else
    local v = redis.call('HMGET', KEYS[i], 't', 'c')
    out[2 * i - 1] = tonumber(v[1]) or 0
    out[2 * i] = tonumber(v[2]) or 0
  end
end
return out
"""

_NAMES = {1: "rpm", 2: "tpm", 3: "concurrency", 4: "requests"}
_FAILURES = (RedisError, OSError, TimeoutError)
_PERIOD_MS = int(PERIOD_S * 1000)
_RENEW_BATCH = 256  # leases renewed per pipeline (a long one would delay admits behind it)


@dataclass(frozen=True, slots=True)
class _Script:
    source: str
    sha: bytes  # the SHA1 Redis names a loaded script by (what SCRIPT LOAD returns)

    @classmethod
    def of(cls, source: str) -> _Script:
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest().encode()
        return cls(source, sha)

    def command(self, args: tuple[str | int, ...]) -> bytes:
        """`EVALSHA sha *args` in the Redis protocol (RESP), packed once per call: redis-py's
        own packer (pure Python in its asyncio client) was the largest cost per call."""
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (len(args) + 2, self.sha)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else b"%d" % arg
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)


_ADMIT_SCRIPT = _Script.of(_ADMIT)
_SETTLE_SCRIPT = _Script.of(_SETTLE)
_RENEW_SCRIPT = _Script.of(_RENEW)
_PEEK_SCRIPT = _Script.of(_PEEK)
_BUDGET_SCRIPT = _Script.of(_BUDGET)


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


@dataclass(slots=True, eq=False)
class _Call:
    script: _Script
    command: bytes  # packed
    reply: asyncio.Future[Any]


@dataclass(slots=True, eq=False)
class _Batch:
    """Calls sent together (compared by identity)."""

    calls: list[_Call]


class _Batcher:
    """Sends the script calls made during one event-loop iteration as pipelines.

    `call` queues a call and returns the future of its reply. The first call of a batch starts
    its sender task, which runs once the iteration's other callbacks have run (and have queued
    their calls). A batch holds at most `max_batch` calls: a few pipelines in flight keep Redis
    busy on one while this process packs the next or handles the replies of another (with one
    big batch the two would take turns). A sender writes its batch at once on a pooled
    connection and reads the replies in order (one script's error, NOSCRIPT included, is its
    reply alone); it is bounded by twice the socket timeout as a whole (connect, write, replies,
    script load after NOSCRIPT, the second write), and its failure is every one of its calls'.
    """

    __slots__ = ("_max", "_open", "_redis", "_tasks", "_timeout", "_unsent")

    def __init__(
        self, redis: aioredis.Redis, timeout_s: float, tasks: Tasks, max_batch: int
    ) -> None:
        self._redis = redis
        self._timeout = timeout_s
        self._tasks = tasks
        self._max = max_batch
        self._open: _Batch | None = None  # the batch calls join, until it is full or sent
        self._unsent: set[_Batch] = set()  # batches whose sender has not started yet

    def call(self, script: _Script, args: tuple[str | int, ...]) -> asyncio.Future[Any]:
        """Queue `script` with `args` (numkeys, keys, argv); the future of its reply."""
        reply = asyncio.get_running_loop().create_future()
        batch = self._open
        if batch is None or len(batch.calls) >= self._max:
            batch = self._open = _Batch([])
            self._unsent.add(batch)
            self._tasks.spawn(self._send(batch), "redis-limiter-pipeline")
        batch.calls.append(_Call(script, script.command(args), reply))
        return reply

    def fail_unsent(self) -> None:
        """Fail the calls no sender took (their sender was cancelled before it started)."""
        for batch in self._unsent:
            _fail(batch.calls, RedisConnectionError("the limiter was closed"))
        self._unsent.clear()
        self._open = None

    async def _send(self, batch: _Batch) -> None:
        self._unsent.discard(batch)
        if self._open is batch:
            self._open = None
        calls = batch.calls
        try:
            async with asyncio.timeout(self._timeout * 2):
                replies = await self._execute(calls)
                # The script cache was flushed (a restart, a failover): load and resend once.
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    for script in {calls[i].script for i in missing}:
                        await self._redis.script_load(script.source)
                    again = await self._execute([calls[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except _FAILURES as exc:
            _fail(calls, exc)
            return
        except BaseException:
            _fail(calls, RedisConnectionError("the limiter was closed"))
            raise
        for call, reply in zip(calls, replies, strict=True):
            if call.reply.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)

    async def _execute(self, batch: Sequence[_Call]) -> list[Any]:
        pool = self._redis.connection_pool
        conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            # The client's retry policy (one retry on a connection error: a pooled connection
            # the server closed), applied only before any reply was read.
            result: list[Any] = await conn.retry.call_with_retry(
                lambda: _roundtrip(conn, batch), lambda _error: conn.disconnect()
            )
            return result
        finally:
            await pool.release(conn)


async def _roundtrip(conn: AbstractConnection, batch: Sequence[_Call]) -> list[Any]:
    await conn.send_packed_command([call.command for call in batch], check_health=False)
    replies: list[Any] = []
    for _ in batch:
        try:
            # No timer per reply (math.inf): the sender's timeout bounds the whole batch, and
            # a read cut short (timeout, cancellation) closes the connection.
            replies.append(await conn.read_response(timeout=math.inf))
        except ResponseError as exc:
            replies.append(exc)
        except RedisConnectionError as exc:
            if not replies:
                raise  # retried: nothing of the batch is known to have run
            # Some scripts ran: their callers keep their replies, the others fail (sending the
            # batch again could run scripts twice).
            replies.extend(exc for _ in range(len(batch) - len(replies)))
            break
    return replies


def _fail(calls: Sequence[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.reply.done():
            call.reply.set_exception(exc)


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
        max_batch: int = 8,
    ) -> None:
        """`slot_ttl_s`: how long a concurrency slot outlives its last renewal (renewed every
        third of it); admit's `lease_ttl_s` is for the local fallback only. `max_batch`: the
        most script calls sent in one write (8 measured best at 32 callers on 2 cores: smaller
        costs more syscalls, larger makes Redis and this process take turns)."""
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
        self._tasks = Tasks("redis-limiter")
        self._batcher = _Batcher(self._redis, socket_timeout_s, self._tasks, max_batch)
        # Lease ids: 64 random bits per limiter and a counter (unique across instances
        # without a random draw per request).
        self._lease_ids = map(f"{secrets.token_hex(8)}-{{}}".format, itertools.count())
        self._held: dict[str, Lease] = {}
        self._windows = WindowClock()
        self._renewer: asyncio.Task[None] | None = None
        # Counters (exported as metrics): decisions taken without Redis, Redis errors.
        self.degraded_decisions = 0
        self.redis_errors = 0

    def _keys(self, subject: str) -> tuple[str, str, str, str]:
        tag = f"{self._prefix}:{{{subject}}}"
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:conc", f"{tag}:reqs"

    def _slot_keys(self, lease: Lease) -> tuple[str, ...]:
        """The sorted sets `lease` has a slot in."""
        tag = f"{self._prefix}:{{{lease.subject}}}"
        if lease.stream_slot and lease.request_slot:
            return f"{tag}:conc", f"{tag}:reqs"
        if lease.stream_slot:
            return (f"{tag}:conc",)
        return (f"{tag}:reqs",) if lease.request_slot else ()

    @property
    def redis_up(self) -> bool:
        return time.monotonic() >= self._down_until

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
            slots = spec.concurrent_streams is not None or spec.concurrent_requests is not None
            lease_id = next(self._lease_ids) if slots else ""
            try:
                out = await self._batcher.call(
                    _ADMIT_SCRIPT,
                    (
                        4,
                        *self._keys(subject),
                        spec.requests_per_minute or 0,
                        spec.tokens_per_minute or 0,
                        max(0, tokens),
                        spec.concurrent_streams or 0,
                        lease_id,
                        self._slot_ttl_ms,
                        _PERIOD_MS,
                        spec.concurrent_requests or 0,
                    ),
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
        if lease_id:
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

    async def settle(
        self, lease: Lease | None, subject: str, spec: LimitSpec, delta_tokens: int
    ) -> None:
        if lease is not None and lease.subject != subject:
            # Two subjects are two hash tags (two Cluster slots): two calls.
            await self.release(lease)
            await self.reconcile(subject, spec, delta_tokens)
            return
        await self._settle(lease, subject, spec, delta_tokens, "settle")

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        await self._settle(None, subject, spec, delta_tokens, "reconcile")

    async def release(self, lease: Lease) -> None:
        await self._settle(lease, lease.subject, None, 0, "release")

    async def _settle(
        self,
        lease: Lease | None,
        subject: str,
        spec: LimitSpec | None,
        delta_tokens: int,
        what: str,
    ) -> None:
        """Free `lease`'s slots and reconcile `delta_tokens` of `subject` in one script call.
        The slots are freed in Redis even while it is thought down (a lease taken before an
        outage may still be freed); tokens go to the fallback then, as the fallback admits."""
        slots: tuple[str, ...] = ()
        if lease is not None:
            if lease.backend != self.name:
                self._fallback.release_now(lease)
            elif self._held.pop(lease.lease_id, None) is not None:
                slots = self._slot_keys(lease)
        limit = 0 if spec is None or delta_tokens == 0 else spec.tokens_per_minute or 0
        if limit and spec is not None and not self.redis_up:
            self._fallback.reconcile_now(subject, spec.scaled(self._instances), delta_tokens)
            limit = 0
        if not slots and not limit:
            return
        tpm_key = f"{self._prefix}:{{{subject}}}:tpm"
        lease_id = lease.lease_id if slots and lease is not None else ""
        try:
            await self._batcher.call(
                _SETTLE_SCRIPT,
                (1 + len(slots), tpm_key, *slots, lease_id, limit, delta_tokens, _PERIOD_MS),
            )
        except _FAILURES as exc:
            # Unreleased slots expire on their own within the slot TTL (no longer renewed).
            self._failed(exc, what)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = self._tasks.spawn(self._renew_loop(), "redis-lease-renewer")

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self._slot_ttl_ms / 3000)
            leases = list(self._held.values())
            for start in range(0, len(leases), _RENEW_BATCH):
                calls = [
                    self._batcher.call(
                        _RENEW_SCRIPT,
                        (len(keys), *keys, lease.lease_id, self._slot_ttl_ms),
                    )
                    for lease in leases[start : start + _RENEW_BATCH]
                    if (keys := self._slot_keys(lease))
                ]
                results = await asyncio.gather(*calls, return_exceptions=True)
                failure = next((r for r in results if isinstance(r, BaseException)), None)
                if failure is not None:
                    self._failed(failure, "renew")
                    break

    async def peek(self, subject: str, spec: LimitSpec) -> Standing:
        try:
            out = await self._batcher.call(_PEEK_SCRIPT, (4, *self._keys(subject)))
        except _FAILURES as exc:
            self._failed(exc, "peek")
            local = self._fallback.peek_now(subject, spec.scaled(self._instances))
            return Standing(local, "fallback", degraded=True)
        now, rpm_tat, tpm_tat, streams, requests = (int(v) for v in out)
        usage: list[Usage] = []
        for name, limit, tat in (
            ("rpm", spec.requests_per_minute, rpm_tat),
            ("tpm", spec.tokens_per_minute, tpm_tat),
        ):
            if limit is not None:
                interval = _PERIOD_MS / limit
                ahead = max(0, tat - now)
                remaining = max(0, math.floor((_PERIOD_MS - ahead + 0.001) / interval))
                usage.append(Usage(name, limit, min(limit, remaining), ahead / 1000))
        for name, limit, held in (
            ("concurrency", spec.concurrent_streams, streams),
            ("requests", spec.concurrent_requests, requests),
        ):
            if limit is not None:
                usage.append(Usage(name, limit, max(0, limit - held), 0.0))
        return Standing(tuple(usage), self.name)

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        now = time.time()
        windows = at if at is not None else self._windows.at(now)
        if self.redis_up:
            tag = f"{self._prefix}:{{{subject}}}:bud"
            try:
                out = await self._batcher.call(
                    _BUDGET_SCRIPT,
                    (
                        2,
                        f"{tag}:d:{windows.day}",
                        f"{tag}:m:{windows.month}",
                        tokens,
                        cost,
                        int((windows.day_end + WINDOW_GRACE_S) * 1000),
                        int((windows.month_end + WINDOW_GRACE_S) * 1000),
                    ),
                )
            except _FAILURES as exc:
                self._failed(exc, "budget")
            else:
                tokens_day, cost_day, tokens_month, cost_month = (int(v) for v in out)
                return BudgetState(
                    windows, tokens_day, cost_day, tokens_month, cost_month, self.name, now
                )
        if not self._fail_open:
            raise LimiterUnavailable("the shared limiter (Redis) is unavailable")
        local = self._fallback.budget_now(subject, tokens, cost, at)
        return dataclasses.replace(local, degraded=True, divisor=self._instances)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout * 2):
                return bool(await self._redis.ping())
        except _FAILURES:
            return False

    async def close(self) -> None:
        await self._tasks.cancel()
        self._batcher.fail_unsent()
        await self._redis.aclose()
