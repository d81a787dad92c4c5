"""Tests for gateway.keypool health: cooldowns, disables, spend caps, provider backoff, and
health shared by fingerprint across pools."""

from __future__ import annotations

import pytest

from gateway.keypool import (
    HealthChange,
    KeyHealth,
    KeyPool,
    UpstreamKey,
    fingerprint,
)
from gateway.retry import KeyAction, Verdict, classify_status
from gateway.state import Block, MemoryHealthStore

NOW = 1000.0

RATE_LIMITED_NO_RESET = Verdict(True, "rate_limited", KeyAction.COOLDOWN)
BAD_KEY = Verdict(True, "upstream_401", KeyAction.DISABLE)
OVERLOADED = Verdict(True, "upstream_529", provider_backoff=True)


def key(key_id: str, secret: str | None = None) -> UpstreamKey:
    secret = secret or f"sk-secret-{key_id}-0123456789"
    return UpstreamKey(id=key_id, secret=secret, weight=1, fingerprint=fingerprint(secret))


def cooldown(wait_s: float | None) -> Verdict:
    return Verdict(True, "rate_limited", KeyAction.COOLDOWN, wait_s=wait_s)


def make_pool(
    *keys: UpstreamKey,
    store: MemoryHealthStore | None = None,
    policy: KeyHealth | None = None,
    provider: str = "openai",
) -> KeyPool:
    return KeyPool(
        provider,
        keys or (key("a"), key("b")),
        health=store if store is not None else MemoryHealthStore(),
        policy=policy,
    )


def picks(pool: KeyPool, now: float, exclude: frozenset[str] = frozenset()) -> set[str]:
    """The ids `acquire` hands out at `now` over a few attempts (leases released at once)."""
    seen: set[str] = set()
    for _ in range(6):
        got = pool.acquire(now, exclude)
        if got is None:
            break
        seen.add(got.key.id)
        got.release()
    return seen


def states(pool: KeyPool, now: float) -> dict[str, str]:
    return {k.id: state for k, state, _ in pool.key_states(now)}


# --- cooldown --------------------------------------------------------------------------------


def test_cooldown_with_wait_blocks_until_now_plus_wait() -> None:
    a, b = key("a"), key("b")
    store = MemoryHealthStore()
    pool = make_pool(a, b, store=store)
    assert picks(pool, NOW) == {"a", "b"}

    pool.failed(a, cooldown(30.0), NOW)

    assert store.get(a.fingerprint) == Block("cooldown", 1030.0, "rate_limited", 1)
    assert picks(pool, NOW + 29) == {"b"}
    assert pool.acquire(NOW + 29, frozenset({"b"})) is None
    assert pool.usable_keys(NOW + 29) == 1
    assert picks(pool, NOW + 30.001) == {"a", "b"}
    assert pool.usable_keys(NOW + 30.001) == 2
    back = pool.acquire(NOW + 30.001, frozenset({"b"}))
    assert back is not None
    assert back.key.id == "a"


def test_cooldown_from_a_real_429() -> None:
    a = key("a")
    pool = make_pool(a)
    epoch = 1_700_000_000.0
    verdict = classify_status(429, {"retry-after": "30"}, b"", epoch)
    pool.failed(a, verdict, epoch)
    assert pool.acquire(epoch + 29, frozenset()) is None
    assert pool.acquire(epoch + 30.001, frozenset()) is not None


def test_cooldown_without_wait_uses_policy_cooldown() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(cooldown_s=7.0))
    changes = pool.failed(a, cooldown(None), NOW)
    assert changes[0].block.state == "cooldown"
    assert changes[0].block.until == 1007.0
    assert pool.acquire(NOW + 6.999) is None
    assert pool.acquire(NOW + 7.001) is not None


def test_cooldown_with_zero_wait_does_not_block() -> None:
    a = key("a")
    pool = make_pool(a)
    pool.failed(a, cooldown(0.0), NOW)
    assert pool.acquire(NOW) is not None


# --- spend cap (repeated 429s without reset information) -------------------------------------


