"""Tests for gateway.attempts.Planner: the retry rules, driven without a socket.

Each test feeds the planner results (a Failure built from a real verdict, or None for an
answer) and checks the steps it yields, as httpx tests its auth flows: the I/O loop around it
(`Attempts.run`) only sleeps, charges budgets and sends what the planner says. The clock is a
fake one advanced by hand; key health is read and written on the same clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import orjson
import pytest

from gateway.attempts import Fail, Planner, Retry, Sleep, Step, Try
from gateway.config import Runtime, build_runtime, load_config_text
from gateway.config.runtime import Route
from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.keypool import HealthChange, KeyPool, UpstreamKey
from gateway.render import Passthrough
from gateway.retry import Verdict, backoff_s, classify_status, classify_stream_error
from gateway.state import Block
from gateway.upstream import Failure

T0 = 1_700_000_000.0

ENV = {
    "KEY_A": "sk-test-a-0123456789",
    "KEY_B": "sk-test-b-0123456789",
    "KEY_C": "sk-test-c-0123456789",
    "KEY_P": "sk-test-p-0123456789",
    "KEY_Q": "sk-test-q-0123456789",
    "KEY_R": "sk-test-r-0123456789",
    "KEY_S": "sk-test-s-0123456789",
    "KEY_X": "sk-ant-test-x-0123456789",
    "KEY_Y": "sk-ant-test-y-0123456789",
}

# Every provider has its own secrets: health is kept by key fingerprint, so a shared secret
# would share health across providers.
PROVIDERS = """\
providers:
  oa:
    api: openai
    base_url: "http://127.0.0.1:9/v1"
    keys: [{id: a, secret: "${KEY_A}"}, {id: b, secret: "${KEY_B}"}]
    disable_s: 300
  ob:
    api: openai
    base_url: "http://127.0.0.1:10/v1"
    keys: [{id: c, secret: "${KEY_C}"}]
  trio:
    api: openai
    base_url: "http://127.0.0.1:11/v1"
    keys: [{id: p, secret: "${KEY_P}"}, {id: q, secret: "${KEY_Q}"}, {id: r, secret: "${KEY_R}"}]
  solo:
    api: openai
    base_url: "http://127.0.0.1:12/v1"
    keys: [{id: s, secret: "${KEY_S}"}]
    disable_s: 300
  an:
    api: anthropic
    base_url: "http://127.0.0.1:13"
    keys: [{id: x, secret: "${KEY_X}"}, {id: y, secret: "${KEY_Y}"}]
models:
  one: [{provider: oa, model: m1}]
  two: [{provider: oa, model: m1}, {provider: ob, model: m2}]
  three: [{provider: trio, model: m3}]
  single: [{provider: solo, model: m4}]
  single_then_ob: [{provider: solo, model: m4}, {provider: ob, model: m2}]
  ctx: [{provider: oa, model: small}, {provider: ob, model: small}, {provider: oa, model: big}]
  claude: [{provider: an, model: claude-x}]
"""

# No backoff at all: the steps that follow a failure do not depend on the random source.
NO_BACKOFF = "{max_attempts: 3, base_delay_ms: 0, max_delay_ms: 0}"
# A backoff of up to one second: rules that say "at once" are seen to skip it.
SLOW = "{max_attempts: 3, base_delay_ms: 1000, max_delay_ms: 1000}"


class Clock:
    """Epoch seconds, moved only by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def build(retry: str = NO_BACKOFF, providers: str = PROVIDERS) -> Runtime:
    text = f"{providers}policy:\n  retry: {retry}\n"
    return build_runtime(load_config_text(text, env=ENV))


def planner(
    route: Route,
    clock: Clock,
    *,
    seed: int = 0,
    deadline_s: float | None = None,
) -> Planner:
    deadline = clock() + (route.retry.deadline_s if deadline_s is None else deadline_s)
    return Planner(route, deadline, random.Random(seed), clock=clock)


def key(pool: KeyPool, key_id: str) -> UpstreamKey:
    return next(k for k in pool.keys if k.id == key_id)


def states(pool: KeyPool, now: float) -> dict[str, tuple[str, int]]:
    """key id -> (ok | cooldown | disabled, in flight)."""
    return {k.id: (state, n) for k, state, n in pool.key_states(now)}


def upstream(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, now: float = T0
) -> Failure:
    """An upstream's error answer, as `Upstream` reports it: the verdict and the passthrough."""
    headers = headers or {}
    return Failure(classify_status(status, headers, body, now), Passthrough(status, headers, body))


