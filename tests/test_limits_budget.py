"""The `Limiter.budget` contract, one suite for MemoryLimiter and RedisLimiter on a real
redis-server; then what only one backend can show: the memory backend's windows rolling over
(its wall clock is injected), the Redis keys (hash tag, expiry), exact totals shared by two
instances under concurrent charges, and the fail_open / fail_closed behaviour of an outage.

The Redis backend runs the contract with fail_closed, so that a Redis problem raises instead
of being hidden by the local fallback. Its windows follow the real UTC clock: figures are read
from the state each call returns, never computed from a clock here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.budget import CHARGE_INTERVAL_S, BudgetMeter, check
from gateway.config.schema import TelemetryConfig
from gateway.errors import GatewayError, Kind
from gateway.limits.base import LimiterUnavailable
from gateway.limits.budget import WINDOW_GRACE_S, BudgetSpec, BudgetState, Windows
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import RedisLimiter
from gateway.providers.base import Usage
from gateway.report import Report
from gateway.telemetry import Telemetry
from tests.support import RedisServer

SPEC = BudgetSpec("t", tokens_per_day=1000, tokens_per_month=5000, cost_per_day=10**9)
DAY = 86400.0


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Wall:
    """A frozen wall clock (unix seconds) that moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    kind: str  # "memory" | "redis"
    limiter: MemoryLimiter | RedisLimiter
    client: aioredis.Redis | None = None  # raw access to the Redis the limiter uses
    server: RedisServer | None = None

    async def charge(self, subject: str, tokens: int, cost: int = 0) -> BudgetState:
        return await self.limiter.budget(subject, SPEC, tokens, cost)

    async def keys(self) -> set[bytes | str]:
        assert self.client is not None, "a Redis backend only"
        return set(await self.client.keys("*"))


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        b = Backend("memory", MemoryLimiter(wall=Wall(utc("2027-01-15T10:00:00"))))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        limiter = RedisLimiter(server.url, socket_timeout_s=2.0, fail_open=False, prefix="t")
        b = Backend("redis", limiter, aioredis.Redis.from_url(server.url), server)
    yield b
    await b.limiter.close()
    if b.client is not None:
        await b.client.aclose()


def figures(state: BudgetState) -> tuple[int, int, int, int]:
    return state.tokens_day, state.cost_day, state.tokens_month, state.cost_month


# --- the contract: every backend -------------------------------------------------------------


async def test_a_read_charges_and_creates_nothing(backend: Backend) -> None:
    state = await backend.charge("alice", 0, 0)
    assert figures(state) == (0, 0, 0, 0)
    assert state.backend == backend.kind
    assert (state.degraded, state.divisor) == (False, 1)
    assert state.windows == Windows.at(state.now)
    assert state.remaining_tokens(SPEC) == 1000
    assert state.remaining_cost(SPEC) == 10**9
    assert state.spent(SPEC) is None
    if backend.client is not None:
        assert await backend.keys() == set()
    assert figures(await backend.charge("alice", 0, 0)) == (0, 0, 0, 0)


async def test_charges_add_up_in_the_day_and_the_month(backend: Backend) -> None:
    assert figures(await backend.charge("alice", 10, 100)) == (10, 100, 10, 100)
    assert figures(await backend.charge("alice", 5, 0)) == (15, 100, 15, 100)
    assert figures(await backend.charge("alice", 0, 7)) == (15, 107, 15, 107)
    state = await backend.charge("alice", 0, 0)
    assert figures(state) == (15, 107, 15, 107)
    assert state.remaining_tokens(SPEC) == 985
    # Another subject is another budget.
    assert figures(await backend.charge("bob", 1, 1)) == (1, 1, 1, 1)
    assert figures(await backend.charge("alice", 0, 0)) == (15, 107, 15, 107)


async def test_negative_charges_refund(backend: Backend) -> None:
    await backend.charge("alice", 50, 5000)
    assert figures(await backend.charge("alice", -20, -1000)) == (30, 4000, 30, 4000)
    # A refund stops at zero (a refund of what the store never got: charges the local
    # fallback took during an outage, sent once Redis is back).
    assert figures(await backend.charge("alice", -40, -5000)) == (0, 0, 0, 0)
    state = await backend.charge("alice", 0, 0)
    assert state.remaining_tokens(SPEC) == 1000
    assert figures(await backend.charge("alice", 7, 1)) == (7, 1, 7, 1)
    # A refund into a window with no charge yet.
    assert figures(await backend.charge("carol", -3, 0)) == (0, 0, 0, 0)