def test_consecutive_no_reset_429s_disable_the_key_as_spend_cap() -> None:
    a = key("a")
    policy = KeyHealth(cooldown_s=10.0, disable_s=300.0, spend_cap_429s=3)
    pool = make_pool(a, policy=policy)

    first = pool.failed(a, RATE_LIMITED_NO_RESET, NOW)
    assert first[0].block.state == "cooldown"
    assert first[0].block.until == 1010.0
    # each next 429 is the re-probe after the cooldown ended
    second = pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 11)
    assert second[0].block.state == "cooldown"
    assert second[0].block.until == 1021.0
    assert states(pool, NOW + 12) == {"a": "cooldown"}

    third = pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 22)
    assert third[0].block.state == "disabled"
    assert third[0].block.reason == "spend_cap"
    assert third[0].block.until == 1022.0 + 300.0
    assert states(pool, NOW + 23) == {"a": "disabled"}
    assert pool.acquire(NOW + 321.9) is None
    assert pool.acquire(NOW + 322.1) is not None


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_spend_cap_threshold_follows_policy(cap: int) -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(cooldown_s=1.0, spend_cap_429s=cap))
    now = NOW
    for _ in range(cap - 1):
        assert pool.failed(a, RATE_LIMITED_NO_RESET, now)[0].block.state == "cooldown"
        now += 2
    last = pool.failed(a, RATE_LIMITED_NO_RESET, now)[0].block
    assert (last.state, last.reason) == ("disabled", "spend_cap")


def test_a_429_with_reset_in_between_restarts_the_spend_cap_count() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(cooldown_s=1.0, spend_cap_429s=3))
    pool.failed(a, RATE_LIMITED_NO_RESET, NOW)
    pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 2)
    # a rate limit that says when it ends is a genuine rate limit, not a spend cap
    pool.failed(a, cooldown(1.0), NOW + 4)
    assert pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 6)[0].block.state == "cooldown"
    assert pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 8)[0].block.state == "cooldown"
    third = pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 10)[0].block
    assert (third.state, third.reason) == ("disabled", "spend_cap")


def test_success_restarts_the_spend_cap_count() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(cooldown_s=1.0, spend_cap_429s=3))
    pool.failed(a, RATE_LIMITED_NO_RESET, NOW)
    pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 2)
    pool.succeeded(a, NOW + 3)
    assert pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 4)[0].block.state == "cooldown"
    assert pool.failed(a, RATE_LIMITED_NO_RESET, NOW + 6)[0].block.state == "cooldown"


# --- disable ---------------------------------------------------------------------------------


def test_disable_doubles_on_each_failed_reprobe_up_to_the_cap() -> None:
    a = key("a")
    store = MemoryHealthStore()
    policy = KeyHealth(disable_s=100.0, max_disable_s=350.0)
    pool = make_pool(a, store=store, policy=policy)

    now = NOW
    expected_holds = [100.0, 200.0, 350.0, 350.0]  # 400 and 800 are capped
    for strikes, hold in enumerate(expected_holds, start=1):
        block = pool.failed(a, BAD_KEY, now)[0].block
        assert block == Block("disabled", now + hold, "upstream_401", strikes)
        assert store.get(a.fingerprint) == block
        assert pool.acquire(now + hold - 0.001) is None
        assert states(pool, now + hold - 0.001) == {"a": "disabled"}
        # the hold expired: the key is re-probed, and the re-probe fails again
        now += hold + 0.001
        assert pool.acquire(now) is not None
        assert states(pool, now) == {"a": "ok"}


def test_default_policy_disable_holds() -> None:
    a = key("a")
    pool = make_pool(a)  # disable_s=300, max_disable_s=3600
    now = NOW
    holds = []
    for _ in range(6):
        block = pool.failed(a, BAD_KEY, now)[0].block
        holds.append(block.until - now)
        now = block.until + 1
    assert holds == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]


def test_success_clears_the_disable_strikes() -> None:
    a = key("a")
    store = MemoryHealthStore()
    pool = make_pool(a, store=store, policy=KeyHealth(disable_s=100.0, max_disable_s=1000.0))
    pool.failed(a, BAD_KEY, NOW)
    second = pool.failed(a, BAD_KEY, NOW + 101)[0].block
    assert second.until == NOW + 101 + 200
    pool.succeeded(a, NOW + 200)  # a success while it is disabled may predate the disable
    assert store.get(a.fingerprint) == second
    pool.succeeded(a, NOW + 302)  # the re-probe after the disable worked
    assert store.get(a.fingerprint) is None
    assert states(pool, NOW + 302) == {"a": "ok"}
    assert pool.acquire(NOW + 302) is not None
    again = pool.failed(a, BAD_KEY, NOW + 400)[0].block
    assert again == Block("disabled", NOW + 400 + 100, "upstream_401", 1)