def first_event(error_type: str) -> Failure:
    """A 200 stream whose first event was an error of `error_type`."""
    verdict = classify_stream_error(error_type)
    return Failure(
        verdict, UpstreamFailure(502, Kind.UPSTREAM_ERROR, "first event", reason=verdict.reason)
    )


def openai_error(code: str | None, kind: str, message: str = "") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def tries(step: Step, route: Route, index: int, key_id: str, retry: Retry | None = None) -> Try:
    """`step` is a Try of deployment `index` with key `key_id` (and `retry`)."""
    assert isinstance(step, Try), step
    assert step.index == index
    assert step.deployment is route.deployments[index]
    assert step.lease.key.id == key_id
    assert step.retry == retry
    return step


def fails_with(step: Step, status: int, kind: Kind) -> GatewayError:
    """`step` is a Fail with a GatewayError of the gateway's own."""
    assert isinstance(step, Fail), step
    assert isinstance(step.answer, GatewayError), step.answer
    assert (step.answer.status, step.answer.kind) == (status, kind)
    return step.answer


def sent(p: Planner, step: Step) -> Try:
    """`step` is a Try, sent (its budget admitted it)."""
    assert isinstance(step, Try), step
    p.begin(step)
    return step


def sleep_through(p: Planner, clock: Clock) -> tuple[list[Sleep], Step]:
    """`next()` until it is not a Sleep, advancing the clock by each Sleep."""
    sleeps: list[Sleep] = []
    step = p.next()
    while isinstance(step, Sleep):
        assert len(sleeps) < 10, sleeps
        sleeps.append(step)
        clock.advance(step.seconds)
        step = p.next()
    return sleeps, step


# --- the first attempt ---------------------------------------------------------------------


def test_the_first_attempt_goes_to_deployment_0_with_an_untried_key() -> None:
    rt, clock = build(), Clock()
    route = rt.routes["two"]
    p = planner(route, clock)
    step = tries(p.next(), route, 0, "a")
    assert states(rt.pools["oa"], clock()) == {"a": ("ok", 1), "b": ("ok", 0)}
    assert p.attempts == 0
    assert p.begin(step) == 1
    assert p.attempts == 1


# --- key faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (upstream(401, openai_error("invalid_api_key", "invalid_request_error")), "upstream_401"),
        (upstream(402), "upstream_402"),
        # A 403 that names no type cannot be told apart from a revoked key.
        (upstream(403), "upstream_403"),
        (
            upstream(429, openai_error("insufficient_quota", "insufficient_quota")),
            "quota_exhausted",
        ),
        (first_event("authentication_error"), "first_event_key_error"),
    ],
)
def test_a_key_fault_rotates_to_the_next_key_at_once_and_disables_the_key(
    failure: Failure, reason: str
) -> None:
    rt, clock = build(SLOW), Clock()
    route, pool = rt.routes["one"], rt.pools["oa"]
    p = planner(route, clock)
    first = sent(p, tries(p.next(), route, 0, "a"))
    changes = p.record(first, failure)
    a = key(pool, "a")
    assert changes == [HealthChange("a", a.fingerprint, Block("disabled", T0 + 300, reason, 1))]
    # No backoff (the policy's would be up to a second): the next key at once.
    sent(p, tries(p.next(), route, 0, "b", Retry(reason, 0.0, "oa")))
    assert states(pool, clock()) == {"a": ("disabled", 0), "b": ("ok", 1)}

    # The next request skips the disabled key too, until its re-probe after disable_s.
    clock.advance(299)
    tries(planner(route, clock).next(), route, 0, "b").lease.release()
    clock.advance(1)
    assert states(pool, clock())["a"] == ("ok", 0)


# --- backoff -------------------------------------------------------------------------------

JITTER = "{max_attempts: 6, base_delay_ms: 100, max_delay_ms: 300}"


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (upstream(500), "upstream_500"),
        (upstream(502), "upstream_502"),
        (upstream(503), "upstream_503"),
        (upstream(504), "upstream_504"),
        (upstream(529), "upstream_529"),
        (upstream(408), "upstream_408"),
        (upstream(429), "rate_limited"),
        (
            Failure(
                Verdict(True, "connect_error"),
                UpstreamFailure(502, Kind.UPSTREAM_UNAVAILABLE, "x", reason="connect_error"),
            ),
            "connect_error",
        ),
        (first_event("overloaded_error"), "first_event_overloaded"),
        (first_event("server_error"), "first_event_error"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 7, 42])
