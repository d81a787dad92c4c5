"""Upstream key pools: which of a provider's keys serves the next attempt, and what a failure
does to a key's health.

Sans-I/O and synchronous; the clock (`now`, epoch seconds) is passed in. A pool hands out
leases and counts keys in flight. Strategies: `least_in_flight` (fewest in flight relative to
weight; ties rotate) and `weighted_round_robin` (smooth weighted round robin);
`max_concurrent_per_key` caps a key. Health (cooldowns, disabled keys, provider backoff) lives
in a `HealthStore` shared by every pool, every reload and, with a shared backend, every
instance. The in-flight counts live in an `InFlight` shared by every pool of the process and
carried across reloads by key fingerprint: a reload's new pool sees the leases the old pool's
streams still hold (and those streams release into the same counter).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.retry import KeyAction, Verdict
from gateway.state import Block, HealthStore, MemoryHealthStore

_NO_RESET = "rate_limited_no_reset"


def fingerprint(secret: str) -> str:
    """A stable, non-reversible label for a secret: the only form a key takes in logs."""
    return "fp_" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    id: str
    secret: str = field(repr=False)
    weight: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """How a pool treats failures (per provider, from the YAML)."""

    cooldown_s: float = 10.0
    disable_s: float = 300.0
    max_disable_s: float = 3600.0
    spend_cap_429s: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0


class _Count:
    """One key's requests in flight (shared by every pool, old and new, that has the key)."""

    __slots__ = ("n", "owner")

    def __init__(self, owner: InFlight) -> None:
        self.n = 0
        self.owner = owner


class InFlight:
    """The in-flight counts of every upstream key of the process, by fingerprint.
    `on_release` is called whenever a lease ends (the capacity queue hands the key on)."""

    def __init__(self) -> None:
        self._counts: dict[str, _Count] = {}
        self.on_release: Callable[[], None] | None = None

    def count(self, fingerprint: str) -> _Count:
        found = self._counts.get(fingerprint)
        if found is None:
            found = self._counts[fingerprint] = _Count(self)
        return found


@dataclass(slots=True)
class _KeyState:
    key: UpstreamKey
    count: _Count
    current: int = 0  # smooth-WRR running weight

    @property
    def in_flight(self) -> int:
        return self.count.n


class KeyLease:
    """One key held for one attempt. `release()` is idempotent."""

    __slots__ = ("_count", "key")

    def __init__(self, state: _KeyState) -> None:
        self._count: _Count | None = state.count
        self.key = state.key

    def release(self) -> None:
        count = self._count
        if count is not None:
            count.n -= 1
            self._count = None
            hook = count.owner.on_release
            if hook is not None:
                hook()


@dataclass(frozen=True, slots=True)
class HealthChange:
    """What a failure changed, for the log line (`subject` is a key id or the provider)."""

    subject: str
    fingerprint: str | None
    block: Block