def test_a_cooldown_between_disables_restarts_the_doubling() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(disable_s=100.0))
    pool.failed(a, BAD_KEY, NOW)
    pool.failed(a, cooldown(5.0), NOW + 101)
    block = pool.failed(a, BAD_KEY, NOW + 110)[0].block
    assert block.until == NOW + 110 + 100
    assert block.strikes == 1


def test_a_disable_after_a_spend_cap_doubles() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(cooldown_s=1.0, disable_s=100.0, spend_cap_429s=1))
    pool.failed(a, RATE_LIMITED_NO_RESET, NOW)  # spend cap: disabled for 100
    block = pool.failed(a, Verdict(True, "quota_exhausted", KeyAction.DISABLE), NOW + 101)[0].block
    assert block.until == NOW + 101 + 200


def test_concurrent_disables_do_not_escalate_the_hold() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(disable_s=100.0, max_disable_s=3600.0))
    for _ in range(5):  # five requests that were in flight on the revoked key
        pool.failed(a, BAD_KEY, NOW)
    assert pool.acquire(NOW + 100.001) is not None


def test_a_late_cooldown_does_not_shorten_a_disable() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(disable_s=300.0))
    pool.failed(a, BAD_KEY, NOW)
    pool.failed(a, cooldown(1.0), NOW + 0.5)
    assert pool.acquire(NOW + 2) is None
    assert states(pool, NOW + 2) == {"a": "disabled"}


def test_many_failed_reprobes_keep_the_capped_hold() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(disable_s=1.0, max_disable_s=10.0))
    now = NOW
    for _ in range(1100):
        block = pool.failed(a, BAD_KEY, now)[0].block
        assert block.until - now <= 10.0
        now = block.until + 0.5


# --- provider backoff ------------------------------------------------------------------------


def test_provider_backoff_with_wait_uses_the_wait() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(backoff_base_s=1.0, backoff_max_s=30.0))
    assert pool.provider_blocked_until(NOW) is None
    changes = pool.failed(a, Verdict(True, "upstream_503", provider_backoff=True, wait_s=12.0), NOW)
    assert changes == [HealthChange("openai", None, Block("backoff", 1012.0, "upstream_503", 1))]
    assert pool.provider_blocked_until(NOW) == 1012.0
    assert pool.provider_blocked_until(NOW + 11.999) == 1012.0
    assert pool.provider_blocked_until(NOW + 12) is None


def test_provider_backoff_doubles_from_base_and_caps() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(backoff_base_s=2.0, backoff_max_s=5.0))
    now = NOW
    holds = []
    for _ in range(4):
        pool.failed(a, OVERLOADED, now)
        until = pool.provider_blocked_until(now)
        assert until is not None
        holds.append(until - now)
        now = until + 1
    assert holds == [2.0, 4.0, 5.0, 5.0]


def test_provider_backoff_does_not_block_the_key() -> None:
    a, b = key("a"), key("b")
    pool = make_pool(a, b)
    changes = pool.failed(a, OVERLOADED, NOW)
    assert [c.subject for c in changes] == ["openai"]
    assert picks(pool, NOW + 0.1) == {"a", "b"}
    assert states(pool, NOW + 0.1) == {"a": "ok", "b": "ok"}
    assert pool.earliest_unblock(NOW + 0.1) is None


def test_success_clears_the_provider_backoff() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(backoff_base_s=2.0, backoff_max_s=60.0))
    pool.failed(a, OVERLOADED, NOW)
    pool.failed(a, OVERLOADED, NOW + 3)
    assert pool.provider_blocked_until(NOW + 3) == NOW + 3 + 4.0
    pool.succeeded(a, NOW + 7)
    assert pool.provider_blocked_until(NOW + 3) is None
    # strikes are gone too: the next backoff starts from the base again
    pool.failed(a, OVERLOADED, NOW + 10)
    assert pool.provider_blocked_until(NOW + 10) == NOW + 10 + 2.0