def test_a_retryable_failure_backs_off_with_full_jitter(
    failure: Failure, reason: str, seed: int
) -> None:
    rt, clock = build(JITTER), Clock()
    route = rt.routes["one"]
    p = planner(route, clock, seed=seed)
    p.record(sent(p, tries(p.next(), route, 0, "a")), failure)
    expected = backoff_s(1, 0.1, 0.3, random.Random(seed))
    assert 0.0 <= expected <= 0.1  # the first retry: [0, base]
    sleeps, step = sleep_through(p, clock)
    assert sleeps[0] == Sleep(expected)
    # The retry rides on the attempt that follows, with the backoff slept (not a wait for the
    # provider's backoff to end that came after it).
    tries(step, route, 0, "b", Retry(reason, expected, "oa"))


@pytest.mark.parametrize("seed", [0, 3, 99])
def test_the_backoff_ceiling_doubles_per_retry_up_to_max_delay(seed: int) -> None:
    rt, clock = build(JITTER), Clock()
    route = rt.routes["one"]
    p = planner(route, clock, seed=seed)
    replica = random.Random(seed)
    ceilings = [0.1, 0.2, 0.3, 0.3, 0.3]  # min(max_delay, base * 2^(n-1)) for retry n
    keys = ["a", "b", "a", "b", "a", "b"]  # untried first, then tried ones again
    step = p.next()
    retry = None  # the first attempt retries nothing
    for attempt, ceiling in enumerate(ceilings, start=1):
        failure = upstream(500)
        p.record(sent(p, tries(step, route, 0, keys[attempt - 1], retry)), failure)
        expected = replica.uniform(0.0, ceiling)
        assert 0.0 <= expected <= ceiling
        sleep = p.next()
        assert sleep == Sleep(expected)
        clock.advance(expected)
        step = p.next()
        retry = Retry("upstream_500", expected, "oa")  # the backoff just slept
    last = upstream(502)
    p.record(sent(p, tries(step, route, 0, keys[5], retry)), last)
    assert p.next() == Fail(last)  # max_attempts (6) reached


# --- 429: cooldown until the reset -----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"retry-after": "7"}, {"retry-after-ms": "7000"}, {"x-ratelimit-reset-requests": "7s"}],
)
def test_a_429_with_a_reset_cools_the_key_down_until_it_and_the_next_key_serves(
    headers: dict[str, str],
) -> None:
    rt, clock = build(), Clock()
    route, pool = rt.routes["one"], rt.pools["oa"]
    p = planner(route, clock)
    first = sent(p, tries(p.next(), route, 0, "a"))
    changes = p.record(first, upstream(429, headers=headers))
    a = key(pool, "a")
    assert changes == [
        HealthChange("a", a.fingerprint, Block("cooldown", T0 + 7, "rate_limited", 1))
    ]
    served = sent(p, tries(p.next(), route, 0, "b", Retry("rate_limited", 0.0, "oa")))
    p.record(served, None)
    served.lease.release()
    assert states(pool, clock()) == {"a": ("cooldown", 0), "b": ("ok", 0)}

    # Other requests meanwhile get the other key.
    clock.advance(6.9)
    other = tries(planner(route, clock).next(), route, 0, "b")
    other.lease.release()
    # At the reset the key is back.
    clock.advance(0.1)
    assert states(pool, clock())["a"] == ("ok", 0)


@pytest.mark.parametrize(
    ("status", "reason"), [(429, "rate_limited"), (503, "upstream_503"), (529, "upstream_529")]
)
def test_every_key_cooling_down_briefly_is_waited_for_then_the_key_again(
    status: int, reason: str
) -> None:
    """429: the only key cools down; 503/529: the only provider backs off. Either way the wait
    (3 s) is within max_retry_after_s (60 s)."""
    rt, clock = build(), Clock()
    route = rt.routes["single"]
    p = planner(route, clock)
    p.record(
        sent(p, tries(p.next(), route, 0, "s")), upstream(status, headers={"retry-after": "3"})
    )
    assert p.next() == Sleep(3.0)
    clock.advance(3.0)
    # The wait for the key (or provider) is no backoff: the retry reports none.
    tries(p.next(), route, 0, "s", Retry(reason, 0.0, "solo"))


@pytest.mark.parametrize("seed", [0, 5])
def test_a_backoff_counts_toward_the_wait_for_a_cooling_key(seed: int) -> None:
    rt, clock = build(SLOW), Clock()
    route = rt.routes["single"]
    p = planner(route, clock, seed=seed)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(429, headers={"retry-after": "3"}))
    jitter = backoff_s(1, 1.0, 1.0, random.Random(seed))
    sleeps, step = sleep_through(p, clock)
    assert len(sleeps) == 2
    assert sleeps[0] == Sleep(jitter)
    assert sleeps[1].seconds == pytest.approx(3.0 - jitter)
    assert clock() == pytest.approx(T0 + 3.0)  # the reset, not the reset plus the backoff
    # The retry reports the backoff slept, not the rest of the wait for the key.
    tries(step, route, 0, "s", Retry("rate_limited", jitter, "solo"))


