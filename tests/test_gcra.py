"""Tests for gateway.limits.gcra: the pure GCRA maths, with explicit times.

The bound asserted by the property test: GCRA with emission interval T = period / limit and a
burst tolerance of one whole period admits, over admitted requests i..j (times t_i <= t_j), at
most `limit + (t_j - t_i) / T` units. Proof sketch: each admission raises the TAT by exactly
cost * T from a base >= its own time (so >= t_i from request i on), and an admitted request at
t_j leaves TAT <= t_j + period. Hence sum(cost) * T <= t_j + period - t_i. So any window of
length w holds at most `limit + w / T` admitted units (e.g. at most 2 * limit in one period:
a full burst, then the budget that came back during that period).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.limits.gcra import GcraResult, adjust, gcra

PERIOD = 60.0


def spend(limit: int, n: int, now: float = 0.0, tat: float | None = None) -> float | None:
    """The TAT after `n` unit requests at `now`, asserting every one is allowed."""
    for _ in range(n):
        result = gcra(tat, now, limit, PERIOD, 1)
        assert result.allowed
        tat = result.tat
    return tat


# --- the budget ------------------------------------------------------------------------------


def test_fresh_caller_gets_the_whole_limit_at_once() -> None:
    tat: float | None = None
    for k in range(1, 61):
        result = gcra(tat, 0.0, 60, PERIOD, 1)
        assert result == GcraResult(
            allowed=True, tat=float(k), retry_after=0.0, remaining=60 - k, reset_after=float(k)
        )
        tat = result.tat
    denied = gcra(tat, 0.0, 60, PERIOD, 1)
    assert denied == GcraResult(
        allowed=False, tat=60.0, retry_after=1.0, remaining=0, reset_after=60.0
    )


def test_one_unit_comes_back_every_interval() -> None:
    tat = spend(60, 60)
    half = gcra(tat, 0.5, 60, PERIOD, 1)
    assert not half.allowed
    assert half.retry_after == 0.5
    one = gcra(tat, 1.0, 60, PERIOD, 1)
    assert one.allowed
    assert one.tat == 61.0
    assert one.remaining == 0
    assert one.reset_after == 60.0
    again = gcra(one.tat, 1.0, 60, PERIOD, 1)
    assert not again.allowed
    assert again.retry_after == 1.0
    # Two intervals later, two units (and no more).
    assert gcra(one.tat, 3.0, 60, PERIOD, 2).allowed
    assert not gcra(one.tat, 3.0, 60, PERIOD, 3).allowed


def test_remaining_and_reset_are_exact() -> None:
    # limit 10 per minute: T = 6 s.
    tat = spend(10, 3)
    assert tat == 18.0
    probe = gcra(tat, 0.0, 10, PERIOD, 0)  # a zero-cost request reads the state
    assert (probe.allowed, probe.tat, probe.remaining, probe.reset_after) == (True, 18.0, 7, 18.0)
    later = gcra(tat, 6.0, 10, PERIOD, 0)
    assert (later.remaining, later.reset_after) == (8, 12.0)
    # A partial interval does not give a unit back.
    assert gcra(tat, 11.9, 10, PERIOD, 0).remaining == 8
    assert gcra(tat, 12.0, 10, PERIOD, 0).remaining == 9
    # Once the TAT is in the past, the budget is whole and nothing is left to reset.
    whole = gcra(tat, 100.0, 10, PERIOD, 0)
    assert (whole.remaining, whole.reset_after, whole.tat) == (10, 0.0, 100.0)


def test_a_stale_tat_counts_as_now() -> None:
    result = gcra(-500.0, 0.0, 10, PERIOD, 4)
    assert result.allowed
    assert result.tat == 24.0
    assert result.remaining == 6


def test_retry_after_is_the_exact_time_until_that_cost_fits() -> None:
    tat = spend(10, 10)  # T = 6 s, budget gone
    assert gcra(tat, 0.0, 10, PERIOD, 1).retry_after == 6.0
    assert gcra(tat, 0.0, 10, PERIOD, 3).retry_after == 18.0
    assert gcra(tat, 5.0, 10, PERIOD, 3).retry_after == 13.0
    assert gcra(tat, 18.0, 10, PERIOD, 3).allowed
    assert not gcra(tat, 17.999, 10, PERIOD, 3).allowed


# --- cost clamping ---------------------------------------------------------------------------


def test_a_cost_above_the_limit_is_charged_as_the_limit() -> None:
    fresh = gcra(None, 0.0, 10, PERIOD, 25)
    assert fresh == GcraResult(
        allowed=True, tat=60.0, retry_after=0.0, remaining=0, reset_after=60.0
    )
    # With any budget spent it must wait until the budget is whole again, not forever.
    tat = spend(10, 1)
    denied = gcra(tat, 0.0, 10, PERIOD, 25)
    assert not denied.allowed
    assert denied.retry_after == 6.0
    assert gcra(tat, 6.0, 10, PERIOD, 25).allowed


def test_a_negative_cost_is_free() -> None:
    tat = spend(10, 10)
    result = gcra(tat, 0.0, 10, PERIOD, -5)
    assert result.allowed
    assert result.tat == tat  # no credit either
    assert result.remaining == 0


def test_zero_cost_passes_even_with_no_budget() -> None:
    tat = spend(10, 10)
    assert gcra(tat, 0.0, 10, PERIOD, 0).allowed


# --- adjust: reconciliation ------------------------------------------------------------------


def test_refund_gives_budget_back() -> None:
    # limit 60: T = 1 s. 40 units spent at t=0.
    assert adjust(40.0, 0.0, 60, PERIOD, -10) == 30.0
    assert gcra(30.0, 0.0, 60, PERIOD, 30).allowed
    assert not gcra(30.0, 0.0, 60, PERIOD, 31).allowed


def test_refund_never_banks_beyond_a_full_budget() -> None:
    assert adjust(40.0, 0.0, 60, PERIOD, -100) == 0.0
    assert adjust(None, 5.0, 60, PERIOD, -100) == 5.0
    assert adjust(-50.0, 5.0, 60, PERIOD, -1) == 5.0  # a stale TAT is "now"
    after = adjust(40.0, 0.0, 60, PERIOD, -100)
    assert gcra(after, 0.0, 60, PERIOD, 60).allowed
    assert not gcra(gcra(after, 0.0, 60, PERIOD, 60).tat, 0.0, 60, PERIOD, 1).allowed


def test_charge_blocks_earlier_and_may_go_into_debt() -> None:
    assert adjust(10.0, 0.0, 60, PERIOD, 45) == 55.0
    assert gcra(55.0, 0.0, 60, PERIOD, 5).allowed
    assert not gcra(55.0, 0.0, 60, PERIOD, 6).allowed
    # A charge beyond the budget (the rest of a clamped cost) is debt: paid off with time.
    debt = adjust(60.0, 0.0, 60, PERIOD, 30)
    assert debt == 90.0
    denied = gcra(debt, 0.0, 60, PERIOD, 1)
    assert not denied.allowed
    assert denied.retry_after == 31.0


def test_adjust_by_zero_only_moves_a_stale_tat_to_now() -> None:
    assert adjust(20.0, 0.0, 60, PERIOD, 0) == 20.0
    assert adjust(None, 7.0, 60, PERIOD, 0) == 7.0


# --- float rounding (BUG) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "now"),
    [(7, 12345.678), (9, 31.0), (1000, 0.1)],
)
def test_a_full_budget_at_one_instant_at_any_clock_reading(limit: int, now: float) -> None:
    tat = None
    for _ in range(limit):
        result = gcra(tat, now, limit, PERIOD, 1)
        assert result.allowed, result
        tat = result.tat


def test_a_fresh_caller_may_spend_the_whole_limit_at_any_clock_reading() -> None:
    result = gcra(None, 1.1794429595177256, 1, PERIOD, 1)
    assert result.allowed, result


# --- properties ------------------------------------------------------------------------------

limits = st.integers(min_value=1, max_value=600)
steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=30.0, allow_nan=False, allow_infinity=False),
        st.integers(min_value=-2, max_value=700),
    ),
    min_size=1,
    max_size=60,
)


def stored(tat: float | None, now: float) -> float:
    """The state a TAT stands for at `now` (a missing or stale TAT is "now")."""
    return now if tat is None or tat < now else tat


@settings(max_examples=300, deadline=None)
@given(limit=limits, events=steps, start=st.floats(min_value=0.0, max_value=1e9))
def test_admitted_units_never_exceed_the_gcra_bound(
    limit: int, events: list[tuple[float, int]], start: float
) -> None:
    interval = PERIOD / limit
    tat: float | None = None
    now = start
    admitted: list[tuple[float, int]] = []  # (time, units charged)
    for dt, cost in events:
        now += dt
        result = gcra(tat, now, limit, PERIOD, cost)
        if result.allowed:
            tat = result.tat
            admitted.append((now, max(0, min(cost, limit))))
        else:
            # A denial never changes the state: the TAT it returns is the stored one.
            assert result.tat == stored(tat, now)
            assert result.retry_after > 0
    # Every run of admissions i..j: sum <= limit + (t_j - t_i) / T (see the module docstring),
    # which bounds every window [t, t + w) by limit + w / T. Relative slack for float rounding.
    for i in range(len(admitted)):
        units = 0
        for j in range(i, len(admitted)):
            units += admitted[j][1]
            bound = limit + (admitted[j][0] - admitted[i][0]) / interval
            assert units <= bound + 1e-6 * max(1.0, bound)
    # In particular, one period never holds more than two whole budgets.
    for t0, _ in admitted:
        window = sum(u for t, u in admitted if t0 <= t < t0 + PERIOD)
        assert window <= 2 * limit


# Limits whose interval 60 / limit is a dyadic fraction and times on a 1/1024 s grid: the maths
# is then exact in floats, so these properties test the algorithm, not the rounding (above).
exact_limits = st.sampled_from([1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60]).flatmap(
    lambda d: st.integers(min_value=0, max_value=6).map(lambda j: d * 2**j)
)
exact_times = st.integers(min_value=0, max_value=2**20).map(lambda n: n / 1024)


@settings(max_examples=300, deadline=None)
@given(
    limit=exact_limits,
    used=st.integers(min_value=0, max_value=4000),
    cost=st.integers(min_value=1, max_value=5000),
    now=exact_times,
)
def test_retry_after_is_exact_and_remaining_is_what_passes(
    limit: int, used: int, cost: int, now: float
) -> None:
    tat = spend(limit, min(used, limit), now)
    result = gcra(tat, now, limit, PERIOD, cost)
    if result.allowed:
        assert result.retry_after == 0.0
        tat = result.tat
    else:
        assert result.tat == tat
        assert result.retry_after > 0
        # At exactly retry_after it passes; a tick earlier it does not.
        assert gcra(tat, now + result.retry_after, limit, PERIOD, cost).allowed
        assert not gcra(tat, now + result.retry_after - 1 / 1024, limit, PERIOD, cost).allowed
    # `remaining` units pass at this instant, and not one more; `reset_after` is when the
    # budget is whole again.
    probe = gcra(tat, now, limit, PERIOD, 0)
    if probe.remaining:
        assert gcra(tat, now, limit, PERIOD, probe.remaining).allowed
    if probe.remaining < limit:
        assert not gcra(tat, now, limit, PERIOD, probe.remaining + 1).allowed
    assert gcra(tat, now + probe.reset_after, limit, PERIOD, 0).remaining == limit


@settings(max_examples=200, deadline=None)
@given(
    limit=limits,
    tat=st.one_of(st.none(), st.floats(min_value=-100.0, max_value=200.0)),
    delta=st.integers(min_value=-2000, max_value=2000),
)
def test_adjust_never_goes_below_now(limit: int, tat: float | None, delta: int) -> None:
    now = 50.0
    after = adjust(tat, now, limit, PERIOD, delta)
    assert after >= now
    base = stored(tat, now)
    expected = base + delta * PERIOD / limit
    assert math.isclose(after, max(now, expected), rel_tol=1e-12, abs_tol=1e-9)
    if delta >= 0:
        assert after >= base


@pytest.mark.parametrize(("limit", "now"), [(1, 0.0), (3, 0.0), (60, 0.0), (64, 1024.5)])
def test_a_full_budget_is_exactly_limit_units(limit: int, now: float) -> None:
    tat = spend(limit, limit, now=now)
    assert not gcra(tat, now, limit, PERIOD, 1).allowed