async def test_a_spent_budget_reads_as_spent(backend: Backend) -> None:
    state = await backend.charge("alice", 1000, 0)
    spent = state.spent(SPEC)
    assert spent is not None
    name, wait = spent
    assert name == "tokens_per_day"
    assert 0 < wait <= 86400
    assert wait == state.windows.day_end - state.now


async def test_concurrent_charges_add_up_exactly(backend: Backend) -> None:
    rng = random.Random(7)
    sizes = [(rng.randint(1, 1000), rng.randint(0, 10**6)) for _ in range(300)]
    states = await asyncio.gather(*(backend.charge("alice", t, c) for t, c in sizes))
    total = (sum(t for t, _ in sizes), sum(c for _, c in sizes))
    assert figures(await backend.charge("alice", 0, 0)) == (*total, *total)
    # Each charge saw the running total right after it: all different, the last the total.
    days = [s.tokens_day for s in states]
    assert len(set(days)) == len(days)
    assert max(days) == total[0]
    assert all(s.tokens_day == s.tokens_month and s.cost_day == s.cost_month for s in states)


async def test_a_charge_at_past_windows_goes_to_that_day_and_month(backend: Backend) -> None:
    today = (await backend.charge("alice", 10, 100)).windows
    past = Windows.at(today.day_start - 40 * DAY)  # another day, and another month
    assert past.month != today.month
    state = await backend.limiter.budget("alice", SPEC, 7, 70, at=past)
    assert state.windows == past
    assert figures(state) == (7, 70, 7, 70)  # that day's and month's counters, not today's
    # Today's are untouched.
    now = await backend.charge("alice", 0, 0)
    assert now.windows == today
    assert figures(now) == (10, 100, 10, 100)
    if backend.client is not None:
        assert await backend.client.hgetall(f"t:{{alice}}:bud:d:{today.day}") == {
            b"t": b"10",
            b"c": b"100",
        }


async def test_a_charge_at_yesterday_goes_to_yesterday(backend: Backend) -> None:
    today = (await backend.charge("alice", 10, 100)).windows
    yesterday = Windows.at(today.day_start - 1)
    assert yesterday.day_end == today.day_start
    state = await backend.limiter.budget("alice", SPEC, 5, 50, at=yesterday)
    assert state.windows == yesterday
    # Its month is this one, unless today is the first of a month.
    if yesterday.month == today.month:
        assert figures(state) == (5, 50, 15, 150)
        assert figures(await backend.charge("alice", 0, 0)) == (10, 100, 15, 150)
    else:
        assert figures(state) == (5, 50, 5, 50)
        assert figures(await backend.charge("alice", 0, 0)) == (10, 100, 10, 100)
    # Another subject's yesterday is its own.
    assert figures(await backend.limiter.budget("bob", SPEC, 0, 0, at=yesterday)) == (0, 0, 0, 0)


# --- memory: the windows follow the injected wall clock --------------------------------------


async def test_memory_windows_roll_over_with_the_wall_clock() -> None:
    wall = Wall(utc("2026-12-30T23:59:59"))
    limiter = MemoryLimiter(wall=wall)

    async def charge(tokens: int) -> tuple[str, int, int]:
        s = await limiter.budget("alice", SPEC, tokens, 0)
        return s.windows.day, s.tokens_day, s.tokens_month

    assert await charge(10) == ("2026-12-30", 10, 10)
    wall.now += 1  # midnight: a new day, the same month
    assert await charge(0) == ("2026-12-31", 0, 10)
    assert await charge(5) == ("2026-12-31", 5, 15)
    wall.now = utc("2026-12-31T23:59:59.900")
    assert await charge(1) == ("2026-12-31", 6, 16)
    wall.now = utc("2027-01-01T00:00:00")  # a new year: both windows are new
    assert await charge(0) == ("2027-01-01", 0, 0)
    assert await charge(2) == ("2027-01-01", 2, 2)
    # A clock stepped back charges the window it is in again.
    wall.now = utc("2026-12-31T23:59:00")
    assert await charge(0) == ("2026-12-31", 6, 16)