@pytest.mark.parametrize("status", [429, 503])
def test_a_cooldown_longer_than_max_retry_after_fails_503_no_key_usable(status: int) -> None:
    rt, clock = build(), Clock()
    route = rt.routes["single"]
    p = planner(route, clock)
    p.record(
        sent(p, tries(p.next(), route, 0, "s")), upstream(status, headers={"retry-after": "120"})
    )
    error = fails_with(p.next(), 503, Kind.UPSTREAM_UNAVAILABLE)
    assert "No upstream key is usable" in error.message
    assert error.headers == {"retry-after": "120", "retry-after-ms": "120000"}
    assert rt.pools["solo"].in_flight("s") == 0


def test_a_cooldown_longer_than_max_retry_after_fails_over_to_the_next_deployment() -> None:
    rt, clock = build(), Clock()
    route = rt.routes["single_then_ob"]
    p = planner(route, clock)
    first = sent(p, tries(p.next(), route, 0, "s"))
    p.record(first, upstream(429, headers={"retry-after": "120"}))
    tries(p.next(), route, 1, "c", Retry("rate_limited", 0.0, "solo"))


def test_a_cooldown_that_would_end_past_the_deadline_is_not_waited_for() -> None:
    rt, clock = build(), Clock()
    route = rt.routes["single"]
    p = planner(route, clock, deadline_s=10)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(429, headers={"retry-after": "30"}))
    error = fails_with(p.next(), 503, Kind.UPSTREAM_UNAVAILABLE)
    assert error.headers["retry-after"] == "30"


def test_every_key_at_its_concurrency_cap_fails_503_at_once() -> None:
    capped = PROVIDERS.replace(
        '    keys: [{id: s, secret: "${KEY_S}"}]\n',
        '    keys: [{id: s, secret: "${KEY_S}"}]\n    max_concurrent_per_key: 1\n',
    )
    rt, clock = build(providers=capped), Clock()
    route = rt.routes["single"]
    holding = tries(planner(route, clock).next(), route, 0, "s")
    error = fails_with(planner(route, clock).next(), 503, Kind.UPSTREAM_UNAVAILABLE)
    assert "concurrency limit" in error.message
    assert error.headers == {"retry-after": "1"}
    holding.lease.release()
    tries(planner(route, clock).next(), route, 0, "s")


# --- provider backoff ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (upstream(503), "upstream_503"),
        (upstream(529), "upstream_529"),
        (first_event("overloaded_error"), "first_event_overloaded"),
    ],
)
def test_a_provider_backing_off_prefers_the_next_deployment(failure: Failure, reason: str) -> None:
    rt, clock = build(), Clock()
    route, pool = rt.routes["two"], rt.pools["oa"]
    p = planner(route, clock)
    changes = p.record(sent(p, tries(p.next(), route, 0, "a")), failure)
    # The provider backs off (the policy's base delay is 0: the pool's floor, 0.1 s).
    assert changes == [HealthChange("oa", None, Block("backoff", T0 + 0.1, reason, 1))]
    assert pool.provider_blocked_until(clock()) == T0 + 0.1
    # Not key b of the same provider: the next deployment, and no key is burned.
    tries(p.next(), route, 1, "c", Retry(reason, 0.0, "oa"))
    assert states(pool, clock()) == {"a": ("ok", 0), "b": ("ok", 0)}


# --- failures that end the request -----------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        upstream(400, openai_error(None, "invalid_request_error", "messages: required")),
        upstream(404, openai_error("model_not_found", "invalid_request_error")),
        upstream(413),
        upstream(422),
        upstream(500, headers={"x-should-retry": "false"}),
        upstream(503, headers={"x-should-retry": "false"}),
        first_event("invalid_request_error"),
    ],
)
def test_a_non_retryable_failure_fails_at_once_with_that_failure(failure: Failure) -> None:
    rt, clock = build(SLOW), Clock()
    route, pool = rt.routes["two"], rt.pools["oa"]
    p = planner(route, clock)
    assert p.record(sent(p, tries(p.next(), route, 0, "a")), failure) == []
    assert p.next() == Fail(failure)
    assert p.next() == Fail(failure)  # and it stays so
    assert p.attempts == 1
    assert states(pool, clock()) == {"a": ("ok", 0), "b": ("ok", 0)}


