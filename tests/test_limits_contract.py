"""The Limiter contract, one suite for every backend: MemoryLimiter (with a frozen fake clock),
RedisLimiter on fakeredis and RedisLimiter on a real redis-server. Then what only the Redis
backend promises: hash-tagged keys, NOSCRIPT reload, lease expiry by score, and (real Redis)
fail-open / fail-closed on an outage and recovery without a rebuild.

Redis backends run the contract with fail_closed, so that a Redis problem raises instead of
being hidden by the local fallback. Timings against a real clock allow small slack.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.limits.base import Decision, Lease, LimiterUnavailable, LimitSpec, Usage
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis import LEASE_TTL_S, RedisLimiter
from tests.support import RedisServer

LEASE_TTL = 30.0  # what admission passes; the Redis backend renews its own (LEASE_TTL_S)
HAS_LUPA = importlib.util.find_spec("lupa") is not None
NO_LUPA = "fakeredis runs Lua (EVAL/EVALSHA) only with lupa installed: needs fakeredis[lua]"


class FakeClock:
    """A frozen clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    kind: str  # "memory" | "fakeredis" | "redis"
    limiter: MemoryLimiter | RedisLimiter
    client: aioredis.Redis | None = None  # raw access to the Redis the limiter uses
    clock: FakeClock | None = None
    fake_server: fakeredis.FakeServer | None = None  # the store behind a fakeredis backend
    server: RedisServer | None = None  # the process behind a real Redis backend

    async def admit(self, subject: str, spec: LimitSpec, tokens: int = 0) -> Decision:
        return await self.limiter.admit(subject, spec, tokens, LEASE_TTL)

    async def wait(self, seconds: float) -> None:
        """Let `seconds` pass on the clock this backend reads."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    def peer(self, **options: Any) -> RedisLimiter:
        """Another instance's limiter on the same Redis (a Redis backend only)."""
        if self.fake_server is not None:
            client = fakeredis.aioredis.FakeRedis(server=self.fake_server)
            return RedisLimiter("redis://unused", client=client, prefix="t", **options)
        assert self.server is not None, "a Redis backend only"
        return RedisLimiter(self.server.url, prefix="t", **options)

    def outage(self) -> None:
        """Redis goes away (a Redis backend only)."""
        if self.fake_server is not None:
            self.fake_server.connected = False
        else:
            assert self.server is not None, "a Redis backend only"
            self.server.stop()


class Elapsed:
    """Real time since it was made: the most a backend's clock can have moved meanwhile (the
    fake clock of the memory backend does not move at all)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


def assert_about(value: float, exact: float, elapsed: Elapsed) -> None:
    """`value` is a wait or reset that was `exact` when `elapsed` started and is seen up to
    `elapsed()` later (so less by then), with 2 ms for Redis's whole-ms rounding."""
    low, high = exact - elapsed() - 0.002, exact + 0.002
    assert low <= value <= high, f"{value} not in [{low:.4f}, {high:.4f}]"


def usage_of(decision: Decision, name: str) -> Usage | None:
    return next((u for u in decision.usage if u.name == name), None)


async def make_backend(request: pytest.FixtureRequest, kind: str) -> Backend:
    if kind == "memory":
        clock = FakeClock()
        return Backend(kind, MemoryLimiter(clock=clock), clock=clock)
    if kind == "fakeredis":
        if not HAS_LUPA:
            pytest.skip(NO_LUPA)
        fake_server = fakeredis.FakeServer()
        client = fakeredis.aioredis.FakeRedis(server=fake_server)
        limiter = RedisLimiter("redis://unused", client=client, fail_open=False, prefix="t")
        return Backend(kind, limiter, client=client, fake_server=fake_server)
    server: RedisServer = request.getfixturevalue("redis_server")
    # A generous timeout: 100 concurrent first connections must not time out (and with
    # fail_closed a timeout would raise rather than fall back silently).
    limiter = RedisLimiter(server.url, socket_timeout_s=2.0, fail_open=False, prefix="t")
    return Backend(kind, limiter, client=aioredis.Redis.from_url(server.url), server=server)


async def close_backend(backend: Backend) -> None:
    await backend.limiter.close()
    if backend.kind == "redis" and backend.client is not None:
        await backend.client.aclose()


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b = await make_backend(request, request.param)
    yield b
    await close_backend(b)


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b = await make_backend(request, request.param)
    yield b
    await close_backend(b)


# --- the contract: every backend -------------------------------------------------------------


async def test_rpm_budget_is_exact(backend: Backend) -> None:
    spec = LimitSpec("t", requests_per_minute=60)
    elapsed = Elapsed()
    for k in range(1, 61):
        decision = await backend.admit("alice", spec)
        assert decision.allowed, k
        assert decision.lease is None
        assert not decision.degraded
        rpm = usage_of(decision, "rpm")
        assert rpm is not None
        assert rpm.limit == 60
        assert 60 - k <= rpm.remaining <= 60 - k + int(elapsed())  # one back a second
    denied = await backend.admit("alice", spec)
    assert not denied.allowed
    assert denied.denied_by == "rpm"
    assert denied.lease is None
    # One second after the first request, less the time these 61 took (well under 0.1 s
    # unless the machine is very busy): within [0.9, 1.01] s.
    assert_about(denied.retry_after_s, 1.0, elapsed)
    assert denied.retry_after_s <= 1.01
    if elapsed() < 0.1:
        assert denied.retry_after_s >= 0.9


async def test_tpm_with_variable_costs(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100)  # 0.6 s a token
    elapsed = Elapsed()
    for cost, left in ((30, 70), (50, 20), (20, 0)):
        decision = await backend.admit("alice", spec, cost)
        assert decision.allowed
        assert decision.reserved_tokens == cost
        tpm = usage_of(decision, "tpm")
        assert tpm is not None
        assert tpm.limit == 100
        assert left <= tpm.remaining <= left + int(elapsed() / 0.6)
        assert usage_of(decision, "rpm") is None
    one = await backend.admit("alice", spec, 1)
    assert (one.allowed, one.denied_by) == (False, "tpm")
    assert_about(one.retry_after_s, 0.6, elapsed)
    ten = await backend.admit("alice", spec, 10)
    assert (ten.allowed, ten.denied_by) == (False, "tpm")
    assert_about(ten.retry_after_s, 6.0, elapsed)
    # A zero-token request (embeddings of nothing) passes a spent tpm budget.
    assert (await backend.admit("alice", spec, 0)).allowed


async def test_a_cost_above_the_tpm_limit_is_clamped(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100)
    fresh = await backend.admit("alice", spec, 250)
    assert fresh.allowed  # a whole budget lets it through
    tpm = usage_of(fresh, "tpm")
    assert tpm is not None
    assert tpm.remaining == 0
    assert 59.99 <= tpm.reset_s <= 60.0
    # With any budget spent it waits until the budget is whole again (not forever).
    elapsed = Elapsed()
    assert (await backend.admit("bob", spec, 1)).allowed
    big = await backend.admit("bob", spec, 250)
    assert (big.allowed, big.denied_by) == (False, "tpm")
    assert_about(big.retry_after_s, 0.6, elapsed)