class KeyPool:
    def __init__(
        self,
        provider: str,
        keys: tuple[UpstreamKey, ...],
        strategy: str = "least_in_flight",
        max_concurrent_per_key: int | None = None,
        *,
        health: HealthStore | None = None,
        policy: KeyHealth | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        if not keys:
            raise ValueError("a key pool needs at least one key")
        self.provider = provider
        self.strategy = strategy
        self.max_concurrent_per_key = max_concurrent_per_key
        self.health: HealthStore = health if health is not None else MemoryHealthStore()
        self.policy = policy or KeyHealth()
        counts = in_flight if in_flight is not None else InFlight()
        self._states = [_KeyState(k, counts.count(k.fingerprint)) for k in keys]
        self._rotate = 0
        self._provider_name = f"provider:{provider}"

    @property
    def keys(self) -> tuple[UpstreamKey, ...]:
        return tuple(s.key for s in self._states)

    def in_flight(self, key_id: str) -> int:
        for state in self._states:
            if state.key.id == key_id:
                return state.in_flight
        raise KeyError(key_id)

    def _blocked(self, key: UpstreamKey, now: float) -> bool:
        block = self.health.get(key.fingerprint)
        return block is not None and block.until > now

    def acquire(self, now: float, exclude: frozenset[str] = frozenset()) -> KeyLease | None:
        """Lease the best usable key, or None when every key is excluded, cooling down,
        disabled or at its cap."""
        cap = self.max_concurrent_per_key
        usable = [
            s
            for s in self._states
            if s.key.id not in exclude
            and (cap is None or s.count.n < cap)
            and not self._blocked(s.key, now)
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
                if state.count.n * best.key.weight < best.count.n * state.key.weight:
                    best = state
        best.count.n += 1
        return KeyLease(best)

    def usable_keys(self, now: float) -> int:
        """Keys not cooling down or disabled (in flight or not)."""
        return sum(1 for s in self._states if not self._blocked(s.key, now))

    def earliest_unblock(self, now: float) -> float | None:
        """When the first blocked key comes back (None if no key is blocked)."""
        ends = [
            b.until
            for s in self._states
            if (b := self.health.get(s.key.fingerprint)) is not None and b.until > now
        ]
        return min(ends) if ends else None

    def provider_blocked_until(self, now: float) -> float | None:
        block = self.health.get(self._provider_name)
        return block.until if block is not None and block.until > now else None

    def key_states(self, now: float) -> list[tuple[UpstreamKey, str, int]]:
        """(key, state, in flight) per key; state is ok | cooldown | disabled."""
        out: list[tuple[UpstreamKey, str, int]] = []
        for s in self._states:
            block = self.health.get(s.key.fingerprint)
            state = block.state if block is not None and block.until > now else "ok"
            out.append((s.key, state, s.in_flight))
        return out

    def key_views(self, now: float) -> list[dict[str, object]]:
        """Per key, what /admin/keys shows: id, fingerprint (never the secret), state, until
        (unix seconds while not ok), reason, in flight."""
        out: list[dict[str, object]] = []
        for s in self._states:
            block = self.health.get(s.key.fingerprint)
            active = block is not None and block.until > now
            out.append(
                {
                    "id": s.key.id,
                    "fingerprint": s.key.fingerprint,
                    "state": block.state if block is not None and active else "ok",
                    "until": round(block.until, 3) if block is not None and active else None,
                    "reason": block.reason if block is not None and active else None,
                    "strikes": block.strikes if block is not None and active else 0,
                    "in_flight": s.count.n,
                    "weight": s.key.weight,
                }
            )
        return out

    def succeeded(self, key: UpstreamKey, now: float) -> None:
        """A request on `key` got a good answer: forget the strikes of the key and of the
        provider. A block still running is kept: the request may have started before it."""
        for name in (key.fingerprint, self._provider_name):
            block = self.health.get(name)
            if block is not None and block.until <= now:
                self.health.clear(name)

    def failed(self, key: UpstreamKey, verdict: Verdict, now: float) -> list[HealthChange]:
        """Apply a failed attempt's verdict to the key's and the provider's health.

        A strike counts only once the previous block has run out (a failed re-probe), so that
        requests that were in flight together when a key went bad count once, not N times; an
        active block is never shortened by a milder verdict.
        """
        changes: list[HealthChange] = []
        policy = self.policy
        previous = self.health.get(key.fingerprint)
        active = previous is not None and previous.until > now
        if active and previous is not None and previous.state == "disabled":
            pass  # already out of rotation; a late failure changes nothing
        elif verdict.key_action is KeyAction.DISABLE:
            strikes = previous.strikes + 1 if previous and previous.state == "disabled" else 1
            block = Block("disabled", now + self._disable_hold(strikes), verdict.reason, strikes)
            self.health.put(key.fingerprint, block)
            changes.append(HealthChange(key.id, key.fingerprint, block))
        elif verdict.key_action is KeyAction.COOLDOWN:
            cooled = self._cooldown(previous, verdict, now)
            if cooled is not None:
                self.health.put(key.fingerprint, cooled)
                changes.append(HealthChange(key.id, key.fingerprint, cooled))
        if verdict.provider_backoff:
            prev = self.health.get(self._provider_name)
            if prev is None or prev.until <= now:
                strikes = prev.strikes + 1 if prev is not None else 1
                hold = (
                    verdict.wait_s
                    if verdict.wait_s is not None
                    else min(policy.backoff_max_s, policy.backoff_base_s * _doubling(strikes))
                )
                backoff = Block("backoff", now + hold, verdict.reason, strikes)
                self.health.put(self._provider_name, backoff)
                changes.append(HealthChange(self.provider, None, backoff))
        return changes

    def _disable_hold(self, strikes: int) -> float:
        return min(self.policy.max_disable_s, self.policy.disable_s * _doubling(strikes))

    def _cooldown(self, previous: Block | None, verdict: Verdict, now: float) -> Block | None:
        policy = self.policy
        if verdict.wait_s is not None:
            until = now + verdict.wait_s
            if previous is not None and previous.until >= until:
                return None  # a longer cooldown is already running
            return Block("cooldown", until, verdict.reason, 1)
        # No reset information: a rate limit that does not say when it ends. If it is still
        # there when the cooldown has run out, again and again, it is a spend cap (Anthropic).
        if previous is not None and previous.until > now:
            return None  # concurrent 429s of one episode: one strike
        if previous is not None and previous.reason == "spend_cap":
            strikes = previous.strikes + 1  # the re-probe of a spend-capped key failed
            return Block("disabled", now + self._disable_hold(strikes), "spend_cap", strikes)
        again = previous is not None and previous.reason == _NO_RESET
        strikes = previous.strikes + 1 if previous is not None and again else 1
        if strikes >= policy.spend_cap_429s:
            return Block("disabled", now + policy.disable_s, "spend_cap", 1)
        return Block("cooldown", now + policy.cooldown_s, _NO_RESET, strikes)


def _doubling(strikes: int) -> float:
    # Capped exponent: strikes can grow without bound over a long outage.
    return float(2 ** min(max(strikes - 1, 0), 30))