def test_max_attempts_reached_fails_with_the_last_failure() -> None:
    rt, clock = build("{max_attempts: 2, base_delay_ms: 0, max_delay_ms: 0}"), Clock()
    route = rt.routes["two"]
    p = planner(route, clock)
    p.record(sent(p, tries(p.next(), route, 0, "a")), upstream(500))
    last = upstream(502, b'{"error":{"message":"bad gateway"}}')
    p.record(sent(p, tries(p.next(), route, 0, "b", Retry("upstream_500", 0.0, "oa"))), last)
    # Deployment 1 is still there, but the attempt budget is spent.
    assert p.next() == Fail(last)
    assert states(rt.pools["oa"], clock()) == {"a": ("ok", 0), "b": ("ok", 0)}


# --- the deadline ----------------------------------------------------------------------------


def test_a_backoff_that_would_cross_the_deadline_fails_with_the_last_failure() -> None:
    seed = 0
    jitter = backoff_s(1, 1.0, 1.0, random.Random(seed))
    assert jitter > 0.5  # the seed is chosen so that the backoff crosses the deadline
    rt, clock = build(SLOW), Clock()
    route = rt.routes["one"]

    p = planner(route, clock, seed=seed, deadline_s=0.5)
    last = upstream(500)
    p.record(sent(p, tries(p.next(), route, 0, "a")), last)
    assert p.next() == Fail(last)

    # The same backoff within the deadline is slept.
    p = planner(route, clock, seed=seed, deadline_s=5)
    p.record(sent(p, tries(p.next(), route, 0, "b")), upstream(500))
    assert p.next() == Sleep(jitter)
    clock.advance(jitter)
    tries(p.next(), route, 0, "a", Retry("upstream_500", jitter, "oa"))


@pytest.mark.parametrize(
    ("route_name", "failure"),
    [
        ("one", upstream(401)),
        ("claude", upstream(403, anthropic_error("permission_error", "not entitled"))),
    ],
)
def test_no_attempt_starts_past_the_deadline_even_without_a_backoff(
    route_name: str, failure: Failure
) -> None:
    """README: `deadline_s`: no attempt starts later than this after the request began. An
    attempt that ended past the deadline with a failure that needs no backoff (a key fault,
    a request-caused 403) must not be followed by another one."""
    rt, clock = build(), Clock()
    route = rt.routes[route_name]
    p = planner(route, clock, deadline_s=10)
    first = sent(p, p.next())
    clock.advance(11)  # the attempt took past the deadline (first-byte timeouts are 30 s)
    p.record(first, failure)
    step = p.next()
    assert isinstance(step, Fail), step
    assert step.answer is failure


def test_no_retry_starts_past_the_deadline_after_a_failure_that_backs_off() -> None:
    """The same with a failure that backs off: an attempt that ended at the deadline is
    followed by no backoff and no attempt, though keys and a deployment are left."""
    rt, clock = build(SLOW), Clock()
    route = rt.routes["two"]
    p = planner(route, clock, deadline_s=10)
    first = sent(p, tries(p.next(), route, 0, "a"))
    clock.advance(10)  # the attempt ended at the deadline
    last = upstream(500)
    p.record(first, last)
    assert p.next() == Fail(last)
    assert states(rt.pools["oa"], clock()) == {"a": ("ok", 0), "b": ("ok", 0)}
    assert rt.pools["ob"].in_flight("c") == 0


# --- provider budgets ------------------------------------------------------------------------


def test_over_budget_on_every_deployment_fails_429_with_retry_after() -> None:
    rt, clock = build(), Clock()
    route = rt.routes["two"]
    p = planner(route, clock)
    first = tries(p.next(), route, 0, "a")
    p.over_budget(first, 2.5)
    assert rt.pools["oa"].in_flight("a") == 0
    second = tries(p.next(), route, 1, "c")
    p.over_budget(second, 1.2)
    assert rt.pools["ob"].in_flight("c") == 0
    error = fails_with(p.next(), 429, Kind.RATE_LIMITED)
    assert error.headers == {"retry-after": "2", "retry-after-ms": "1200"}  # the sooner one
    assert p.attempts == 0


def test_over_budget_on_one_deployment_falls_back_without_counting_an_attempt() -> None:
    rt, clock = build("{max_attempts: 2, base_delay_ms: 0, max_delay_ms: 0}"), Clock()
    route = rt.routes["two"]
    p = planner(route, clock)
    p.over_budget(tries(p.next(), route, 0, "a"), 2.0)
    assert p.attempts == 0
    second = tries(p.next(), route, 1, "c")
    assert p.begin(second) == 1
    p.record(second, upstream(500))
    # Deployment 0 stays skipped for this request: its key c again, as the last attempt.
    third = tries(p.next(), route, 1, "c", Retry("upstream_500", 0.0, "ob"))
    assert p.begin(third) == 2
    p.record(third, None)
    assert rt.pools["oa"].in_flight("a") == 0
    assert rt.pools["ob"].in_flight("c") == 1