async def test_reconciling_a_clamped_cost_charges_the_rest(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    spec = LimitSpec("t", tokens_per_minute=100)
    decision = await backend.admit("alice", spec, 250)
    assert decision.allowed
    actual = 250  # what upstream reported; the pipeline reconciles actual - reserved
    await backend.limiter.reconcile("alice", spec, actual - decision.reserved_tokens)
    # 150 tokens of debt on top of an empty budget: the next token waits 151 * 0.6 s.
    nxt = await backend.admit("alice", spec, 1)
    assert not nxt.allowed
    assert nxt.retry_after_s >= 90.0


async def test_a_denial_charges_nothing(backend: Backend) -> None:
    spec = LimitSpec("t", requests_per_minute=10, tokens_per_minute=100)
    assert (await backend.admit("alice", spec, 100)).allowed  # rpm 9 left, tpm spent
    for _ in range(5):
        denied = await backend.admit("alice", spec, 50)
        assert (denied.allowed, denied.denied_by) == (False, "tpm")
    # The five tpm denials took no rpm: 9 zero-token requests pass, the 10th does not.
    for k in range(9):
        assert (await backend.admit("alice", spec, 0)).allowed, k
    assert (await backend.admit("alice", spec, 0)).denied_by == "rpm"

    # An rpm denial takes no tokens.
    spec = LimitSpec("t", requests_per_minute=1, tokens_per_minute=100)
    assert (await backend.admit("bob", spec, 10)).allowed
    assert (await backend.admit("bob", spec, 50)).denied_by == "rpm"
    tpm_only = LimitSpec("t", tokens_per_minute=100)
    assert (await backend.admit("bob", tpm_only, 90)).allowed
    assert (await backend.admit("bob", tpm_only, 1)).denied_by == "tpm"

    # A concurrency denial takes neither requests nor tokens.
    spec = LimitSpec("t", requests_per_minute=3, tokens_per_minute=30, concurrent_streams=1)
    held = await backend.admit("carol", spec, 10)
    assert held.lease is not None
    for _ in range(4):
        assert (await backend.admit("carol", spec, 10)).denied_by == "concurrency"
    await backend.limiter.release(held.lease)
    for _ in range(2):  # 2 requests and 20 tokens left
        ok = await backend.admit("carol", spec, 10)
        assert ok.allowed
        assert ok.lease is not None
        await backend.limiter.release(ok.lease)
    assert (await backend.admit("carol", spec, 0)).denied_by == "rpm"


async def test_concurrency_leases(backend: Backend) -> None:
    spec = LimitSpec("t", concurrent_streams=5)
    leases: list[Lease] = []
    for k in range(5):
        decision = await backend.admit("alice", spec)
        assert decision.allowed
        assert decision.lease is not None
        assert decision.lease.subject == "alice"
        conc = usage_of(decision, "concurrency")
        assert conc is not None
        assert (conc.limit, conc.remaining) == (5, 4 - k)
        leases.append(decision.lease)
    assert len({lease.lease_id for lease in leases}) == 5
    sixth = await backend.admit("alice", spec)
    assert (sixth.allowed, sixth.denied_by, sixth.lease) == (False, "concurrency", None)
    assert sixth.retry_after_s == 1.0

    await backend.limiter.release(leases[0])
    await backend.limiter.release(leases[0])  # a double release is harmless...
    again = await backend.admit("alice", spec)
    assert again.allowed
    assert again.lease is not None
    # ...and frees nothing more.
    assert (await backend.admit("alice", spec)).denied_by == "concurrency"

    for lease in [*leases[1:], again.lease]:
        await backend.limiter.release(lease)
    for _ in range(5):
        assert (await backend.admit("alice", spec)).allowed


async def test_subjects_are_independent(backend: Backend) -> None:
    spec = LimitSpec("t", requests_per_minute=2, tokens_per_minute=10, concurrent_streams=1)
    first = await backend.admit("alice", spec, 10)
    assert first.lease is not None
    assert (await backend.admit("alice", spec, 0)).denied_by == "concurrency"
    bob = await backend.admit("bob", spec, 10)
    assert bob.allowed
    assert bob.lease is not None
    await backend.limiter.release(bob.lease)  # bob's release frees nothing of alice's
    assert (await backend.admit("alice", spec, 0)).denied_by == "concurrency"
    await backend.limiter.release(first.lease)
    assert (await backend.admit("alice", spec, 1)).denied_by == "tpm"
    second = await backend.admit("bob", spec, 0)
    assert second.allowed
    assert second.lease is not None
    await backend.limiter.release(second.lease)
    assert (await backend.admit("bob", spec, 0)).denied_by == "rpm"
    # A subject that only shares a prefix is a different subject.
    assert (await backend.admit("bo", spec, 10)).allowed


async def test_reconcile_refund_lets_more_through(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100)
    assert (await backend.admit("alice", spec, 100)).allowed
    assert (await backend.admit("alice", spec, 40)).denied_by == "tpm"
    await backend.limiter.reconcile("alice", spec, -60)
    assert (await backend.admit("alice", spec, 40)).allowed
    assert (await backend.admit("alice", spec, 30)).denied_by == "tpm"  # 20 left
    # A refund beyond full banks nothing: exactly one whole budget.
    await backend.limiter.reconcile("alice", spec, -1000)
    assert (await backend.admit("alice", spec, 100)).allowed
    assert (await backend.admit("alice", spec, 1)).denied_by == "tpm"
    # Refunding a subject that has no state banks nothing either.
    await backend.limiter.reconcile("bob", spec, -500)
    assert (await backend.admit("bob", spec, 100)).allowed
    assert (await backend.admit("bob", spec, 1)).denied_by == "tpm"


async def test_reconcile_charge_blocks_earlier(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100)
    elapsed = Elapsed()
    assert (await backend.admit("alice", spec, 10)).allowed
    await backend.limiter.reconcile("alice", spec, 80)
    assert (await backend.admit("alice", spec, 10)).allowed
    denied = await backend.admit("alice", spec, 1)
    assert denied.denied_by == "tpm"
    assert_about(denied.retry_after_s, 0.6, elapsed)
    # A charge on a fresh subject counts too; no-ops change nothing.
    await backend.limiter.reconcile("bob", spec, 95)
    await backend.limiter.reconcile("bob", spec, 0)
    await backend.limiter.reconcile("bob", LimitSpec("t", requests_per_minute=5), 50)
    assert (await backend.admit("bob", spec, 5)).allowed
    assert (await backend.admit("bob", spec, 1)).denied_by == "tpm"


async def test_usage_figures(backend: Backend) -> None:
    spec = LimitSpec("t", requests_per_minute=10, tokens_per_minute=1000, concurrent_streams=3)
    elapsed = Elapsed()
    first = await backend.admit("alice", spec, 100)
    assert first.allowed
    assert [u.name for u in first.usage] == ["rpm", "tpm", "concurrency"]
    rpm, tpm, conc = first.usage
    assert (rpm.limit, rpm.remaining) == (10, 9)
    assert rpm.reset_s == pytest.approx(6.0, abs=0.002)  # one request of 6 s
    assert (tpm.limit, tpm.remaining) == (1000, 900)
    assert tpm.reset_s == pytest.approx(6.0, abs=0.002)  # 100 tokens of 0.06 s
    assert (conc.limit, conc.remaining, conc.reset_s) == (3, 2, 0)
    second = await backend.admit("alice", spec, 50)
    assert [u.name for u in second.usage] == ["rpm", "tpm", "concurrency"]
    rpm, tpm, conc = second.usage
    assert rpm.remaining == 8
    assert_about(rpm.reset_s, 12.0, elapsed)
    assert 850 <= tpm.remaining <= 850 + int(elapsed() / 0.06)  # one token per 60 ms
    assert_about(tpm.reset_s, 9.0, elapsed)
    assert conc.remaining == 1
    # Only the configured limits are listed; no limits at all: no figures, no lease.
    only_rpm = await backend.admit("bob", LimitSpec("t", requests_per_minute=5))
    assert [u.name for u in only_rpm.usage] == ["rpm"]
    free = await backend.admit("bob", LimitSpec("t"), 10_000)
    assert (free.allowed, free.usage, free.lease) == (True, (), None)


@pytest.mark.parametrize("denied_by", ["rpm", "tpm", "concurrency"])
async def test_a_denial_reports_the_limit_that_denied(
    backend: Backend, request: pytest.FixtureRequest, denied_by: str
) -> None:
    spec = LimitSpec("t", requests_per_minute=2, tokens_per_minute=100, concurrent_streams=1)
    first = await backend.admit("alice", spec, 10)
    assert first.lease is not None
    if denied_by == "concurrency":
        decision = await backend.admit("alice", spec, 10)
    else:
        await backend.limiter.release(first.lease)
        tokens = 100 if denied_by == "tpm" else 0
        if denied_by == "rpm":
            lease = (await backend.admit("alice", spec, 0)).lease
            assert lease is not None
            await backend.limiter.release(lease)
        decision = await backend.admit("alice", spec, tokens)
    assert decision.denied_by == denied_by
    figure = usage_of(decision, denied_by)
    assert figure is not None
    # What is really left: no requests, no streams; 90 tokens (this request wanted 100).
    assert figure.remaining == (90 if denied_by == "tpm" else 0)


async def test_a_denial_reports_what_is_left_not_what_would_be(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    spec = LimitSpec("t", requests_per_minute=10, tokens_per_minute=100)
    assert (await backend.admit("alice", spec, 100)).allowed
    denied = await backend.admit("alice", spec, 10)
    assert denied.denied_by == "tpm"
    rpm = usage_of(denied, "rpm")
    assert rpm is not None
    assert rpm.remaining == 9


async def test_retry_after_is_honest(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=600)  # 0.1 s a token
    elapsed = Elapsed()
    assert (await backend.admit("alice", spec, 600)).allowed
    denied = await backend.admit("alice", spec, 3)
    assert denied.denied_by == "tpm"
    assert_about(denied.retry_after_s, 0.3, elapsed)
    await backend.wait(denied.retry_after_s + 0.002)
    assert (await backend.admit("alice", spec, 3)).allowed
    assert (await backend.admit("alice", spec, 1)).denied_by == "tpm"


async def test_concurrent_admits_are_atomic(backend: Backend) -> None:
    spec = LimitSpec("t", requests_per_minute=60)
    decisions = await asyncio.gather(*(backend.admit("alice", spec) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 60
    assert {d.denied_by for d in decisions if not d.allowed} == {"rpm"}
    assert not any(d.degraded for d in decisions)

    spec = LimitSpec("t", tokens_per_minute=100, concurrent_streams=5)
    decisions = await asyncio.gather(*(backend.admit("bob", spec, 10) for _ in range(30)))
    leases = [d.lease for d in decisions if d.lease is not None]
    assert len(leases) == 5
    assert sum(d.allowed for d in decisions) == 5
    await asyncio.gather(*(backend.limiter.release(lease) for lease in leases))
    # Concurrency denials charged no tokens: 50 spent, 50 left.
    assert (await backend.admit("bob", spec, 50)).allowed
    assert (await backend.admit("bob", spec, 1)).denied_by == "tpm"


# --- the contract: settle, the end of a request (every backend) -----------------------------


async def test_settle_frees_the_slots_and_reconciles_the_tokens(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100, concurrent_streams=1, concurrent_requests=2)
    held = await backend.admit("alice", spec, 30)
    assert held.lease is not None
    assert (await backend.admit("alice", spec, 0)).denied_by == "concurrency"
    # Used 50 more than reserved: both slots freed and 80 tokens spent, in one call.
    await backend.limiter.settle(held.lease, "alice", spec, 50)
    stream = await backend.admit("alice", spec, 20)
    assert slots_left(stream) == (0, 1)
    assert stream.lease is not None
    await backend.limiter.settle(stream.lease, "alice", spec, 0)
    assert (await backend.admit("alice", spec, 1)).denied_by == "tpm"
    # A refund: the reservation of a request that reached no upstream comes back whole.
    bob = await backend.admit("bob", spec, 100)
    assert bob.lease is not None
    assert (await backend.admit("bob", plain(spec), 1)).denied_by == "tpm"
    await backend.limiter.settle(bob.lease, "bob", spec, -bob.reserved_tokens)
    again = await backend.admit("bob", spec, 100)
    assert slots_left(again) == (0, 1)


async def test_settle_parts_alone_and_twice(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100, concurrent_requests=1)
    first = await backend.admit("alice", plain(spec), 10)
    assert first.lease is not None
    # No lease: a reconcile only (the slot stays taken).
    await backend.limiter.settle(None, "alice", spec, 80)
    assert (await backend.admit("alice", spec, 0)).denied_by == "requests"
    # No tokens to reconcile (0, or no tpm limit): a release only.
    await backend.limiter.settle(first.lease, "alice", LimitSpec("t", concurrent_requests=1), 5)
    second = await backend.admit("alice", spec, 10)
    assert second.lease is not None
    assert (await backend.admit("alice", spec, 0)).denied_by == "requests"
    # Settling the same lease twice frees nothing more (the tokens are charged again, as a
    # second reconcile would be).
    await backend.limiter.settle(second.lease, "alice", spec, 0)
    third = await backend.admit("alice", spec, 0)
    assert third.lease is not None
    await backend.limiter.settle(second.lease, "alice", spec, 0)
    assert (await backend.admit("alice", spec, 0)).denied_by == "requests"
    await backend.limiter.settle(third.lease, "alice", spec, 0)
    assert (await backend.admit("alice", spec, 1)).denied_by == "tpm"  # 10 + 80 + 10 spent


async def test_settle_with_a_lease_of_another_subject(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100, concurrent_streams=1)
    alice = await backend.admit("alice", spec, 0)
    assert alice.lease is not None
    await backend.limiter.settle(alice.lease, "bob", spec, 100)
    assert (await backend.admit("alice", spec, 0)).allowed  # alice's slot was freed...
    assert (await backend.admit("bob", spec, 1)).denied_by == "tpm"  # ...bob was charged


# --- the contract: concurrent requests (every backend) ---------------------------------------


def plain(spec: LimitSpec) -> LimitSpec:
    """The spec admission passes for a non-stream request: it takes no stream slot."""
    return dataclasses.replace(spec, concurrent_streams=None)


def slots_left(decision: Decision) -> tuple[int | None, int | None]:
    """(streams, requests) left as the decision reports them (None = not reported)."""
    streams, requests = usage_of(decision, "concurrency"), usage_of(decision, "requests")
    return (
        None if streams is None else streams.remaining,
        None if requests is None else requests.remaining,
    )


async def test_concurrent_request_slots(backend: Backend) -> None:
    spec = LimitSpec("t", concurrent_requests=3)
    leases: list[Lease] = []
    for k in range(3):
        decision = await backend.admit("alice", spec)
        assert decision.allowed
        assert decision.lease is not None
        assert decision.lease.subject == "alice"
        assert (decision.lease.stream_slot, decision.lease.request_slot) == (False, True)
        assert decision.usage == (Usage("requests", 3, 2 - k, 0),)
        leases.append(decision.lease)
    assert len({lease.lease_id for lease in leases}) == 3
    fourth = await backend.admit("alice", spec)
    assert (fourth.allowed, fourth.denied_by, fourth.lease) == (False, "requests", None)
    assert fourth.retry_after_s == 1.0
    assert fourth.usage == (Usage("requests", 3, 0, 0),)

    await backend.limiter.release(leases[0])
    await backend.limiter.release(leases[0])  # a double release is harmless...
    again = await backend.admit("alice", spec)
    assert again.allowed
    assert again.lease is not None
    assert slots_left(again) == (None, 0)
    # ...and frees nothing more.
    assert (await backend.admit("alice", spec)).denied_by == "requests"

    for lease in [*leases[1:], again.lease]:
        await backend.limiter.release(lease)
    for k in range(3):
        assert slots_left(await backend.admit("alice", spec)) == (None, 2 - k)
    # Another subject has slots of its own.
    assert (await backend.admit("bob", spec)).allowed


async def test_a_stream_takes_a_slot_of_each(backend: Backend) -> None:
    spec = LimitSpec("t", concurrent_streams=2, concurrent_requests=3)
    s1 = await backend.admit("alice", spec)
    assert s1.lease is not None
    assert (s1.lease.stream_slot, s1.lease.request_slot) == (True, True)
    assert [u.name for u in s1.usage] == ["concurrency", "requests"]
    assert s1.usage == (Usage("concurrency", 2, 1, 0), Usage("requests", 3, 2, 0))
    p1 = await backend.admit("alice", plain(spec))
    assert p1.lease is not None
    assert (p1.lease.stream_slot, p1.lease.request_slot) == (False, True)
    assert slots_left(p1) == (None, 1)
    s2 = await backend.admit("alice", spec)
    assert s2.lease is not None
    assert slots_left(s2) == (0, 0)
    # Both full: a stream is denied by the stream limit (checked first), a plain request by
    # the request limit.
    stream = await backend.admit("alice", spec)
    assert (stream.allowed, stream.denied_by, stream.retry_after_s) == (False, "concurrency", 1.0)
    assert stream.usage == (Usage("concurrency", 2, 0, 0),)
    other = await backend.admit("alice", plain(spec))
    assert (other.allowed, other.denied_by, other.retry_after_s) == (False, "requests", 1.0)

    # Releasing a stream frees both of its slots, once.
    await backend.limiter.release(s1.lease)
    await backend.limiter.release(s1.lease)
    s3 = await backend.admit("alice", spec)
    assert s3.lease is not None
    assert slots_left(s3) == (0, 0)
    # Releasing a plain request frees only its request slot.
    await backend.limiter.release(p1.lease)
    assert (await backend.admit("alice", spec)).denied_by == "concurrency"
    p2 = await backend.admit("alice", plain(spec))
    assert p2.lease is not None
    assert slots_left(p2) == (None, 0)

    for lease in (s2.lease, s3.lease, p2.lease):
        await backend.limiter.release(lease)
    assert slots_left(await backend.admit("alice", spec)) == (1, 2)


async def test_a_slot_denial_charges_nothing_else(backend: Backend) -> None:
    # 6 requests, 60 tokens (one back a second), 1 stream, 3 requests in flight.
    spec = LimitSpec(
        "t",
        requests_per_minute=6,
        tokens_per_minute=60,
        concurrent_streams=1,
        concurrent_requests=3,
    )
    elapsed = Elapsed()
    held = await backend.admit("alice", spec, 10)
    assert held.lease is not None
    assert [u.name for u in held.usage] == ["rpm", "tpm", "concurrency", "requests"]
    # A stream denied by the stream limit takes no request slot (nor requests or tokens)...
    for _ in range(3):
        denied = await backend.admit("alice", spec, 10)
        assert denied.denied_by == "concurrency"
        assert [u.name for u in denied.usage] == ["rpm", "tpm", "concurrency"]
        rpm = usage_of(denied, "rpm")
        assert rpm is not None
        assert rpm.remaining == 5
    p1 = await backend.admit("alice", plain(spec), 10)
    p2 = await backend.admit("alice", plain(spec), 10)
    assert slots_left(p2) == (None, 0)
    assert p1.lease is not None
    assert p2.lease is not None
    await backend.limiter.release(held.lease)
    p3 = await backend.admit("alice", plain(spec), 10)
    assert p3.lease is not None
    # ...and one denied by the request limit takes no stream slot (nor requests or tokens).
    for _ in range(3):
        denied = await backend.admit("alice", spec, 10)
        assert denied.denied_by == "requests"
        assert denied.retry_after_s == 1.0
        # What is left without it: the stream slot is still free.
        assert [u.name for u in denied.usage] == ["rpm", "tpm", "concurrency", "requests"]
        assert slots_left(denied) == (1, 0)
    await backend.limiter.release(p1.lease)
    stream = await backend.admit("alice", spec, 10)
    assert stream.lease is not None
    assert slots_left(stream) == (0, 0)
    rpm, tpm = usage_of(stream, "rpm"), usage_of(stream, "tpm")
    assert rpm is not None
    assert tpm is not None
    assert rpm.remaining == 1
    assert 10 <= tpm.remaining <= 10 + int(elapsed())
    for lease in (p2.lease, p3.lease, stream.lease):
        await backend.limiter.release(lease)
    assert (await backend.admit("alice", plain(spec), 10)).allowed  # the 6th request
    assert (await backend.admit("alice", plain(spec), 0)).denied_by == "rpm"


async def test_concurrent_admits_take_at_most_the_request_slots(backend: Backend) -> None:
    spec = LimitSpec("t", tokens_per_minute=100, concurrent_streams=8, concurrent_requests=5)
    decisions = await asyncio.gather(
        *(backend.admit("bob", spec if k % 2 else plain(spec), 10) for k in range(30))
    )
    leases = [d.lease for d in decisions if d.lease is not None]
    assert len(leases) == 5
    assert sum(d.allowed for d in decisions) == 5
    assert {d.denied_by for d in decisions if not d.allowed} == {"requests"}
    await asyncio.gather(*(backend.limiter.release(lease) for lease in leases))
    # The denials charged no tokens: 50 spent, 50 left; every slot is free again.
    last = await backend.admit("bob", spec, 50)
    assert slots_left(last) == (7, 4)
    assert (await backend.admit("bob", spec, 1)).denied_by == "tpm"


async def test_slots_expire_unless_renewed(backend: Backend) -> None:
    """Memory (one process, nothing to renew): a slot lasts the `lease_ttl_s` admission
    passes. Redis: a slot lasts the slot TTL past its last renewal; a live instance renews
    the slots it holds, so only a crashed instance's slots expire."""
    spec = LimitSpec("t", concurrent_streams=2, concurrent_requests=4)
    if backend.kind == "memory":
        assert isinstance(backend.limiter, MemoryLimiter)
        stream = await backend.admit("alice", spec)
        request = await backend.admit("alice", plain(spec))
        await backend.admit("alice", plain(spec))
        assert stream.lease is not None
        assert request.lease is not None
        await backend.wait(LEASE_TTL - 0.001)
        assert (await backend.admit("alice", plain(spec))).allowed  # the 4th slot
        assert (await backend.admit("alice", plain(spec))).denied_by == "requests"
        await backend.wait(0.002)  # the first three are past their TTL
        assert backend.limiter.open_leases("alice", "requests") == 1
        assert backend.limiter.open_leases("alice", "streams") == 0
        assert slots_left(await backend.admit("alice", spec)) == (1, 2)
        return

    ttl = 1.2  # renewed every 0.4 s
    alive = backend.peer(slot_ttl_s=ttl, fail_open=False, socket_timeout_s=2.0)
    crashed = backend.peer(slot_ttl_s=ttl, fail_open=False, socket_timeout_s=2.0)
    client = backend.client
    assert client is not None
    try:
        kept = [
            await alive.admit("alice", spec, 0, LEASE_TTL),
            await alive.admit("alice", plain(spec), 0, LEASE_TTL),
        ]
        lost = [
            await crashed.admit("alice", spec, 0, LEASE_TTL),
            await crashed.admit("alice", plain(spec), 0, LEASE_TTL),
        ]
        assert all(d.lease is not None for d in kept + lost)
    finally:
        await crashed.close()  # a crash: its slots are neither released nor renewed any more
    try:
        assert (await alive.admit("alice", spec, 0, LEASE_TTL)).denied_by == "concurrency"
        assert (await alive.admit("alice", plain(spec), 0, LEASE_TTL)).denied_by == "requests"
        await asyncio.sleep(ttl + 0.3)
        # The crashed instance's slots expired (both of its stream's); the renewed ones did not.
        stream = await alive.admit("alice", spec, 0, LEASE_TTL)
        assert slots_left(stream) == (0, 1)
        request = await alive.admit("alice", plain(spec), 0, LEASE_TTL)
        assert slots_left(request) == (None, 0)
        assert (await alive.admit("alice", plain(spec), 0, LEASE_TTL)).denied_by == "requests"
        ids = [d.lease.lease_id for d in (*kept, stream, request) if d.lease is not None]
        assert {m.decode() for m in await client.zrange("t:{alice}:conc", 0, -1)} == {
            ids[0],
            ids[2],
        }
        assert {m.decode() for m in await client.zrange("t:{alice}:reqs", 0, -1)} == set(ids)
        for d in (*kept, stream, request):
            assert d.lease is not None
            await alive.release(d.lease)
        assert await client.zcard("t:{alice}:conc") == 0
        assert await client.zcard("t:{alice}:reqs") == 0
    finally:
        await alive.close()


def test_scaled_shares_every_limit() -> None:
    """The fail_open fallback's spec: each instance's share of every limit, at least 1."""
    spec = LimitSpec("t", 10, 100, concurrent_streams=4, concurrent_requests=6)
    assert spec.scaled(1) is spec
    assert spec.scaled(2) == LimitSpec("t", 5, 50, concurrent_streams=2, concurrent_requests=3)
    assert spec.scaled(10) == LimitSpec("t", 1, 10, concurrent_streams=1, concurrent_requests=1)
    assert LimitSpec("t", concurrent_requests=5).scaled(2) == LimitSpec("t", concurrent_requests=2)
    assert not LimitSpec("t", concurrent_requests=1).empty
    assert LimitSpec("t").empty


async def test_the_fallback_holds_a_share_of_each_slot_limit(backend: Backend) -> None:
    """What fail_open decides without Redis, and with memory the same spec decided directly:
    with 2 instances, streams 4 / 2 = 2 and requests 6 / 2 = 3."""
    spec = LimitSpec("t", requests_per_minute=100, concurrent_streams=4, concurrent_requests=6)
    limiter: MemoryLimiter | RedisLimiter
    before: Decision | None = None
    if backend.kind == "memory":
        limiter, share, degraded = backend.limiter, spec.scaled(2), False
    else:
        limiter = backend.peer(fail_open=True, instances=2, retry_redis_after_s=60)
        share, degraded = spec, True
        before = await limiter.admit("alice", spec, 0, LEASE_TTL)
        assert (before.allowed, before.degraded) == (True, False)
        backend.outage()
    try:
        decisions = []
        for s in (share, share, share, plain(share), plain(share)):
            decisions.append(await limiter.admit("alice", s, 0, LEASE_TTL))
        assert all(d.degraded == degraded for d in decisions)
        assert [d.denied_by for d in decisions] == [None, None, "concurrency", None, "requests"]
        assert [slots_left(d) for d in decisions] == [
            (1, 2),
            (0, 1),
            (0, None),
            (None, 0),
            (None, 0),
        ]
        assert decisions[4].usage[-1] == Usage("requests", 3, 0, 0)
        assert decisions[4].retry_after_s == 1.0
        leases = [d.lease for d in decisions if d.lease is not None]
        assert len(leases) == 3
        assert {lease.backend for lease in leases} == {"fallback" if degraded else "memory"}
        # Releasing a stream frees both of its slots in the fallback too.
        await limiter.release(leases[0])
        again = await limiter.admit("alice", share, 0, LEASE_TTL)
        assert slots_left(again) == (0, 0)
        assert again.lease is not None
        for lease in [*leases[1:], again.lease]:
            await limiter.release(lease)
        assert slots_left(await limiter.admit("alice", share, 0, LEASE_TTL)) == (1, 2)
        if before is not None:
            assert before.lease is not None
            await limiter.release(before.lease)  # a Redis lease during the outage: no raise
    finally:
        if limiter is not backend.limiter:
            await limiter.close()


# --- Redis only: fakeredis and a real redis-server -------------------------------------------


async def server_ms(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds * 1000 + micros / 1000


async def test_fakeredis_supports_the_lua_the_scripts_use() -> None:
    """TIME, ZADD (XX CH), ZREMRANGEBYSCORE, ZCARD, PEXPIRE, SET PX, GET inside EVAL."""
    if not HAS_LUPA:
        pytest.skip(NO_LUPA)
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    script = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
    local added = redis.call('ZADD', KEYS[1], now + 60000, 'a')
    local changed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + 90000, 'a')
    local absent = redis.call('ZADD', KEYS[1], 'XX', 'CH', now, 'b')
    redis.call('ZADD', KEYS[1], now - 1, 'old')
    local purged = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    local n = redis.call('ZCARD', KEYS[1])
    local exp = redis.call('PEXPIRE', KEYS[1], math.ceil(1234.5 * 2))
    redis.call('SET', KEYS[2], string.format('%.3f', 12.3456), 'PX', math.max(1, 5000))
    return {added, changed, absent, purged, n, exp, redis.call('GET', KEYS[2])}
    """
    try:
        out = await client.eval(script, 2, "z", "s")
        ttl_z, ttl_s = await client.pttl("z"), await client.pttl("s")
        score = await client.zscore("z", "a")
        now = await server_ms(client)
    finally:
        await client.aclose()
    assert out == [1, 1, 0, 1, 1, 1, b"12.346"]
    assert score is not None
    assert score == pytest.approx(now + 90000, abs=1000)  # ZADD XX CH moved it
    assert 2000 < ttl_z <= 2469
    assert 4000 < ttl_s <= 5000


async def test_keys_carry_the_subject_hash_tag(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    spec = LimitSpec("t", requests_per_minute=10, tokens_per_minute=100, concurrent_streams=2)
    assert (await redis_backend.admit("tenant-7:app", spec, 10)).allowed
    keys = sorted(k.decode() for k in await client.keys("*"))
    assert keys == ["t:{tenant-7:app}:conc", "t:{tenant-7:app}:rpm", "t:{tenant-7:app}:tpm"]
    # One Cluster slot for all of a caller's keys: the slot of the tag alone.
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"tenant-7:app")}
    # Every key expires on its own: the TATs when the budget is whole, leases after 2 TTLs.
    assert 0 < await client.pttl("t:{tenant-7:app}:rpm") <= 6000
    assert 0 < await client.pttl("t:{tenant-7:app}:tpm") <= 6000
    assert LEASE_TTL_S * 1000 < await client.pttl("t:{tenant-7:app}:conc") <= LEASE_TTL_S * 2000


async def test_scripts_are_reloaded_after_script_flush(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    limiter = redis_backend.limiter
    assert isinstance(limiter, RedisLimiter)
    spec = LimitSpec("t", requests_per_minute=3, tokens_per_minute=100, concurrent_streams=5)
    assert (await redis_backend.admit("alice", spec, 10)).allowed
    await client.script_flush()
    second = await redis_backend.admit("alice", spec, 10)
    assert second.allowed
    assert not second.degraded
    await client.script_flush()
    await limiter.reconcile("alice", spec, 70)  # the reconcile script is reloaded too
    assert (await redis_backend.admit("alice", spec, 11)).denied_by == "tpm"
    await client.script_flush()
    third = await redis_backend.admit("alice", spec, 10)
    assert third.allowed
    assert (await redis_backend.admit("alice", spec, 0)).denied_by == "rpm"  # state survived
    assert limiter.redis_errors == 0
    assert limiter.degraded_decisions == 0
    assert limiter.redis_up


async def test_a_lease_expires_by_its_score(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    spec = LimitSpec("t", concurrent_streams=2)
    decision = await redis_backend.admit("alice", spec)
    assert decision.lease is not None
    members = await client.zrange("t:{alice}:conc", 0, -1, withscores=True)
    assert [m.decode() for m, _ in members] == [decision.lease.lease_id]
    # Scored by its expiry on the Redis clock: now + LEASE_TTL_S.
    assert members[0][1] == pytest.approx(await server_ms(client) + LEASE_TTL_S * 1000, abs=2000)
    await redis_backend.limiter.release(decision.lease)
    assert await client.zcard("t:{alice}:conc") == 0


async def test_an_expired_lease_is_purged_on_the_next_admit(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    spec = LimitSpec("t", concurrent_streams=1)
    now = await server_ms(client)
    # A live lease of a crashed instance blocks...
    await client.zadd("t:{bob}:conc", {"live": now + 30_000})
    assert (await redis_backend.admit("bob", spec)).denied_by == "concurrency"
    # ...an expired one is dropped by the next admit and frees its slot.
    await client.zadd("t:{alice}:conc", {"crashed": now - 1000})
    decision = await redis_backend.admit("alice", spec)
    assert decision.allowed
    assert decision.lease is not None
    members = await client.zrange("t:{alice}:conc", 0, -1)
    assert [m.decode() for m in members] == [decision.lease.lease_id]


async def test_request_slots_live_in_their_own_hash_tagged_set(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    spec = LimitSpec("t", concurrent_streams=2, concurrent_requests=3)
    stream = await redis_backend.admit("tenant-7:app", spec)
    assert stream.lease is not None
    keys = sorted(k.decode() for k in await client.keys("*"))
    assert keys == ["t:{tenant-7:app}:conc", "t:{tenant-7:app}:reqs"]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"tenant-7:app")}
    now = await server_ms(client)
    for key in keys:
        # One lease id in both sets, scored by its expiry on the Redis clock; the set itself
        # expires after two TTLs.
        members = await client.zrange(key, 0, -1, withscores=True)
        assert [m.decode() for m, _ in members] == [stream.lease.lease_id]
        assert members[0][1] == pytest.approx(now + LEASE_TTL_S * 1000, abs=2000)
        assert LEASE_TTL_S * 1000 < await client.pttl(key) <= LEASE_TTL_S * 2000
    request = await redis_backend.admit("tenant-7:app", plain(spec))
    assert request.lease is not None
    assert await client.zcard("t:{tenant-7:app}:conc") == 1
    assert await client.zcard("t:{tenant-7:app}:reqs") == 2
    # A plain request alone creates no stream set.
    assert (await redis_backend.admit("bob", plain(spec))).allowed
    assert await client.exists("t:{bob}:conc") == 0
    # Release runs a script too, reloaded after a flush like the others.
    await client.script_flush()
    await redis_backend.limiter.release(stream.lease)
    assert await client.zcard("t:{tenant-7:app}:conc") == 0
    assert await client.zcard("t:{tenant-7:app}:reqs") == 1
    await redis_backend.limiter.release(request.lease)
    assert await client.zcard("t:{tenant-7:app}:reqs") == 0
    limiter = redis_backend.limiter
    assert isinstance(limiter, RedisLimiter)
    assert (limiter.redis_errors, limiter.degraded_decisions) == (0, 0)


async def test_renewal_survives_a_script_flush(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    limiter = redis_backend.peer(slot_ttl_s=0.6, fail_open=False, socket_timeout_s=2.0)
    spec = LimitSpec("t", concurrent_streams=1, concurrent_requests=1)
    try:
        held = await limiter.admit("alice", spec, 0, LEASE_TTL)
        assert held.lease is not None
        await client.script_flush()
        await asyncio.sleep(0.9)  # past the TTL: renewed (after a NOSCRIPT reload) meanwhile
        assert (await limiter.admit("alice", spec, 0, LEASE_TTL)).denied_by == "concurrency"
        assert await client.zcard("t:{alice}:reqs") == 1
        assert limiter.redis_errors == 0
        await limiter.release(held.lease)
    finally:
        await limiter.close()


async def test_the_settle_script_is_reloaded_after_script_flush(redis_backend: Backend) -> None:
    client = redis_backend.client
    assert client is not None
    limiter = redis_backend.limiter
    assert isinstance(limiter, RedisLimiter)
    spec = LimitSpec("t", tokens_per_minute=100, concurrent_streams=1, concurrent_requests=1)
    held = await redis_backend.admit("alice", spec, 10)
    assert held.lease is not None
    await client.script_flush()
    await limiter.settle(held.lease, "alice", spec, 80)
    assert await client.zcard("t:{alice}:conc") == 0
    assert await client.zcard("t:{alice}:reqs") == 0
    assert (await redis_backend.admit("alice", spec, 11)).denied_by == "tpm"  # 90 spent
    assert (limiter.redis_errors, limiter.degraded_decisions) == (0, 0)


async def test_a_batch_reloads_every_script_it_lost(redis_backend: Backend) -> None:
    """Admits and settles pipelined together after a flush: each script loaded once more and
    every call answered (none degraded, no error)."""
    client = redis_backend.client
    assert client is not None
    limiter = redis_backend.limiter
    assert isinstance(limiter, RedisLimiter)
    spec = LimitSpec("t", tokens_per_minute=1000, concurrent_streams=20)
    held = [await redis_backend.admit(f"c{k}", spec, 10) for k in range(10)]
    await client.script_flush()
    leases = [d.lease for d in held if d.lease is not None]
    settles = [limiter.settle(lease, lease.subject, spec, -10) for lease in leases]
    admits = [redis_backend.admit(f"c{k}", spec, 10) for k in range(10)]
    results = await asyncio.gather(*settles, *admits)
    decisions = [d for d in results if isinstance(d, Decision)]
    assert len(decisions) == 10
    assert all(d.allowed and not d.degraded for d in decisions)
    assert (limiter.redis_errors, limiter.degraded_decisions) == (0, 0)
    for k, d in enumerate(decisions):
        assert await client.zcard(f"t:{{c{k}}}:conc") == 1  # the first slot was freed
        assert d.lease is not None
        await limiter.release(d.lease)


async def test_an_outage_fails_every_call_of_a_batch(redis_backend: Backend) -> None:
    limiter = redis_backend.peer(fail_open=True, instances=2, retry_redis_after_s=60)
    spec = LimitSpec("t", requests_per_minute=100, concurrent_streams=4)
    try:
        assert not (await limiter.admit("alice", spec, 0, LEASE_TTL)).degraded
        redis_backend.outage()
        start = time.monotonic()
        decisions = await asyncio.gather(
            *(limiter.admit("alice", spec, 0, LEASE_TTL) for _ in range(20))
        )
        assert time.monotonic() - start < 1.0
        assert all(d.degraded for d in decisions)
        assert sum(d.allowed for d in decisions) == 2  # this instance's share of 4 streams
        assert limiter.degraded_decisions == 20
        assert limiter.redis_errors >= 1
    finally:
        await limiter.close()


async def test_calls_still_queued_when_the_limiter_closes_end(redis_backend: Backend) -> None:
    """close() ends every call it finds queued (they fall back, or raise with fail_closed)
    instead of leaving them waiting for a reply that will never come."""
    spec = LimitSpec("t", requests_per_minute=100)
    for fail_open in (True, False):
        limiter = redis_backend.peer(fail_open=fail_open, retry_redis_after_s=60)
        assert (await limiter.admit("alice", spec, 0, LEASE_TTL)).allowed  # connected
        pending = [
            asyncio.create_task(limiter.admit("alice", spec, 0, LEASE_TTL)) for _ in range(3)
        ]
        await asyncio.sleep(0)  # each has queued its call; their sender has not started
        await limiter.close()
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 1)
        if fail_open:
            assert all(isinstance(r, Decision) and r.degraded for r in results), results
        else:
            assert all(isinstance(r, LimiterUnavailable) for r in results), results


async def test_a_cancelled_caller_leaves_its_batch_answered(redis_backend: Backend) -> None:
    limiter = redis_backend.limiter
    assert isinstance(limiter, RedisLimiter)
    spec = LimitSpec("t", requests_per_minute=100)
    tasks = [asyncio.create_task(redis_backend.admit("alice", spec)) for _ in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    first, second, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(second, asyncio.CancelledError)
    assert isinstance(first, Decision)
    assert isinstance(third, Decision)
    assert first.allowed
    assert third.allowed
    assert (limiter.redis_errors, limiter.degraded_decisions) == (0, 0)
    assert (await redis_backend.admit("alice", spec)).allowed


# --- Redis only: an unresponsive Redis (a socket that never answers) -------------------------


async def test_an_unresponsive_redis_is_bounded_by_the_socket_timeout() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    spec = LimitSpec("t", requests_per_minute=10)
    open_ = RedisLimiter(url, socket_timeout_s=0.2, retry_redis_after_s=60)
    closed = RedisLimiter(url, socket_timeout_s=0.2, fail_open=False, retry_redis_after_s=60)
    try:
        start = time.monotonic()
        decision = await open_.admit("alice", spec, 0, LEASE_TTL)
        assert time.monotonic() - start < 1.0
        assert (decision.allowed, decision.degraded) == (True, True)
        assert open_.redis_errors == 1
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await closed.admit("alice", spec, 0, LEASE_TTL)
        assert time.monotonic() - start < 1.0
    finally:
        await open_.close()
        await closed.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


def resp_command(buf: bytes) -> tuple[list[bytes], bytes] | None:
    """The first whole RESP command in `buf` and what follows it (None: not all there yet)."""
    if b"\r\n" not in buf:
        return None
    head, rest = buf.split(b"\r\n", 1)
    items = []
    for _ in range(int(head[1:])):
        if b"\r\n" not in rest:
            return None
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line[1:])
        if len(rest) < size + 2:
            return None
        items.append(rest[:size])
        rest = rest[size + 2 :]
    return items, rest


async def test_a_connection_lost_mid_batch_is_not_sent_again() -> None:
    """A server that answers the first script of a batch and then drops the connection: that
    caller keeps its decision, the others fall back, and the batch is not resent (its first
    script already ran)."""
    scripts: list[list[bytes]] = []

    async def answer_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while data := await reader.read(65536):
            buf += data
            drop = False
            while (parsed := resp_command(buf)) is not None:
                command, buf = parsed
                if command[0].upper() != b"EVALSHA":
                    writer.write(b"+OK\r\n")  # the client's handshake (CLIENT SETINFO)
                elif not scripts:
                    scripts.append(command)
                    writer.write(
                        b"*9\r\n:1\r\n:0\r\n:0\r\n:99\r\n:600\r\n:-1\r\n:0\r\n:-1\r\n:-1\r\n"
                    )
                else:
                    scripts.append(command)
                    drop = True
            await writer.drain()
            if drop:
                break
        writer.close()

    server = await asyncio.start_server(answer_one, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter(
        f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.5, retry_redis_after_s=60
    )
    spec = LimitSpec("t", requests_per_minute=100)
    try:
        decisions = await asyncio.gather(
            *(limiter.admit(f"c{k}", spec, 0, LEASE_TTL) for k in range(3))
        )
        assert [d.degraded for d in decisions] == [False, True, True]
        assert decisions[0].usage == (Usage("rpm", 100, 99, 0.6),)
        assert [c[0].upper() for c in scripts] == [b"EVALSHA"] * 3  # sent once, not twice
        assert limiter.degraded_decisions == 2
    finally:
        await limiter.close()
        server.close()
        await server.wait_closed()


# --- real Redis only: outage, fail_open / fail_closed, recovery ------------------------------


async def test_fail_open_during_an_outage_then_recovery(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(
        redis_server.url, socket_timeout_s=0.2, instances=2, retry_redis_after_s=0.3, prefix="t"
    )
    spec = LimitSpec("t", requests_per_minute=10, concurrent_streams=4)
    try:
        before = await limiter.admit("alice", spec, 0, LEASE_TTL)
        assert (before.allowed, before.degraded) == (True, False)
        assert before.lease is not None

        redis_server.stop()
        decisions = []
        for _ in range(8):
            start = time.monotonic()
            decisions.append(await limiter.admit("alice", spec, 0, LEASE_TTL))
            assert time.monotonic() - start < 1.0  # bounded, never hangs on Redis
        assert all(d.degraded for d in decisions)
        # Each instance enforces its share: concurrency 4 / 2 instances = 2 streams...
        assert sum(d.allowed for d in decisions) == 2
        assert [d.denied_by for d in decisions[2:]] == ["concurrency"] * 6
        for d in decisions:
            if d.lease is not None:
                assert d.lease.backend == "fallback"
                await limiter.release(d.lease)
        # ...and rpm 10 / 2 = 5 requests (2 of them taken above).
        more = []
        for _ in range(4):
            more.append(d := await limiter.admit("alice", spec, 0, LEASE_TTL))
            if d.lease is not None:
                await limiter.release(d.lease)
        assert [d.allowed for d in more] == [True, True, True, False]
        assert more[3].denied_by == "rpm"
        assert limiter.degraded_decisions == 12
        assert limiter.redis_errors >= 1
        # Releasing a Redis lease during the outage does not raise (it expires on its own).
        await limiter.release(before.lease)

        redis_server.start()
        await asyncio.sleep(0.35)  # retry_redis_after_s
        after = await limiter.admit("alice", spec, 0, LEASE_TTL)
        assert (after.allowed, after.degraded) == (True, False)
        assert after.lease is not None
        assert after.lease.backend == "redis"
        assert limiter.degraded_decisions == 12
        assert limiter.redis_up
        await limiter.release(after.lease)
    finally:
        await limiter.close()


async def test_fail_closed_raises_quickly_then_recovers(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(
        redis_server.url, socket_timeout_s=0.2, fail_open=False, retry_redis_after_s=0.3
    )
    spec = LimitSpec("t", requests_per_minute=10)
    try:
        assert (await limiter.admit("alice", spec, 0, LEASE_TTL)).allowed
        redis_server.stop()
        for _ in range(3):  # the first tries Redis, the others skip it for a while
            start = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.admit("alice", spec, 0, LEASE_TTL)
            assert time.monotonic() - start < 1.0
        assert limiter.degraded_decisions == 0
        assert not limiter.redis_up
        # A reconcile during the outage neither raises nor waits.
        start = time.monotonic()
        await limiter.reconcile("alice", LimitSpec("t", tokens_per_minute=100), 10)
        assert time.monotonic() - start < 1.0

        redis_server.start()
        await asyncio.sleep(0.35)
        decision = await limiter.admit("alice", spec, 0, LEASE_TTL)
        assert (decision.allowed, decision.degraded) == (True, False)
    finally:
        await limiter.close()


# --- real Redis only: what a request costs on the wire ---------------------------------------


async def test_settle_is_one_script_call(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    spec = LimitSpec("t", 10, 100, concurrent_streams=2, concurrent_requests=2)
    try:
        warm = await limiter.admit("alice", spec, 30, LEASE_TTL)
        assert warm.lease is not None
        await limiter.settle(warm.lease, "alice", spec, 0)  # both scripts loaded
        decision = await limiter.admit("alice", spec, 30, LEASE_TTL)
        assert decision.lease is not None
        await client.config_resetstat()
        await limiter.settle(decision.lease, "alice", spec, -20)
        stats = await client.info("commandstats")
        # One EVALSHA: both slots freed and the tokens reconciled inside it (commandstats
        # counts the commands a script runs too).
        assert stats["cmdstat_evalsha"]["calls"] == 1
        assert stats["cmdstat_zrem"]["calls"] == 2
        assert stats["cmdstat_set"]["calls"] == 1
        assert await client.zcard("t:{alice}:conc") == 0
        assert await client.zcard("t:{alice}:reqs") == 0
    finally:
        await limiter.close()
        await client.aclose()


async def test_concurrent_calls_share_a_few_connections(redis_server: RedisServer) -> None:
    """32 concurrent admits go out as a few pipelines (8 calls each), not on 32 connections."""
    client = aioredis.Redis.from_url(redis_server.url)
    limiter = RedisLimiter(redis_server.url, fail_open=False, prefix="t", socket_timeout_s=2.0)
    spec = LimitSpec("t", requests_per_minute=1000, concurrent_requests=100)
    try:
        assert (await limiter.admit("warm", spec, 0, LEASE_TTL)).allowed  # the script loaded
        await client.config_resetstat()
        decisions = await asyncio.gather(
            *(limiter.admit(f"c{k % 5}", spec, 0, LEASE_TTL) for k in range(32))
        )
        assert all(d.allowed and not d.degraded for d in decisions)
        stats = await client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 32  # one script call per decision
        # The limiter's connections: every client but this one.
        assert 1 <= len(await client.client_list()) - 1 <= 4
        await asyncio.gather(
            *(limiter.settle(d.lease, d.lease.subject, spec, 0) for d in decisions if d.lease)
        )
        assert len(await client.client_list()) - 1 <= 4
    finally:
        await limiter.close()
        await client.aclose()