def test_success_clears_the_provider_backoff_and_a_cooldown_together() -> None:
    a = key("a")
    store = MemoryHealthStore()
    pool = make_pool(a, store=store)
    both = Verdict(True, "rate_limited", KeyAction.COOLDOWN, provider_backoff=True, wait_s=20.0)
    changes = pool.failed(a, both, NOW)
    assert [(c.subject, c.block.state) for c in changes] == [
        ("a", "cooldown"),
        ("openai", "backoff"),
    ]
    pool.succeeded(a, NOW + 20)
    assert store.entries() == {}


def test_long_provider_outage_keeps_the_capped_backoff() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(backoff_base_s=1.0, backoff_max_s=30.0))
    # Each failure after the previous backoff ran out: the strikes really grow.
    for i in range(1100):
        pool.failed(a, OVERLOADED, NOW + i * 31)
    last = NOW + 1099 * 31
    assert pool.provider_blocked_until(last) == last + 30.0


# --- earliest_unblock, usable_keys, key_states -----------------------------------------------


def test_earliest_unblock_is_the_min_over_blocked_keys() -> None:
    a, b, c = key("a"), key("b"), key("c")
    pool = make_pool(a, b, c, policy=KeyHealth(disable_s=50.0))
    assert pool.earliest_unblock(NOW) is None
    pool.failed(a, cooldown(30.0), NOW)
    pool.failed(b, cooldown(10.0), NOW)
    assert pool.earliest_unblock(NOW) == 1010.0
    assert pool.earliest_unblock(NOW + 10) == 1030.0  # b is back
    assert pool.earliest_unblock(NOW + 30) is None
    pool.failed(c, BAD_KEY, NOW + 40)
    pool.failed(a, cooldown(60.0), NOW + 40)
    assert pool.earliest_unblock(NOW + 40) == 1090.0
    assert pool.usable_keys(NOW + 40) == 1


def test_earliest_unblock_ignores_the_provider_backoff() -> None:
    a = key("a")
    pool = make_pool(a)
    pool.failed(a, OVERLOADED, NOW)
    assert pool.earliest_unblock(NOW) is None


def test_key_states_report_ok_cooldown_disabled_and_in_flight() -> None:
    a, b, c = key("a"), key("b"), key("c")
    pool = make_pool(a, b, c, policy=KeyHealth(disable_s=100.0))
    lease = pool.acquire(NOW, frozenset({"b", "c"}))
    assert lease is not None
    pool.failed(b, cooldown(5.0), NOW)
    pool.failed(c, BAD_KEY, NOW)
    report = [(k.id, state, n) for k, state, n in pool.key_states(NOW + 1)]
    assert report == [("a", "ok", 1), ("b", "cooldown", 0), ("c", "disabled", 0)]
    lease.release()
    assert [(k.id, s, n) for k, s, n in pool.key_states(NOW + 6)] == [
        ("a", "ok", 0),
        ("b", "ok", 0),
        ("c", "disabled", 0),
    ]
    assert states(pool, NOW + 101) == {"a": "ok", "b": "ok", "c": "ok"}


def test_usable_keys_counts_keys_in_flight() -> None:
    a, b = key("a"), key("b")
    pool = make_pool(a, b)
    held = [pool.acquire(NOW), pool.acquire(NOW)]
    assert all(h is not None for h in held)
    assert pool.usable_keys(NOW) == 2
    pool.failed(a, cooldown(5.0), NOW)
    assert pool.usable_keys(NOW) == 1


# --- shared by fingerprint -------------------------------------------------------------------


def test_two_providers_with_the_same_secret_share_key_health() -> None:
    store = MemoryHealthStore()
    shared_secret = "sk-shared-0123456789abcdef"
    openai = make_pool(key("main", shared_secret), store=store, provider="openai")
    azure = make_pool(key("backup", shared_secret), store=store, provider="azure")
    other = make_pool(key("main"), store=store, provider="other")

    openai.failed(openai.keys[0], cooldown(30.0), NOW)

    assert azure.acquire(NOW + 1) is None
    assert states(azure, NOW + 1) == {"backup": "cooldown"}
    assert azure.earliest_unblock(NOW + 1) == 1030.0
    assert other.acquire(NOW + 1) is not None  # same id, different secret
    # a success seen through either pool clears it for both
    azure.succeeded(azure.keys[0], NOW + 30)
    assert store.entries() == {}
    assert openai.acquire(NOW + 30) is not None