@pytest.mark.parametrize("seed", [0, 5])
def test_a_try_refused_by_over_budget_hands_its_retry_to_the_next_try(seed: int) -> None:
    """A Try its provider budget refuses is no attempt: the retry it carried rides on the
    next Try, at once (the backoff was slept already), and on that one only."""
    rt, clock = build(SLOW), Clock()
    route = rt.routes["two"]
    p = planner(route, clock, seed=seed)
    replica = random.Random(seed)
    p.record(sent(p, tries(p.next(), route, 0, "a")), upstream(500))
    jitter = backoff_s(1, 1.0, 1.0, replica)
    assert p.next() == Sleep(jitter)
    clock.advance(jitter)
    retry = Retry("upstream_500", jitter, "oa")
    refused = tries(p.next(), route, 0, "b", retry)
    p.over_budget(refused, 2.0)
    assert rt.pools["oa"].in_flight("b") == 0
    fallback = sent(p, tries(p.next(), route, 1, "c", retry))
    assert p.attempts == 2
    # The next retry is of the fallback's own failure, with its own backoff.
    p.record(fallback, upstream(502))
    jitter = backoff_s(2, 1.0, 1.0, replica)
    assert p.next() == Sleep(jitter)
    clock.advance(jitter)
    last = sent(p, tries(p.next(), route, 1, "c", Retry("upstream_502", jitter, "ob")))
    p.record(last, None)
    last.lease.release()
    assert rt.pools["ob"].in_flight("c") == 0


# --- context length --------------------------------------------------------------------------

CONTEXT_BODIES = [
    openai_error("context_length_exceeded", "invalid_request_error", "too many tokens"),
    anthropic_error("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
    openai_error(None, "BadRequestError", "This model's maximum context length is 4096 tokens."),
]


@pytest.mark.parametrize("body", CONTEXT_BODIES)
def test_a_context_length_400_moves_at_once_to_a_different_upstream_model(body: bytes) -> None:
    rt, clock = build(SLOW), Clock()
    route = rt.routes["ctx"]  # oa/small, ob/small, oa/big
    p = planner(route, clock)
    too_long = upstream(400, body)
    assert p.record(sent(p, tries(p.next(), route, 0, "a")), too_long) == []
    # Not ob/small (the same upstream model), no backoff: oa/big, with a key of its own
    # deployment not tried yet (the pool's rotation hands out b).
    big = tries(p.next(), route, 2, "b", Retry("context_length_exceeded", 0.0, "oa"))
    assert big.deployment.model == "big"
    p.begin(big)
    still_too_long = upstream(400, body)
    p.record(big, still_too_long)
    # No model left that has not said so: the (last) 400 passed through.
    step = p.next()
    assert isinstance(step, Fail), step
    assert step.answer is still_too_long
    assert isinstance(step.answer.answer, Passthrough)
    assert (step.answer.answer.status, step.answer.answer.body) == (400, body)
    assert states(rt.pools["oa"], clock()) == {"a": ("ok", 0), "b": ("ok", 0)}
    assert rt.pools["ob"].in_flight("c") == 0


def test_a_context_length_400_with_no_other_model_is_passed_through() -> None:
    rt, clock = build(SLOW), Clock()
    route = rt.routes["one"]
    p = planner(route, clock)
    too_long = upstream(400, CONTEXT_BODIES[0])
    p.record(sent(p, tries(p.next(), route, 0, "a")), too_long)
    step = p.next()  # not key b: another key of the same model cannot help
    assert isinstance(step, Fail), step
    assert step.answer is too_long
    assert p.attempts == 1


# --- a 403 the request causes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route_name", "provider", "keys", "body"),
    [
        ("claude", "an", ("x", "y"), anthropic_error("permission_error", "beta not enabled")),
        (
            "one",
            "oa",
            ("a", "b"),
            openai_error(
                None, "invalid_request_error", "You are not allowed to sample from this model"
            ),
        ),
    ],
)
def test_a_permission_403_tries_each_other_key_once_then_fails_with_the_403(
    route_name: str, provider: str, keys: tuple[str, str], body: bytes
) -> None:
    rt, clock = build(SLOW), Clock()
    route, pool = rt.routes[route_name], rt.pools[provider]
    first_key, second_key = keys
    p = planner(route, clock)
    denied = upstream(403, body)
    assert p.record(sent(p, tries(p.next(), route, 0, first_key)), denied) == []
    # At once (no backoff), another key; the first stays in rotation for everyone.
    second = sent(p, tries(p.next(), route, 0, second_key, Retry("upstream_403", 0.0, provider)))
    assert states(pool, clock()) == {first_key: ("ok", 0), second_key: ("ok", 1)}
    denied_again = upstream(403, body)
    p.record(second, denied_again)
    # Every key tried (max_attempts would allow a third): the upstream's 403.
    step = p.next()
    assert isinstance(step, Fail), step
    assert step.answer is denied_again
    assert states(pool, clock()) == {first_key: ("ok", 0), second_key: ("ok", 0)}
    # Neither key was disabled: the next request uses them.
    tries(planner(route, clock).next(), route, 0, first_key)


