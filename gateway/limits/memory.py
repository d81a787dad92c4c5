"""The one-process limiter: GCRA state and stream leases in dicts, with an injected clock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from gateway.limits.base import PERIOD_S, Decision, Lease, LimitSpec, Usage
from gateway.limits.gcra import adjust, gcra


class MemoryLimiter:
    """Exact within one process. Subjects are caller ids; state expires with its budget."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, name: str = "memory"
    ) -> None:
        self.name = name
        self._clock = clock
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
        lease = None
        if spec.concurrent_streams is not None:
            held = self._leases.setdefault(subject, {})
            for lease_id, expires in list(held.items()):
                if expires <= now:
                    del held[lease_id]
            if len(held) >= spec.concurrent_streams:
                # No way to know when a stream ends: suggest a short wait.
                denied = Usage("concurrency", spec.concurrent_streams, 0, 0)
                return Decision(False, "concurrency", 1.0, (*before, denied))
            lease_id = uuid.uuid4().hex
            held[lease_id] = now + lease_ttl_s
            lease = Lease(subject, lease_id, self.name)
            usage.append(
                Usage(
                    "concurrency", spec.concurrent_streams, spec.concurrent_streams - len(held), 0
                )
            )
        for key, tat in checks:
            self._tat[key] = tat
        if spec.tokens_per_minute is not None:
            # A cost above the limit was charged as the limit: reconcile from what was charged.
            tokens = min(max(0, tokens), spec.tokens_per_minute)
        return Decision(True, None, 0.0, tuple(usage), lease, reserved_tokens=tokens)

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        if spec.tokens_per_minute is None or delta_tokens == 0:
            return
        key = f"{subject}\x00tpm"
        now = self._clock()
        self._tat[key] = adjust(
            self._tat.get(key), now, spec.tokens_per_minute, PERIOD_S, delta_tokens
        )

    async def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.subject)
        if held is not None:
            held.pop(lease.lease_id, None)
            if not held:
                del self._leases[lease.subject]

    def open_leases(self, subject: str) -> int:
        now = self._clock()
        return sum(1 for t in self._leases.get(subject, {}).values() if t > now)

    async def close(self) -> None:
        return None

    def _gc(self, now: float) -> None:
        # Every 1024 operations drop state whose budget is whole again (bounded memory).
        self._ops += 1
        if self._ops & 1023:
            return
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        for subject in [s for s, held in self._leases.items() if not held]:
            del self._leases[subject]
