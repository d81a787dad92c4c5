"""The limiter seam: what admission asks and what it is told."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PERIOD_S = 60.0  # every limit is per minute


class LimiterUnavailable(Exception):
    """The shared backend is down and the configured mode is fail_closed."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A tier's limits (None = unlimited)."""

    tier: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.concurrent_streams is None
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
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A concurrent-stream slot; released in `finally` (and expiring on its own)."""

    subject: str
    lease_id: str
    backend: str  # which limiter holds it ("memory", "redis", "fallback")


@dataclass(frozen=True, slots=True)
class Usage:
    """Figures for the RateLimit headers of one limit."""

    name: str  # "rpm" | "tpm" | "concurrency"
    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    denied_by: str | None = None  # "rpm" | "tpm" | "concurrency" when denied
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
        """Check every limit of `spec` at once; charge them only if all allow. On success with
        a concurrency limit, `decision.lease` must be released. Raises LimiterUnavailable."""

    async def reconcile(self, subject: str, spec: LimitSpec, delta_tokens: int) -> None:
        """Charge (or refund, if negative) tokens once the real usage is known."""

    async def release(self, lease: Lease) -> None:
        """Free a concurrent-stream slot (idempotent)."""

    async def close(self) -> None: ...