# --- success and leases ----------------------------------------------------------------------


def test_success_clears_key_health_and_the_key_serves_again() -> None:
    rt, clock = build(), Clock()
    route, pool = rt.routes["single"], rt.pools["solo"]
    s = key(pool, "s")
    p = planner(route, clock)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(401))
    assert rt.health.get(s.fingerprint) == Block("disabled", T0 + 300, "upstream_401", 1)
    error = fails_with(p.next(), 503, Kind.UPSTREAM_UNAVAILABLE)
    assert error.headers["retry-after"] == "300"

    # Past disable_s one request re-probes the key; it answers.
    clock.advance(301)
    p = planner(route, clock)
    probe = sent(p, tries(p.next(), route, 0, "s"))
    assert p.record(probe, None) == []
    probe.lease.release()
    assert rt.health.get(s.fingerprint) is None
    # The strike is forgotten: a later fault disables it for disable_s again, not doubled.
    p = planner(route, clock)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(401))
    block = rt.health.get(s.fingerprint)
    assert block == Block("disabled", clock() + 300, "upstream_401", 1)


def test_success_clears_a_provider_backoff_that_has_run_out() -> None:
    rt, clock = build(), Clock()
    route = rt.routes["single"]
    p = planner(route, clock)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(503))
    assert rt.health.get("provider:solo") == Block("backoff", T0 + 0.1, "upstream_503", 1)
    wait = p.next()
    assert isinstance(wait, Sleep), wait
    assert wait.seconds == pytest.approx(0.1)
    clock.advance(wait.seconds)
    served = sent(p, tries(p.next(), route, 0, "s", Retry("upstream_503", 0.0, "solo")))
    p.record(served, None)
    served.lease.release()
    assert rt.health.get("provider:solo") is None


def test_a_failed_attempt_releases_its_lease_and_an_answer_keeps_it() -> None:
    rt, clock = build(), Clock()
    route, pool = rt.routes["one"], rt.pools["oa"]
    p = planner(route, clock)
    failed = sent(p, tries(p.next(), route, 0, "a"))
    assert pool.in_flight("a") == 1
    p.record(failed, upstream(500))
    assert pool.in_flight("a") == 0
    answered = sent(p, tries(p.next(), route, 0, "b", Retry("upstream_500", 0.0, "oa")))
    p.record(answered, None)
    # Held while the answer is delivered (a per-key cap counts a stream until it ends).
    assert states(pool, clock()) == {"a": ("ok", 0), "b": ("ok", 1)}
    answered.lease.release()
    answered.lease.release()  # idempotent
    assert states(pool, clock()) == {"a": ("ok", 0), "b": ("ok", 0)}


# --- key order -------------------------------------------------------------------------------


def test_keys_tried_in_this_request_are_preferred_last() -> None:
    rt, clock = build("{max_attempts: 5, base_delay_ms: 0, max_delay_ms: 0}"), Clock()
    route = rt.routes["three"]
    p = planner(route, clock)
    used = []
    step = p.next()
    for _ in range(4):
        step = sent(p, step)
        used.append(step.lease.key.id)
        p.record(step, upstream(500))
        step = p.next()
    # Each key once before any key twice (the order among untried keys is the pool's
    # rotation); then the tried ones again.
    assert sorted(used[:3]) == ["p", "q", "r"]
    assert used == ["p", "r", "q", "p"]


def test_keys_of_a_deployment_are_tried_before_the_next_deployment_and_tried_keys_last() -> None:
    rt, clock = build("{max_attempts: 4, base_delay_ms: 0, max_delay_ms: 0}"), Clock()
    route = rt.routes["two"]
    p = planner(route, clock)
    used = []
    step = p.next()
    for _ in range(4):
        step = sent(p, step)
        used.append((step.index, step.lease.key.id))
        last = upstream(500)
        p.record(step, last)
        step = p.next()
    assert used == [(0, "a"), (0, "b"), (1, "c"), (0, "a")]
    assert step == Fail(last)


# --- a Fail is not a retry -------------------------------------------------------------------


def _long_cooldown(rt: Runtime, clock: Clock) -> Planner:
    route = rt.routes["single"]
    p = planner(route, clock)
    p.record(sent(p, p.next()), upstream(429, headers={"retry-after": "120"}))
    return p


