"""Upstream key pools: which of a provider's keys serves the next attempt.

Sans-I/O and synchronous: a pool hands out leases and counts keys in flight. Strategies:
`least_in_flight` (fewest in flight relative to weight; ties rotate) and
`weighted_round_robin` (smooth weighted round robin). `max_concurrent_per_key` caps a key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


def fingerprint(secret: str) -> str:
    """A stable, non-reversible label for a secret: the only form a key takes in logs."""
    return "fp_" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    id: str
    secret: str = field(repr=False)
    weight: int
    fingerprint: str


@dataclass(slots=True)
class _KeyState:
    key: UpstreamKey
    in_flight: int = 0
    current: int = 0  # smooth-WRR running weight


class KeyLease:
    """One key held for one attempt. `release()` is idempotent."""

    __slots__ = ("_pool", "_state", "key")

    def __init__(self, pool: KeyPool, state: _KeyState) -> None:
        self._pool = pool
        self._state = state
        self.key = state.key

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None  # type: ignore[assignment]


class KeyPool:
    def __init__(
        self,
        provider: str,
        keys: tuple[UpstreamKey, ...],
        strategy: str = "least_in_flight",
        max_concurrent_per_key: int | None = None,
    ) -> None:
        if not keys:
            raise ValueError("a key pool needs at least one key")
        self.provider = provider
        self.strategy = strategy
        self.max_concurrent_per_key = max_concurrent_per_key
        self._states = [_KeyState(k) for k in keys]
        self._rotate = 0

    @property
    def keys(self) -> tuple[UpstreamKey, ...]:
        return tuple(s.key for s in self._states)

    def in_flight(self, key_id: str) -> int:
        for state in self._states:
            if state.key.id == key_id:
                return state.in_flight
        raise KeyError(key_id)

    def acquire(self, exclude: frozenset[str] = frozenset()) -> KeyLease | None:
        """Lease the best usable key, or None when every key is excluded or at its cap."""
        cap = self.max_concurrent_per_key
        usable = [
            s
            for s in self._states
            if s.key.id not in exclude and (cap is None or s.in_flight < cap)
        ]
        if not usable:
            return None
        if self.strategy == "weighted_round_robin":
            total = 0
            best = usable[0]
            for state in usable:
                state.current += state.key.weight
                total += state.key.weight
                if state.current > best.current:
                    best = state
            best.current -= total
        else:
            n = len(usable)
            start = self._rotate % n
            self._rotate += 1
            best = usable[start]
            for i in range(1, n):
                state = usable[(start + i) % n]
                # in_flight / weight compared without division
                if state.in_flight * best.key.weight < best.in_flight * state.key.weight:
                    best = state
        best.in_flight += 1
        return KeyLease(self, best)