async def test_memory_leap_day_is_its_own_window() -> None:
    wall = Wall(utc("2028-02-28T12:00:00"))
    limiter = MemoryLimiter(wall=wall)
    await limiter.budget("alice", SPEC, 10, 0)
    wall.now = utc("2028-02-29T12:00:00")
    state = await limiter.budget("alice", SPEC, 3, 0)
    assert (state.windows.day, state.tokens_day, state.tokens_month) == ("2028-02-29", 3, 13)
    wall.now = utc("2028-03-01T00:00:00")
    state = await limiter.budget("alice", SPEC, 0, 0)
    assert (state.windows.month, state.tokens_day, state.tokens_month) == ("2028-03", 0, 0)


async def test_memory_charges_at_yesterday_add_up_after_midnight() -> None:
    wall = Wall(utc("2027-01-15T23:59:30"))
    limiter = MemoryLimiter(wall=wall)
    day1 = (await limiter.budget("alice", SPEC, 10, 1)).windows
    wall.now = utc("2027-01-16T00:00:30")  # a stream's last correction, after midnight
    assert figures(await limiter.budget("alice", SPEC, 3, 0)) == (3, 0, 13, 1)  # today
    state = await limiter.budget("alice", SPEC, 5, 2, at=day1)
    assert state.windows == day1
    assert state.now == wall.now
    assert figures(state) == (15, 3, 18, 3)
    assert figures(await limiter.budget("alice", SPEC, -2, 0, at=day1)) == (13, 3, 16, 3)
    assert figures(await limiter.budget("alice", SPEC, 0, 0, at=day1)) == (13, 3, 16, 3)
    # Today's day saw none of it (the month is the same one).
    today = await limiter.budget("alice", SPEC, 0, 0)
    assert today.windows.day == "2027-01-16"
    assert figures(today) == (3, 0, 16, 3)


# --- real Redis: the keys ----------------------------------------------------------------------


async def expire_at_ms(client: aioredis.Redis, key: str) -> int:
    return int(await client.execute_command("PEXPIRETIME", key))