def _every_key_denied(rt: Runtime, clock: Clock) -> Planner:
    p = planner(rt.routes["claude"], clock)
    body = anthropic_error("permission_error", "not entitled")
    for _ in range(2):
        p.record(sent(p, p.next()), upstream(403, body))
    return p


def _no_other_model(rt: Runtime, clock: Clock) -> Planner:
    p = planner(rt.routes["one"], clock)
    p.record(sent(p, p.next()), upstream(400, CONTEXT_BODIES[0]))
    return p


@pytest.mark.parametrize("scenario", [_long_cooldown, _every_key_denied, _no_other_model])
def test_a_fail_step_carries_no_retry(scenario: Callable[[Runtime, Clock], Planner]) -> None:
    """`Retry` is "the step after a failed attempt is a retry of it"; `Attempts.run` reports
    it (llm_gateway_retries_total: "failed attempts that were followed by another", the
    access log's retry_reasons, a `gateway.retry` span event announcing attempt N+1). A Fail
    is followed by no attempt, so it must not carry one."""
    rt, clock = build(), Clock()
    p = scenario(rt, clock)
    step = p.next()
    assert isinstance(step, Fail), step
    assert not hasattr(step, "retry")


# --- retry-after on a status that touches no key health -------------------------------------


@pytest.mark.parametrize("status", [500, 502, 504, 408])
def test_a_retry_after_on_a_5xx_is_honoured_before_the_next_attempt(status: int) -> None:
    """README: retry-after(-ms) and reset headers are honoured up to max_retry_after_s. A
    500/502 (no key cooldown, no provider backoff) that asks for 2 s: the next attempt on
    the only key should not start sooner."""
    rt, clock = build(JITTER), Clock()
    route = rt.routes["single"]
    p = planner(route, clock)
    failure = upstream(status, headers={"retry-after": "2"})
    assert failure.verdict.wait_s == 2.0
    p.record(sent(p, tries(p.next(), route, 0, "s")), failure)
    sleeps, step = sleep_through(p, clock)
    # The retry-after (longer than any jittered backoff, at most 0.1 s) is the backoff.
    assert sleeps == [Sleep(2.0)]
    tries(step, route, 0, "s", Retry(f"upstream_{status}", 2.0, "solo"))
    assert clock() - T0 >= 2.0


def test_a_retry_after_of_exactly_max_retry_after_s_is_honoured() -> None:
    rt, clock = build(JITTER), Clock()
    route = rt.routes["single"]
    assert route.retry.max_retry_after_s == 60
    p = planner(route, clock)
    p.record(sent(p, tries(p.next(), route, 0, "s")), upstream(500, headers={"retry-after": "60"}))
    sleeps, step = sleep_through(p, clock)
    assert sleeps == [Sleep(60.0)]
    tries(step, route, 0, "s", Retry("upstream_500", 60.0, "solo"))


@pytest.mark.parametrize("retry_after", ["61", "3600"])
@pytest.mark.parametrize("status", [500, 502, 504, 408])
@pytest.mark.parametrize("seed", [0, 7])
def test_a_retry_after_longer_than_max_retry_after_s_adds_no_wait(
    retry_after: str, status: int, seed: int
) -> None:
    """Longer than max_retry_after_s (60 s): not waited for, and not waited for in part
    either; the jittered backoff alone comes before the next attempt."""
    rt, clock = build(JITTER), Clock()
    route = rt.routes["single"]
    p = planner(route, clock, seed=seed)
    failure = upstream(status, headers={"retry-after": retry_after})
    assert failure.verdict.wait_s == float(retry_after) > route.retry.max_retry_after_s
    p.record(sent(p, tries(p.next(), route, 0, "s")), failure)
    jitter = backoff_s(1, 0.1, 0.3, random.Random(seed))
    assert 0.0 < jitter <= 0.1
    sleeps, step = sleep_through(p, clock)
    assert sleeps == [Sleep(jitter)]
    tries(step, route, 0, "s", Retry(f"upstream_{status}", jitter, "solo"))
    assert clock() == T0 + jitter


def test_a_retry_after_that_would_cross_the_deadline_fails_with_the_last_failure() -> None:
    """Honoured (within max_retry_after_s) like a backoff: one that would end past the
    deadline is not slept."""
    rt, clock = build(JITTER), Clock()
    route = rt.routes["single"]
    p = planner(route, clock, deadline_s=5)
    last = upstream(500, headers={"retry-after": "10"})
    p.record(sent(p, tries(p.next(), route, 0, "s")), last)
    assert p.next() == Fail(last)
