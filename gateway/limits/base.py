"""The limiter seam: what admission asks and what it is told."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.limits.budget import BudgetSpec, BudgetState, Windows

PERIOD_S = 60.0  # every limit is per minute


class LimiterUnavailable(Exception):
    """The shared backend is down and the configured mode is fail_closed."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A tier's limits (None = unlimited).

    `concurrent_streams` counts the subject's open streams; `concurrent_requests` counts every
    in-flight request of the subject, streamed or not (a stream takes a slot of each).
    """

    tier: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    concurrent_requests: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_streams is None
            and self.concurrent_requests is None
        )

    def scaled(self, divisor: int) -> LimitSpec:
        """Each limit divided by `divisor` (at least 1): one instance's share of the whole."""
        if divisor <= 1:
            return self

        def share(value: int | None) -> int | None:
            return None if value is None else max(1, value // divisor)

        return LimitSpec(
            self.tier,
            share(self.requests_per_minute),
            share(self.tokens_per_minute),
            share(self.concurrent_streams),
            share(self.concurrent_requests),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """The concurrency slots one admitted request holds (a stream slot, a request slot or
    both), under one id; released together in `finally` (and expiring on their own)."""

    subject: str
    lease_id: str
    backend: str  # which limiter holds it ("memory", "redis", "fallback")
    stream_slot: bool = False  # holds one of `concurrent_streams`
    request_slot: bool = False  # holds one of `concurrent_requests`


@dataclass(frozen=True, slots=True)
class Usage:
    """Figures for the RateLimit headers of one limit."""

    name: str  # "rpm" | "tpm" | "concurrency" (streams) | "requests" (in-flight requests)
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Standing:
    """A subject's standing under its limits, charging nothing: one `Usage` per limit set
    (for the concurrency limits, `limit - remaining` are open now)."""

    usage: tuple[Usage, ...]
    backend: str
    degraded: bool = False  # read from the local fallback (the shared backend is down)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    denied_by: str | None = None  # "rpm" | "tpm" | "concurrency" | "requests" when denied
    retry_after_s: float = 0.0
    usage: tuple[Usage, ...] = ()
    lease: Lease | None = None
    degraded: bool = False  # decided without the shared backend (fail_open)
    reserved_tokens: int = 0


class Limiter(Protocol):
    name: str

    async def admit(
        self, subject: str, spec: LimitSpec, tokens: int, lease_ttl_s: float
    ) -> Decision:
        """Check every limit of `spec` at once (rpm, tpm, concurrent streams, concurrent
        requests, in that order; the first that denies is `denied_by`) and charge them only if
        all allow. On success with either concurrency limit, `decision.lease` holds a slot of
        each one set and must be released. A non-stream request is admitted with
        `concurrent_streams=None`. Unreleased slots expire on their own after `lease_ttl_s`
        (the Redis backend uses its own slot TTL instead, renewed while this instance lives;
        its local fallback uses `lease_ttl_s`). Raises LimiterUnavailable."""

    async def settle(
        self, lease: Lease | None, subject: str, spec: LimitSpec, delta_tokens: int
    ) -> None:
        """The end of a request: `release(lease)` (when not None) and `reconcile(subject, spec,
        delta_tokens)` at once, one round trip on a shared backend. `lease` is the one
        `admit(subject, ...)` returned. Does not raise for a backend failure (unfreed slots
        expire on their own)."""

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        """Charge (or refund, if negative) tokens once the real usage is known (nothing when
        `spec` has no tpm limit or `delta_tokens` is 0). Does not raise for a backend
        failure."""

    async def release(self, lease: Lease) -> None:
        """Free every slot `lease` holds (idempotent). Does not raise for a backend failure."""

    async def peek(self, subject: str, spec: LimitSpec) -> Standing:
        """What `subject` has left of each limit of `spec` now, charging nothing (the admin
        listener's view). Does not raise for a backend failure (`degraded` says so)."""

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        """Charge `tokens` and `cost` (nano-units; negative refunds, 0 and 0 only reads) to
        `subject`'s current UTC day and month at once (or to the windows `at`: a stream's last
        correction goes where its charges went), and return what each has used after it.
        The windows follow this instance's UTC clock. Raises LimiterUnavailable (the
        shared backend is down and the mode is fail_closed)."""

    async def close(self) -> None: ...
