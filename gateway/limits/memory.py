"""The one-process limiter: GCRA state and concurrency slots in dicts, with an injected clock."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from gateway.limits.base import PERIOD_S, Decision, Lease, LimitSpec, Standing, Usage
from gateway.limits.budget import WINDOW_GRACE_S, BudgetSpec, BudgetState, WindowClock, Windows
from gateway.limits.gcra import adjust, gcra


class MemoryLimiter:
    """Exact within one process. Subjects are caller ids; state expires with its budget."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        name: str = "memory",
    ) -> None:
        """`clock` times the per-minute limits; `wall` (unix seconds) places the budgets'
        calendar windows."""
        self.name = name
        self._clock = clock
        self._wall = wall
        self._windows = WindowClock()
        # Budget counters: window (d2026-12-01, m2026-12) -> subject -> [tokens, cost], and
        # when each window's counters go (unix s).
        self._budgets: dict[str, dict[str, list[int]]] = {}
        self._budget_ends: dict[str, float] = {}
        self._budget_ops = 0
        self._lease_ids = itertools.count(1)
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._ops = 0

    async def admit(
        self, subject: str, spec: LimitSpec, tokens: int, lease_ttl_s: float
    ) -> Decision:
        return self.admit_now(subject, spec, tokens, lease_ttl_s)

    def admit_now(self, subject: str, spec: LimitSpec, tokens: int, lease_ttl_s: float) -> Decision:
        """`admit` without awaiting (it never waits)."""
        now = self._clock()
        self._gc(now)
        usage: list[Usage] = []
        before: list[Usage] = []  # what is left without this request (reported on a denial)
        checks = []
        for name, limit, cost in (
            ("rpm", spec.requests_per_minute, 1),
            ("tpm", spec.tokens_per_minute, tokens),
        ):
            if limit is None:
                continue
            key = f"{subject}\x00{name}"
            tat = self._tat.get(key)
            result = gcra(tat, now, limit, PERIOD_S, cost)
            if not result.allowed:
                denied = Usage(name, limit, result.remaining, result.reset_after)
                return Decision(False, name, result.retry_after, (*before, denied))
            probe = gcra(tat, now, limit, PERIOD_S, 0)
            before.append(Usage(name, limit, probe.remaining, probe.reset_after))
            usage.append(Usage(name, limit, result.remaining, result.reset_after))
            checks.append((key, result.tat))
        # Both concurrency limits are checked before either slot is taken.
        taken: list[dict[str, float]] = []
        for name, limit, kind in (
            ("concurrency", spec.concurrent_streams, "streams"),
            ("requests", spec.concurrent_requests, "requests"),
        ):
            if limit is None:
                continue
            held = self._held(subject, kind, now)
            if len(held) >= limit:
                # No way to know when a request ends: suggest a short wait.
                denied = Usage(name, limit, 0, 0)
                return Decision(False, name, 1.0, (*before, denied))
            before.append(Usage(name, limit, limit - len(held), 0))
            usage.append(Usage(name, limit, limit - len(held) - 1, 0))
            taken.append(held)
        lease = None
        if taken:
            lease_id = f"m{next(self._lease_ids):x}"  # unique within this limiter
            for held in taken:
                held[lease_id] = now + lease_ttl_s
            lease = Lease(
                subject,
                lease_id,
                self.name,
                stream_slot=spec.concurrent_streams is not None,
                request_slot=spec.concurrent_requests is not None,
            )
        for key, tat in checks:
            self._tat[key] = tat
        if spec.tokens_per_minute is not None:
            # A cost above the limit was charged as the limit: reconcile from what was charged.
            tokens = min(max(0, tokens), spec.tokens_per_minute)
        return Decision(True, None, 0.0, tuple(usage), lease, reserved_tokens=tokens)

    async def settle(
        self, lease: Lease | None, subject: str, spec: LimitSpec, delta_tokens: int
    ) -> None:
        if lease is not None:
            self.release_now(lease)
        self.reconcile_now(subject, spec, delta_tokens)

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        self.reconcile_now(subject, spec, delta_tokens)

    async def release(self, lease: Lease) -> None:
        self.release_now(lease)

    def reconcile_now(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        """`reconcile` without awaiting."""
        if spec.tokens_per_minute is None or delta_tokens == 0:
            return
        key = f"{subject}\x00tpm"
        now = self._clock()
        self._tat[key] = adjust(
            self._tat.get(key), now, spec.tokens_per_minute, PERIOD_S, delta_tokens
        )

    def release_now(self, lease: Lease) -> None:
        """`release` without awaiting."""
        for kind, holds in (("streams", lease.stream_slot), ("requests", lease.request_slot)):
            key = f"{lease.subject}\x00{kind}"
            held = self._leases.get(key) if holds else None
            if held is not None:
                held.pop(lease.lease_id, None)
                if not held:
                    del self._leases[key]

    async def peek(self, subject: str, spec: LimitSpec) -> Standing:
        return Standing(self.peek_now(subject, spec), self.name)

    def peek_now(self, subject: str, spec: LimitSpec) -> tuple[Usage, ...]:
        """`peek`'s figures, without awaiting."""
        now = self._clock()
        usage = []
        for name, limit in (("rpm", spec.requests_per_minute), ("tpm", spec.tokens_per_minute)):
            if limit is not None:
                probe = gcra(self._tat.get(f"{subject}\x00{name}"), now, limit, PERIOD_S, 0)
                usage.append(Usage(name, limit, probe.remaining, probe.reset_after))
        for name, limit, kind in (
            ("concurrency", spec.concurrent_streams, "streams"),
            ("requests", spec.concurrent_requests, "requests"),
        ):
            if limit is not None:
                held = self.open_leases(subject, kind)
                usage.append(Usage(name, limit, max(0, limit - held), 0.0))
        return tuple(usage)

    def open_leases(self, subject: str, kind: str = "streams") -> int:
        """Unexpired slots `subject` holds of one kind ("streams" or "requests")."""
        now = self._clock()
        return sum(1 for t in self._leases.get(f"{subject}\x00{kind}", {}).values() if t > now)

    def _held(self, subject: str, kind: str, now: float) -> dict[str, float]:
        """The slots of one kind `subject` holds (expired ones dropped): lease id -> expiry."""
        held = self._leases.setdefault(f"{subject}\x00{kind}", {})
        for lease_id, expires in list(held.items()):
            if expires <= now:
                del held[lease_id]
        return held

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        return self.budget_now(subject, tokens, cost, at)

    def budget_now(
        self, subject: str, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        """`budget` without awaiting."""
        now = self._wall()
        windows = at if at is not None else self._windows.at(now)
        self._budget_gc(now)
        used = []
        for window, ends in (
            ("d" + windows.day, windows.day_end),
            ("m" + windows.month, windows.month_end),
        ):
            callers = self._budgets.get(window)
            counters = callers.get(subject) if callers is not None else None
            if counters is None:
                if not tokens and not cost:
                    used.append((0, 0))
                    continue
                if callers is None:
                    callers = self._budgets[window] = {}
                    self._budget_ends[window] = ends + WINDOW_GRACE_S
                counters = callers[subject] = [0, 0]
            # A refund never takes a counter below zero.
            counters[0] = max(0, counters[0] + tokens)
            counters[1] = max(0, counters[1] + cost)
            used.append((counters[0], counters[1]))
        (tokens_day, cost_day), (tokens_month, cost_month) = used
        return BudgetState(windows, tokens_day, cost_day, tokens_month, cost_month, self.name, now)

    def _budget_gc(self, now: float) -> None:
        # A window's counters go together once it has ended (plus the grace): one dict per
        # window, so this costs nothing per caller.
        self._budget_ops += 1
        if self._budget_ops & 1023:
            return
        for window in [w for w, ends in self._budget_ends.items() if ends <= now]:
            del self._budget_ends[window]
            self._budgets.pop(window, None)

    async def close(self) -> None:
        return None

    def _gc(self, now: float) -> None:
        # Every 1024 operations drop state whose budget is whole again (bounded memory).
        self._ops += 1
        if self._ops & 1023:
            return
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        for key in [k for k, held in self._leases.items() if not held]:
            del self._leases[key]
