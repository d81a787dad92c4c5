"""Admission: a caller's limits checked (and charged) before any upstream call, the
providers' budgets charged per attempt, and all of it settled when the request ends.

`admit` is an `async with`: on entry it admits the caller (a 429 or 503 in the caller's terms
when it may not go on); inside, `Ticket.charge_provider` charges a deployment's provider budget
before its attempt; on exit, whatever happened (an answer, an error, the client gone), the
caller's slots are released and every token reservation is reconciled with the real usage.

Token limits cannot know the output size up front, so a request reserves an estimate (see
`gateway.edge.estimate_tokens`) and the difference is charged or refunded when the upstream
reports usage. A stream that ends without usage keeps its reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.budget import BudgetMeter, BudgetTallies, charge_answer, check
from gateway.config.runtime import Deployment
from gateway.edge import Request
from gateway.errors import GatewayError, Kind
from gateway.limits.base import Decision, Limiter, LimiterUnavailable, LimitSpec
from gateway.limits.budget import BudgetState
from gateway.providers.base import StreamFacts
from gateway.report import Report
from gateway.tasks import Tasks
from gateway.telemetry import Telemetry, attrs, set_error

_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute"}
# Limits on what is open at once (no time window): streams, and every in-flight request.
_CONCURRENCY = frozenset({"concurrency", "requests"})
# A stream slot outlives its request by this much unless released (a crashed instance).
_LEASE_GRACE_S = 60


@dataclass(slots=True)
class Ticket:
    """What admission charged for one request, and what it may still charge (provider
    budgets, one charge per attempt)."""

    limiter: Limiter
    request: Request
    decision: Decision | None = None  # the caller's (None: the caller has no limits)
    spec: LimitSpec | None = None
    # Provider budgets charged: (subject, spec, reserved tokens), one per attempt.
    provider_charges: list[tuple[str, LimitSpec, int]] = field(default_factory=list)
    # The caller's spend budgets: its standing at admission, the deployment that answered
    # (its pricing) and, for a stream, the meter charging it as it streams.
    budget_state: BudgetState | None = None
    deployment: Deployment | None = None
    meter: BudgetMeter | None = None

    def answered_by(
        self,
        deployment: Deployment,
        facts: StreamFacts | None,
        tallies: BudgetTallies | None = None,
    ) -> BudgetMeter | None:
        """The answer comes from `deployment`; for a stream (`facts` of its first event) under
        a budget, the meter the relay feeds (None without a budget), in the instance's
        per-caller `tallies`."""
        self.deployment = deployment
        state, spec = self.budget_state, self.request.caller.budget
        if facts is None or state is None or spec is None:
            return None
        usage = facts.usage  # Anthropic's message_start counts the prompt
        prompt = self.request.prompt_estimate
        if usage is not None and usage.input_tokens is not None:
            prompt = usage.input_tokens
        self.meter = BudgetMeter(
            self.limiter, self.request.caller.id, spec, state, deployment.pricing, prompt, tallies
        )
        return self.meter

    async def charge_provider(self, deployment: Deployment) -> float | None:
        """Charge `deployment`'s provider budget, if it has one. None when charged (or when
        the limiter is down: the callers' limits decide then), else the seconds until it
        would admit."""
        spec = deployment.provider.limits
        if spec is None:
            return None
        subject = f"provider:{deployment.provider.name}"
        tokens = self.request.estimate if spec.tokens_per_minute else 0
        try:
            decision = await self.limiter.admit(subject, spec, tokens, 60)
        except LimiterUnavailable:
            return None
        if not decision.allowed:
            return max(decision.retry_after_s, 0.001)
        self.provider_charges.append((subject, spec, decision.reserved_tokens))
        return None

    async def settle(self, report: Report) -> None:
        """Release the caller's slots and reconcile every reservation with the real usage:
        the attempt that answered is charged what it used; failed attempts and a request that
        reached no upstream get their tokens back; a stream that died without usage keeps
        its reservation."""
        actual = report.used_tokens
        reached = report.upstream_status is not None
        if self.budget_state is not None:
            await self._settle_budget(report)
        if self.decision is not None and self.spec is not None:
            await self._settle_caller(self.decision, self.spec, report, actual, reached)
        # The charge of the attempt that answered: the last one of its provider (a hedged
        # attempt that lost may have been charged after it: its tokens go back).
        answered = f"provider:{report.provider}"
        last = -1  # none: the answering provider has no budget; every reservation goes back
        for i, (subject, _spec, _reserved) in enumerate(self.provider_charges):
            if subject == answered:
                last = i
        for i, (subject, spec, reserved) in enumerate(self.provider_charges):
            if spec.tokens_per_minute is None:
                continue
            if i != last or (actual is None and not reached):
                await self.limiter.reconcile(subject, spec, -reserved)
            elif actual is not None:
                await self.limiter.reconcile(subject, spec, actual - reserved)

    async def _settle_budget(self, report: Report) -> None:
        spec = self.request.caller.budget
        assert spec is not None
        if self.meter is not None:
            # A drained stream (resume) that reached its end is as whole as one read live.
            complete = report.outcome == "ok" or report.drain_end == "ok"
            charged = await self.meter.close(report.final_usage, complete)
        elif self.deployment is not None and report.status is not None and report.status < 300:
            price = self.deployment.pricing
            charged = await charge_answer(
                self.limiter,
                self.request.caller.id,
                spec,
                price,
                report.usage,
                self.request.prompt_estimate,
                report.bytes_out,
            )
        else:
            return  # no answer: nothing was generated
        report.budget_tokens, report.budget_cost = charged

    async def _settle_caller(
        self, decision: Decision, spec: LimitSpec, report: Report, actual: int | None, reached: bool
    ) -> None:
        # The slots and the token reconciliation in one call (one round trip on Redis).
        delta = 0
        if spec.tokens_per_minute is not None:
            if actual is not None:
                delta = report.reconciled = actual - decision.reserved_tokens
                report.span.add_event(
                    "gateway.reservation_reconciled",
                    {"reserved_tokens": decision.reserved_tokens, "used_tokens": actual},
                )
            elif not reached:  # nothing reached the upstream at all
                delta = -decision.reserved_tokens
        await self.limiter.settle(decision.lease, self.request.caller.id, spec, delta)


@contextlib.asynccontextmanager
async def admit(
    limiter: Limiter, request: Request, report: Report, tel: Telemetry, retry_redis_s: float
) -> AsyncIterator[Ticket]:
    """Admit `request` under its caller's limits (raises GatewayError 429 / 503), yield the
    ticket, and settle everything on exit (shielded: a client that went away must not leak
    its slots or its tokens)."""
    ticket = Ticket(limiter, request)
    budget = request.caller.budget
    if budget is not None and request.endpoint.billed:
        # First: a spent budget costs none of the per-minute limits.
        ticket.budget_state = await check(limiter, request.caller.id, budget, report, tel)
    spec = request.caller.limits
    if spec is not None:
        if not request.parsed.stream and spec.concurrent_streams is not None:
            # The stream limit is on open streams; a plain request takes no stream slot.
            spec = dataclasses.replace(spec, concurrent_streams=None)
        decision = await _admit_caller(ticket, spec, report, tel, retry_redis_s)
        if not decision.allowed:
            report.timings.admitted = time.perf_counter()
            prefix = "degraded_" if decision.degraded else ""
            report.limiter = f"{prefix}denied_{decision.denied_by}"
            raise rate_limited(decision, spec)
        ticket.spec, ticket.decision = spec, decision
    report.timings.admitted = time.perf_counter()
    try:
        yield ticket
    finally:
        if (
            ticket.decision is not None
            or ticket.provider_charges
            or ticket.budget_state is not None
        ):
            # A task of its own (kept until it ends): a client that goes away must not cut
            # the settlement short and leak the caller's slots or its tokens.
            settling = Tasks("admission").spawn(ticket.settle(report), "settle")
            try:
                await asyncio.shield(settling)
            except asyncio.CancelledError:
                # The client went away (aiohttp cancels the handler): the settlement goes on,
                # and the request waits for it once, so that its access line has the figures
                # (a second cancellation, a shutdown, leaves it running on its own).
                await asyncio.wait({settling})  # not cancelled with this task
                raise


async def _admit_caller(
    ticket: Ticket, spec: LimitSpec, report: Report, tel: Telemetry, retry_redis_s: float
) -> Decision:
    request = ticket.request
    tokens = request.estimate if spec.tokens_per_minute else 0
    span = tel.child(report.span, "gateway.limits")
    try:
        decision = await ticket.limiter.admit(
            request.caller.id, spec, tokens, request.route.timeouts.total_s + _LEASE_GRACE_S
        )
    except LimiterUnavailable:
        set_error(span, "limiter_unavailable")
        span.end()
        raise GatewayError(
            503,
            Kind.LIMITER_UNAVAILABLE,
            "Rate limiting is unavailable (its shared store cannot be reached); "
            "the gateway is configured to refuse requests then.",
            headers={"retry-after": str(max(1, math.ceil(retry_redis_s)))},
        ) from None
    report.limiter = "degraded" if decision.degraded else "ok"
    backend = "fallback" if decision.degraded else ticket.limiter.name
    tel.metrics.child(
        tel.metrics.limiter_decisions,
        backend,
        "allowed" if decision.allowed else "denied",
        decision.denied_by or "none",
    ).inc()
    if span.is_recording():
        span.set_attributes(
            attrs(
                gateway__limiter__backend=backend,
                gateway__limiter__allowed=decision.allowed,
                gateway__limiter__denied_by=decision.denied_by,
                gateway__limiter__reserved_tokens=decision.reserved_tokens,
            )
        )
    span.end()
    if decision.allowed:
        report.extra_headers.update(ratelimit_headers(decision))
    return decision


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """IETF draft RateLimit-Policy / RateLimit headers (one item per configured limit)."""
    if not decision.usage:
        return {}
    policy = []
    state = []
    for u in decision.usage:
        window = ";w=60" if u.name not in _CONCURRENCY else ""
        policy.append(f'"{u.name}";q={u.limit}{window}')
        state.append(f'"{u.name}";r={u.remaining};t={math.ceil(u.reset_s)}')
    return {"RateLimit-Policy": ", ".join(policy), "RateLimit": ", ".join(state)}


def rate_limited(decision: Decision, spec: LimitSpec) -> GatewayError:
    """The 429 for a denied decision, with retry-after (s), retry-after-ms and the drafts."""
    wait = max(decision.retry_after_s, 0.001)
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
        **ratelimit_headers(decision),
    }
    if decision.denied_by == "concurrency":
        message = (
            f"Too many concurrent streams for tier '{spec.tier}' "
            f"(limit {spec.concurrent_streams}). Retry when one of them ends."
        )
    elif decision.denied_by == "requests":
        message = (
            f"Too many concurrent requests for tier '{spec.tier}' "
            f"(limit {spec.concurrent_requests}). Retry when one of them ends."
        )
    else:
        name = decision.denied_by or "rpm"
        limit = spec.requests_per_minute if name == "rpm" else spec.tokens_per_minute
        message = (
            f"Rate limit reached for {_NAMES.get(name, name)} (tier '{spec.tier}', limit "
            f"{limit}). Retry in {wait:.3f} s."
        )
    return GatewayError(429, Kind.RATE_LIMITED, message, headers=headers)