async def test_redis_keys_are_hash_tagged_and_expire_after_their_window(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    try:
        for subject in ("alice", "key:ab{c"):
            state = await limiter.budget(subject, SPEC, 10, 250)
            w = state.windows
            day_key = f"t:{{{subject}}}:bud:d:{w.day}"
            month_key = f"t:{{{subject}}}:bud:m:{w.month}"
            assert await client.hgetall(day_key) == {b"t": b"10", b"c": b"250"}
            assert await client.hgetall(month_key) == {b"t": b"10", b"c": b"250"}
            # One hash tag: a Redis Cluster keeps both in one slot (one script may touch both).
            assert key_slot(day_key.encode()) == key_slot(month_key.encode())
            # Each expires an hour after its window ends (a clock a little behind still
            # charges it).
            day_expiry = int((w.day_end + WINDOW_GRACE_S) * 1000)
            month_expiry = int((w.month_end + WINDOW_GRACE_S) * 1000)
            assert await expire_at_ms(client, day_key) == day_expiry
            assert await expire_at_ms(client, month_key) == month_expiry
            ttl = await client.pttl(day_key)
            now_ms = time.time() * 1000
            assert day_expiry - now_ms - 5000 <= ttl <= day_expiry - now_ms + 5000
            assert ttl > WINDOW_GRACE_S * 1000
        assert key_slot(b"t:{alice}:bud:d:x") == key_slot(b"alice")
        assert len(await client.keys("*")) == 4
        # A read neither creates keys nor touches their expiry.
        await limiter.budget("dave", SPEC, 0, 0)
        assert len(await client.keys("*")) == 4
        await client.pexpire(day_key, 60_000)
        await limiter.budget("key:ab{c", SPEC, 0, 0)
        assert 0 < await client.pttl(day_key) <= 60_000
        # A charge sets it again.
        await limiter.budget("key:ab{c", SPEC, 1, 0)
        assert await expire_at_ms(client, day_key) == day_expiry
    finally:
        await limiter.close()
        await client.aclose()


async def test_redis_keys_and_their_expiry_follow_at(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    try:
        today = (await limiter.budget("alice", SPEC, 1, 0)).windows
        other = Windows.at(today.day_start + 40 * DAY)  # other windows whose keys still live
        state = await limiter.budget("alice", SPEC, 3, 30, at=other)
        assert state.windows == other
        assert figures(state) == (3, 30, 3, 30)
        day_key = f"t:{{alice}}:bud:d:{other.day}"
        month_key = f"t:{{alice}}:bud:m:{other.month}"
        assert await client.hgetall(day_key) == {b"t": b"3", b"c": b"30"}
        assert await client.hgetall(month_key) == {b"t": b"3", b"c": b"30"}
        assert await expire_at_ms(client, day_key) == int((other.day_end + WINDOW_GRACE_S) * 1000)
        assert await expire_at_ms(client, month_key) == int(
            (other.month_end + WINDOW_GRACE_S) * 1000
        )
        for key in (f"t:{{alice}}:bud:d:{today.day}", f"t:{{alice}}:bud:m:{today.month}"):
            assert await client.hgetall(key) == {b"t": b"1", b"c": b"0"}
        assert len(await client.keys("*")) == 4
        # Read and charged again there.
        assert figures(await limiter.budget("alice", SPEC, 0, 0, at=other)) == (3, 30, 3, 30)
        assert figures(await limiter.budget("alice", SPEC, 2, 0, at=other)) == (5, 30, 5, 30)
        assert figures(await limiter.budget("alice", SPEC, 0, 0)) == (1, 0, 1, 0)
    finally:
        await limiter.close()
        await client.aclose()


async def test_two_instances_share_exact_totals_under_concurrent_charges(
    redis_server: RedisServer,
) -> None:
    a = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    b = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    rng = random.Random(11)
    # 2 x 500: tokens with refunds among them, costs all > 0.
    sizes = [(rng.randint(-50, 2000), rng.randint(1, 10**7)) for _ in range(1000)]
    try:
        states = await asyncio.gather(
            *(
                (a if i % 2 else b).budget("alice", SPEC, tokens, cost)
                for i, (tokens, cost) in enumerate(sizes)
            )
        )
        tokens = sum(t for t, _ in sizes)
        cost = sum(c for _, c in sizes)
        for limiter in (a, b):
            assert figures(await limiter.budget("alice", SPEC, 0, 0)) == (
                tokens,
                cost,
                tokens,
                cost,
            )
        # Every charge went to both windows at once: no reply saw one without the other.
        assert all(s.tokens_day == s.tokens_month and s.cost_day == s.cost_month for s in states)
        # Each reply saw the running total right after its own charge: every cost total is
        # different (no two charges were applied as one), the largest is the sum.
        costs = [s.cost_day for s in states]
        assert len(set(costs)) == len(costs)
        assert max(costs) == cost
        assert {s.backend for s in states} == {"redis"}
    finally:
        await a.close()
        await b.close()


class Recording:
    """A limiter that passes `budget` through and records each state it returns."""

    def __init__(self, inner: RedisLimiter) -> None:
        self.inner = inner
        self.name = inner.name
        self.states: list[BudgetState] = []
        self.calls = 0

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        self.calls += 1
        state = await self.inner.budget(subject, spec, tokens, cost, at)
        self.states.append(state)
        return state


async def until(done: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def test_a_meter_charges_the_shared_store(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    peer = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    spec = BudgetSpec("t", tokens_per_day=100)
    recording = Recording(limiter)

    async def shared() -> int:
        return (await peer.budget("alice", spec, 0, 0)).tokens_day

    try:
        standing = await limiter.budget("alice", spec, 0, 0)
        meter = BudgetMeter(recording, "alice", spec, standing, None, 10)  # type: ignore[arg-type]
        spent: list[bool] = []
        t0 = time.perf_counter()  # the first charge is back after this
        meter.start(lambda: spent.append(True))
        assert meter.count(40, t0) is False  # 10 tokens, in the first charge with the prompt
        await until(lambda: len(recording.states) == 1)
        assert recording.states[0].tokens_day == 20
        await peer.budget("alice", spec, 85, 0)  # another instance's stream: 105 of 100
        # 79 left as far as the meter knows; far from the edge and batched: only counted.
        assert meter.count(4, t0) is False
        await asyncio.sleep(0.01)  # (time for a round trip, were one sent)
        assert (recording.calls, meter.spent, spent) == (1, False, [])
        assert await shared() == 105
        # CHARGE_INTERVAL_S later: charged, and the reply brings the shared figures back.
        assert meter.count(4, time.perf_counter() + CHARGE_INTERVAL_S) is False
        await until(lambda: len(recording.states) == 2)
        assert recording.states[1].tokens_day == 107
        assert spent == [True]
        assert (meter.spent, meter.spent_by) == (True, "tokens")
        assert meter.count(16, t0) is True  # past the edge: charged at once
        await until(lambda: len(recording.states) == 3)
        assert await shared() == 111
        # The upstream says 10 + 12: 4 of the 26 charged are refunded.
        assert await meter.close(Usage(10, 12), complete=True) == (22, 0)
        assert await shared() == 85 + 22
    finally:
        await limiter.close()
        await peer.close()


async def test_a_meter_near_the_edge_does_not_block_the_loop_while_redis_is_down(
    redis_server: RedisServer,
) -> None:
    limiter = RedisLimiter(
        redis_server.url, socket_timeout_s=0.2, fail_open=False, retry_redis_after_s=0.3
    )
    spec = BudgetSpec("t", tokens_per_day=100)
    try:
        standing = await limiter.budget("alice", spec, 90, 0)
        meter = BudgetMeter(limiter, "alice", spec, standing, None, 1)  # 9 left: the edge
        redis_server.stop()
        with pytest.raises(LimiterUnavailable):
            await limiter.budget("alice", spec, 0, 0)  # known down now, for 0.3 s
        meter.start(lambda: None)
        started = time.perf_counter()
        await asyncio.sleep(0)  # one loop turn: the meter's charge fails
        blocked = time.perf_counter() - started
        failures = meter.failures
        assert await meter.close(None, complete=True) == (0, 0)
        assert failures <= 2 and blocked < 0.1, (
            f"{failures} charges tried in one loop turn, the event loop blocked {blocked:.3f} s"
        )
    finally:
        await limiter.close()


# --- real Redis: an outage -------------------------------------------------------------------


async def test_fail_open_falls_back_to_a_local_share(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(
        redis_server.url, socket_timeout_s=0.2, instances=4, retry_redis_after_s=0.3, prefix="t"
    )
    spec = BudgetSpec("t", tokens_per_day=100, cost_per_month=4000)
    try:
        before = await limiter.budget("alice", spec, 10, 0)
        assert (before.backend, before.degraded, before.divisor) == ("redis", False, 1)

        redis_server.stop()
        started = time.monotonic()
        down = await limiter.budget("alice", spec, 0, 0)
        assert time.monotonic() - started < 1.0  # bounded, never hangs on Redis
        assert (down.backend, down.degraded, down.divisor) == ("fallback", True, 4)
        # The local figures start from nothing; each budget is divided among 4 instances.
        assert figures(down) == (0, 0, 0, 0)
        assert down.remaining_tokens(spec) == 25
        assert down.remaining_cost(spec) == 1000
        state = await limiter.budget("alice", spec, 20, 999)
        assert figures(state) == (20, 999, 20, 999)
        assert state.degraded
        assert state.spent(spec) is None
        state = await limiter.budget("alice", spec, 5, 0)
        spent = state.spent(spec)
        assert spent is not None
        assert spent[0] == "tokens_per_day"
        assert state.remaining_cost(spec) == 1
        assert limiter.redis_errors >= 1
        # A charge at other windows goes to the fallback's counters of those windows.
        past = Windows.at(state.windows.day_start - 1)
        at_past = await limiter.budget("alice", spec, 2, 0, at=past)
        assert (at_past.windows, at_past.degraded, at_past.divisor) == (past, True, 4)
        assert at_past.tokens_day == 2
        assert (await limiter.budget("alice", spec, 0, 0)).tokens_day == 25

        redis_server.start()  # an empty Redis (no persistence)
        await asyncio.sleep(0.35)  # retry_redis_after_s
        after = await limiter.budget("alice", spec, 1, 0)
        assert (after.backend, after.degraded, after.divisor) == ("redis", False, 1)
        assert figures(after) == (1, 0, 1, 0)
    finally:
        await limiter.close()


async def test_fail_closed_raises_limiter_unavailable(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(
        redis_server.url, socket_timeout_s=0.2, fail_open=False, retry_redis_after_s=0.3
    )
    spec = BudgetSpec("t", tokens_per_day=100)
    try:
        assert (await limiter.budget("alice", spec, 1, 0)).tokens_day == 1
        redis_server.stop()
        for tokens in (0, 5, -5):  # reads, charges and refunds alike
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.budget("alice", spec, tokens, 0)
            assert time.monotonic() - started < 1.0
        # Admission turns it into a 503 (not a pass, not a 429).
        report = Report(
            started=0.0, started_loop=0.0, request_id="req_t", operation="chat", api="openai"
        )
        with pytest.raises(GatewayError) as caught:
            await check(limiter, "alice", spec, report, Telemetry(TelemetryConfig()))
        assert (caught.value.status, caught.value.kind) == (503, Kind.LIMITER_UNAVAILABLE)
        assert caught.value.headers["retry-after"] == "1"
    finally:
        await limiter.close()
