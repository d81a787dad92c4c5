"""Tests for gateway.keypool: strategies, per-key caps, leases, exclusion, fingerprints."""

from __future__ import annotations

import hashlib

import pytest

from gateway.keypool import KeyLease, KeyPool, UpstreamKey, fingerprint


def key(key_id: str, weight: int = 1) -> UpstreamKey:
    secret = f"sk-secret-{key_id}-0123456789"
    return UpstreamKey(id=key_id, secret=secret, weight=weight, fingerprint=fingerprint(secret))


def lease(pool: KeyPool, exclude: frozenset[str] = frozenset()) -> KeyLease:
    got = pool.acquire(0.0, exclude)
    assert got is not None
    return got


def in_flight(pool: KeyPool) -> dict[str, int]:
    return {k.id: pool.in_flight(k.id) for k in pool.keys}


def test_pool_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        KeyPool("p", ())


def test_keys_and_in_flight_bookkeeping() -> None:
    pool = KeyPool("p", (key("a"), key("b")))
    assert [k.id for k in pool.keys] == ["a", "b"]
    assert in_flight(pool) == {"a": 0, "b": 0}
    with pytest.raises(KeyError):
        pool.in_flight("nope")


# --- least_in_flight -------------------------------------------------------------------------


def test_least_in_flight_spreads_held_leases_evenly() -> None:
    pool = KeyPool("p", (key("a"), key("b"), key("c")))
    leases = [lease(pool) for _ in range(9)]
    assert in_flight(pool) == {"a": 3, "b": 3, "c": 3}
    assert sorted(x.key.id for x in leases[:3]) == ["a", "b", "c"]


def test_least_in_flight_picks_the_idle_key() -> None:
    pool = KeyPool("p", (key("a"), key("b"), key("c")))
    held = [lease(pool) for _ in range(3)]
    by_id = {x.key.id: x for x in held}
    by_id["b"].release()
    # b is the only key with nothing in flight, whatever the rotation says
    assert lease(pool).key.id == "b"
    assert in_flight(pool) == {"a": 1, "b": 1, "c": 1}


def test_least_in_flight_ties_rotate() -> None:
    pool = KeyPool("p", (key("a"), key("b"), key("c")))
    picked = []
    for _ in range(6):
        got = lease(pool)
        picked.append(got.key.id)
        got.release()
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_least_in_flight_respects_weights() -> None:
    pool = KeyPool("p", (key("a", 1), key("b", 2)))
    for _ in range(30):
        before = in_flight(pool)
        got = lease(pool)
        weights = {k.id: k.weight for k in pool.keys}
        # the chosen key had the lowest load (in flight / weight) at the time of the choice
        load = {kid: before[kid] / weights[kid] for kid in before}
        assert load[got.key.id] == min(load.values())
    assert in_flight(pool) == {"a": 10, "b": 20}


def test_least_in_flight_weight_three_to_one() -> None:
    pool = KeyPool("p", (key("heavy", 3), key("light", 1)))
    for _ in range(40):
        lease(pool)
    assert in_flight(pool) == {"heavy": 30, "light": 10}


# --- weighted_round_robin --------------------------------------------------------------------


def test_weighted_round_robin_smooth_sequence() -> None:
    pool = KeyPool("p", (key("a", 1), key("b", 2)), "weighted_round_robin")
    picked = []
    for _ in range(6):
        got = lease(pool)
        picked.append(got.key.id)
        got.release()
    # nginx smooth WRR: b a b, repeated; never a a
    assert picked == ["b", "a", "b", "b", "a", "b"]
    assert picked.count("a") == 2
    assert picked.count("b") == 4


def test_weighted_round_robin_ignores_in_flight() -> None:
    pool = KeyPool("p", (key("a", 1), key("b", 2)), "weighted_round_robin")
    picked = [lease(pool).key.id for _ in range(6)]  # held, never released
    assert picked == ["b", "a", "b", "b", "a", "b"]
    assert in_flight(pool) == {"a": 2, "b": 4}


def test_weighted_round_robin_three_keys() -> None:
    pool = KeyPool("p", (key("a", 5), key("b", 1), key("c", 1)), "weighted_round_robin")
    picked = "".join(lease(pool).key.id for _ in range(7))
    assert picked == "aabacaa"  # the classic nginx example {5, 1, 1}


def test_weighted_round_robin_equal_weights_alternate() -> None:
    pool = KeyPool("p", (key("a"), key("b")), "weighted_round_robin")
    assert [lease(pool).key.id for _ in range(4)] == ["a", "b", "a", "b"]


# --- caps, release, exclusion -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["least_in_flight", "weighted_round_robin"])
def test_max_concurrent_per_key(strategy: str) -> None:
    pool = KeyPool("p", (key("a"), key("b")), strategy, max_concurrent_per_key=2)
    held = [lease(pool) for _ in range(4)]
    assert in_flight(pool) == {"a": 2, "b": 2}
    assert pool.acquire(0.0) is None
    assert in_flight(pool) == {"a": 2, "b": 2}  # a failed acquire leaves no trace
    released = next(x for x in held if x.key.id == "b")
    released.release()
    assert lease(pool).key.id == "b"
    assert pool.acquire(0.0) is None


def test_release_is_idempotent() -> None:
    pool = KeyPool("p", (key("a"),))
    first = lease(pool)
    second = lease(pool)
    assert pool.in_flight("a") == 2
    first.release()
    first.release()
    first.release()
    assert pool.in_flight("a") == 1
    second.release()
    assert pool.in_flight("a") == 0


def test_release_frees_a_capped_slot_once() -> None:
    pool = KeyPool("p", (key("a"),), max_concurrent_per_key=1)
    first = lease(pool)
    assert pool.acquire(0.0) is None
    first.release()
    second = lease(pool)
    first.release()  # a stale second release must not free the slot `second` holds
    assert pool.acquire(0.0) is None
    second.release()
    assert pool.in_flight("a") == 0


def test_lease_carries_its_key() -> None:
    pool = KeyPool("p", (key("a"),))
    got = lease(pool)
    assert got.key == key("a")
    assert got.key.secret == "sk-secret-a-0123456789"


@pytest.mark.parametrize("strategy", ["least_in_flight", "weighted_round_robin"])
def test_exclude(strategy: str) -> None:
    pool = KeyPool("p", (key("a"), key("b"), key("c")), strategy)
    for _ in range(6):
        got = lease(pool, frozenset({"a", "c"}))
        assert got.key.id == "b"
        got.release()
    assert pool.acquire(0.0, frozenset({"a", "b", "c"})) is None
    assert in_flight(pool) == {"a": 0, "b": 0, "c": 0}
    ids = {lease(pool, frozenset({"b"})).key.id for _ in range(4)}
    assert ids == {"a", "c"}


def test_exclude_unknown_id_is_harmless() -> None:
    pool = KeyPool("p", (key("a"),))
    assert lease(pool, frozenset({"zzz"})).key.id == "a"


# --- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_is_stable_prefixed_and_hides_the_secret() -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    fp = fingerprint(secret)
    assert fp == fingerprint(secret)
    assert fp == "fp_" + hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert fp.startswith("fp_")
    assert len(fp) == 15
    assert secret not in fp
    assert secret[-8:] not in fp
    assert fingerprint(secret + "x") != fp


def test_upstream_key_repr_hides_the_secret() -> None:
    k = key("a")
    assert "sk-secret-a" not in repr(k)
    assert k.fingerprint in repr(k)