def test_a_rebuilt_pool_keeps_the_health_of_its_secrets() -> None:
    store = MemoryHealthStore()
    before = make_pool(key("a"), key("b"), store=store, policy=KeyHealth(disable_s=100.0))
    before.failed(before.keys[0], BAD_KEY, NOW)
    # config reload: ids renamed, order changed, a new key added; secrets of a and b unchanged
    after = make_pool(
        key("b2", "sk-secret-b-0123456789"),
        key("a2", "sk-secret-a-0123456789"),
        key("c"),
        store=store,
        policy=KeyHealth(disable_s=100.0),
    )
    assert states(after, NOW + 1) == {"b2": "ok", "a2": "disabled", "c": "ok"}
    assert picks(after, NOW + 1) == {"b2", "c"}
    # the strikes carried over too: the next failure after the re-probe doubles
    block = after.failed(after.keys[1], BAD_KEY, NOW + 101)[0].block
    assert block.until == NOW + 101 + 200


def test_different_stores_do_not_share() -> None:
    secret = "sk-shared-0123456789abcdef"
    one = make_pool(key("a", secret))
    two = make_pool(key("a", secret))
    one.failed(one.keys[0], BAD_KEY, NOW)
    assert two.acquire(NOW) is not None


def test_provider_backoff_is_shared_per_provider_name() -> None:
    store = MemoryHealthStore()
    first = make_pool(key("a"), store=store, provider="anthropic")
    again = make_pool(key("z"), store=store, provider="anthropic")
    other = make_pool(key("a"), store=store, provider="openai")
    first.failed(first.keys[0], Verdict(True, "upstream_529", provider_backoff=True, wait_s=9), NOW)
    assert again.provider_blocked_until(NOW) == 1009.0
    assert other.provider_blocked_until(NOW) is None


def test_health_is_stored_under_the_fingerprint_not_the_id_or_secret() -> None:
    store = MemoryHealthStore()
    a = key("a")
    pool = make_pool(a, store=store)
    pool.failed(a, BAD_KEY, NOW)
    pool.failed(a, OVERLOADED, NOW)
    assert set(store.entries()) == {a.fingerprint, "provider:openai"}
    assert a.fingerprint == fingerprint(a.secret)


# --- HealthChange records --------------------------------------------------------------------


def test_failed_returns_changes_naming_key_id_and_fingerprint() -> None:
    a = key("a")
    pool = make_pool(a, policy=KeyHealth(disable_s=100.0))
    changes = pool.failed(a, BAD_KEY, NOW)
    assert changes == [
        HealthChange("a", a.fingerprint, Block("disabled", 1100.0, "upstream_401", 1))
    ]
    text = repr(changes) + str(changes)
    assert a.secret not in text
    assert "a" in changes[0].subject
    assert a.fingerprint in text


def test_changes_for_every_kind_of_verdict_never_show_the_secret() -> None:
    secret = "sk-live-TOPSECRET-9f8e7d6c5b4a"
    k = key("prod", secret)
    pool = make_pool(k)
    verdicts = [
        cooldown(3.0),
        RATE_LIMITED_NO_RESET,
        BAD_KEY,
        OVERLOADED,
        Verdict(True, "x", KeyAction.COOLDOWN, provider_backoff=True),
    ]
    for i, verdict in enumerate(verdicts):
        for change in pool.failed(k, verdict, NOW + 1000 * i):
            assert secret not in repr(change)
            assert "TOPSECRET" not in str(change)
    assert secret not in repr(k)
    assert secret not in repr(pool.key_states(NOW))


def test_a_verdict_without_key_action_or_backoff_changes_nothing() -> None:
    a = key("a")
    store = MemoryHealthStore()
    pool = make_pool(a, store=store)
    assert pool.failed(a, Verdict(True, "upstream_500"), NOW) == []
    assert pool.failed(a, Verdict(False, "upstream_400"), NOW) == []
    assert store.entries() == {}
    assert pool.acquire(NOW) is not None
