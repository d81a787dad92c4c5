"""Attempts: which deployment and key to try next, when to wait, when to give up.

`Planner` is sans-I/O: given the route, the key pools' health and one clock (injected; epoch
seconds, the clock key health is kept on), `next()` answers `Try(deployment, key)`,
`Sleep(seconds)` or `Fail(answer)`, and `record(step, failure)` applies a result to key and
provider health and returns the changes. `run` is the thin I/O loop around it: it sleeps,
charges provider budgets, sends each attempt through `Upstream`, and reports every retry.

Rules (README, "Retry and failover"): deployments in order, keys not yet tried first; a key
fault rotates to the next key at once, anything else backs off (full-jitter exponential);
every key cooling down for a short while (up to max_retry_after_s, within the deadline) is
waited for; a deployment over its provider budget falls back to the next; a 403 the request
causes tries only keys not tried yet; a prompt too long for a model moves to a deployment
whose upstream model differs; no attempt starts past the deadline or beyond max_attempts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanKind

from gateway.config.runtime import Deployment, Route
from gateway.edge import Request
from gateway.errors import GatewayError, Kind
from gateway.keypool import HealthChange, KeyLease
from gateway.logs import get_logger
from gateway.providers.base import as_int
from gateway.queue import CapacityQueue, QueueFull
from gateway.report import Report, Timings
from gateway.retry import KeyAction, backoff_s
from gateway.sinks import finish_attempt_span
from gateway.tasks import Tasks
from gateway.telemetry import Telemetry, attrs
from gateway.upstream import Failure, OpenStream, Reply, Upstream

_log = get_logger("gateway.access")


@dataclass(frozen=True, slots=True)
class Retry:
    """The attempt this rides on retries a failed one (reported once, when it is sent)."""

    reason: str
    backoff_s: float
    provider: str


@dataclass(frozen=True, slots=True)
class Try:
    """Send an attempt to `deployment` with the leased key (release it once done)."""

    index: int  # of the deployment in the route
    deployment: Deployment
    lease: KeyLease
    retry: Retry | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait, then ask again: a backoff before a retry, or every key cooling down briefly."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up: a GatewayError of the gateway's own (no key usable, budgets spent), or the
    last attempt's failure, whose answer the caller gets."""

    answer: GatewayError | Failure


@dataclass(frozen=True, slots=True)
class Queue:
    """No attempt can start now (every key busy or blocked, or the provider budgets spent):
    wait in the capacity queue (`policy.queue`) for one; `error` is the answer if none comes
    in time. `retry_in`: seconds until capacity comes back by itself (None: when a key is
    released)."""

    error: GatewayError
    retry_in: float | None = None


Step = Try | Sleep | Fail | Queue


@dataclass(slots=True)
class Planner:
    """The retry rules of one request, as a state machine over its attempts."""

    route: Route
    deadline: float  # epoch seconds: no attempt starts (and no backoff sleeps) past it
    rng: random.Random
    clock: Callable[[], float] = time.time
    attempts: int = 0
    _tried: list[set[str]] = field(default_factory=list)  # key ids tried, per deployment
    _over_budget: dict[int, float] = field(default_factory=dict)  # index -> seconds to wait
    _too_small: set[str] = field(default_factory=set)  # upstream models whose window is short
    _last: Failure | None = None  # the last retryable failure
    _last_provider: str = ""
    _backoff_due: bool = False
    _pending: Retry | None = None  # the next attempt, when one is sent, retries `_last`
    _final: Failure | None = None  # a failure no attempt may follow
    queue_s: float = 0.0  # policy.queue.max_wait_s: how long this request may wait for capacity
    _taken: Try | None = None  # handed over by the capacity queue: the next step
    _busy: bool = False  # the last pick found a key at its cap (not blocked)
    _budget_at: float = 0.0  # epoch: when a spent provider budget admits again

    def __post_init__(self) -> None:
        self._tried = [set() for _ in self.route.deployments]

    def next(self) -> Step:
        """What to do now."""
        if self._taken is not None:
            step, self._taken = self._taken, None
            return step
        if self._final is not None:
            return Fail(self._final)
        if self.attempts >= self.route.retry.max_attempts:
            return Fail(self._last or _no_key_error(self.route, None))
        now = self.clock()
        last = self._last
        if last is not None and now >= self.deadline:
            return Fail(last)  # no retry starts past the deadline
        if self._backoff_due and last is not None:
            self._backoff_due = False
            delay = self._backoff(last)
            if delay and now + delay >= self.deadline:
                return Fail(last)
            self._pending = Retry(last.verdict.reason, delay, self._last_provider)
            if delay:
                return Sleep(delay)
        return self._choose(now)

    def begin(self, step: Try) -> int:
        """`step` is being sent (its provider budget admitted it): its attempt number."""
        self._tried[step.index].add(step.lease.key.id)
        self.attempts += 1
        return self.attempts

    def over_budget(self, step: Try, wait_s: float) -> None:
        """`step`'s provider budget refused it: not an attempt; that deployment is skipped
        (a retry it carried rides on the next attempt instead)."""
        step.lease.release()
        self._over_budget[step.index] = wait_s
        if step.retry is not None:
            self._pending = step.retry

    def record(self, step: Try, failure: Failure | None) -> list[HealthChange]:
        """Apply an attempt's result to key and provider health. A failure's lease is
        released; an answer's (None) stays with the caller while the answer is delivered."""
        pool = step.deployment.pool
        now = self.clock()
        if failure is None:
            pool.succeeded(step.lease.key, now)
            return []
        # Health first: the release hands the key to a queued request at once, which must see
        # it cooling down or disabled already.
        changes = pool.failed(step.lease.key, failure.verdict, now)
        step.lease.release()
        verdict = failure.verdict
        if not verdict.retryable:
            self._final = failure
        else:
            if verdict.other_model:
                self._too_small.add(step.deployment.model)
            self._last = failure
            self._last_provider = step.deployment.provider.name
            self._backoff_due = True
        return changes

    def _backoff(self, last: Failure) -> float:
        """The wait before retrying `last`: none after a key fault (the next key is tried at
        once) or where waiting cannot help; else full-jitter backoff, or the upstream's own
        retry-after when that is longer (up to max_retry_after_s: a longer one fails over at
        once). A 429's or a 503/529's wait is kept by key and provider health instead."""
        verdict = last.verdict
        if verdict.key_action is KeyAction.DISABLE or verdict.immediate:
            return 0.0
        policy = self.route.retry
        delay = backoff_s(self.attempts, policy.base_delay_s, policy.max_delay_s, self.rng)
        wait = verdict.wait_s
        if (
            wait is not None
            and verdict.key_action is KeyAction.NONE
            and not verdict.provider_backoff
            and wait <= policy.max_retry_after_s
        ):
            delay = max(delay, wait)
        return delay

    def _pick(
        self, now: float, *, untried_only: bool
    ) -> tuple[int, Deployment, KeyLease] | float | None:
        """The next deployment and key: deployments in order, keys not yet tried in this
        request first (only those, with `untried_only`); a provider backing off, a deployment
        over its budget and one whose upstream model is too small are skipped. When nothing
        is usable, the epoch time when something comes back (None if nothing is blocked,
        only busy)."""
        soonest: float | None = None
        self._busy = False
        for prefer_untried in (True,) if untried_only else (True, False):
            for index, deployment in enumerate(self.route.deployments):
                if index in self._over_budget or deployment.model in self._too_small:
                    continue
                pool = deployment.pool
                blocked = pool.provider_blocked_until(now)
                if blocked is None:
                    exclude = frozenset(self._tried[index]) if prefer_untried else frozenset()
                    lease = pool.acquire(now, exclude)
                    if lease is not None:
                        return index, deployment, lease
                    if pool.usable_keys(now) > 0:
                        self._busy = True  # a key at its cap: a release frees it
                    blocked = pool.earliest_unblock(now)
                if blocked is not None:
                    soonest = blocked if soonest is None else min(soonest, blocked)
        return soonest

    def _choose(self, now: float) -> Step:
        last = self._last
        narrowed = last is not None and (last.verdict.other_key or last.verdict.other_model)
        choice = self._pick(now, untried_only=last is not None and last.verdict.other_key)
        if isinstance(choice, tuple):
            index, deployment, lease = choice
            retry, self._pending = self._pending, None
            return Try(index, deployment, lease, retry)
        if narrowed and last is not None:
            # Nothing left that could answer differently: the upstream's own answer.
            return Fail(last)
        if self._over_budget and len(self._over_budget) == len(self.route.deployments):
            soonest = min(self._over_budget.values())
            error = _over_budget_error(self.route, soonest)
            if self.queue_s > 0 and soonest <= self.queue_s:
                # Only time refills a budget: take a key only once it has (a release
                # elsewhere must not wake this request to be refused again).
                self._budget_at = now + soonest
                return Queue(error, soonest)
            return Fail(error)
        wait = None if choice is None else choice - now
        policy = self.route.retry
        if wait is not None and wait <= policy.max_retry_after_s and now + wait < self.deadline:
            # Every key is cooling down (or the provider backing off) for a short while:
            # waiting is better than failing.
            return Sleep(max(wait, 0.0))
        error = _no_key_error(self.route, wait)
        if self.queue_s > 0 and (self._busy or wait is None or wait <= self.queue_s):
            # A busy key comes back on release; a blocked one at `wait` (a hint if later).
            return Queue(error, wait if wait is not None and wait <= self.queue_s else None)
        return Fail(error)

    def hedge(self) -> Try | None:
        """A parallel attempt on a key (or deployment) this request has not used, if one is
        usable now; None otherwise (no hedge then)."""
        choice = self._pick(self.clock(), untried_only=True)
        if not isinstance(choice, tuple):
            return None
        index, deployment, lease = choice
        return Try(index, deployment, lease, None)

    def drop_taken(self) -> None:
        """The request ends without using the key the queue handed it: release it."""
        if self._taken is not None:
            self._taken.lease.release()
            self._taken = None

    def take(self) -> Try | None:
        """The capacity queue offers capacity: take a key now if one is usable (it becomes
        the next step), else None. Deployments skipped for their budget are tried again."""
        if self._taken is not None:
            return self._taken
        now = self.clock()
        if self._over_budget:
            if now < self._budget_at:
                return None
            self._over_budget.clear()
        choice = self._pick(now, untried_only=False)
        if not isinstance(choice, tuple):
            return None
        index, deployment, lease = choice
        retry, self._pending = self._pending, None
        self._taken = Try(index, deployment, lease, retry)
        return self._taken


def _over_budget_error(route: Route, wait: float) -> GatewayError:
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        429,
        Kind.RATE_LIMITED,
        f"The upstream capacity configured for the model '{route.name}' is used up "
        f"(provider limits). Retry in {wait:.3f} s.",
        headers={"retry-after": str(seconds), "retry-after-ms": str(math.ceil(wait * 1000))},
    )


def _no_key_error(route: Route, wait: float | None) -> GatewayError:
    if wait is None:
        return GatewayError(
            503,
            Kind.UPSTREAM_UNAVAILABLE,
            f"Every upstream key for the model '{route.name}' is at its concurrency limit.",
            headers={"retry-after": "1"},
        )
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        503,
        Kind.UPSTREAM_UNAVAILABLE,
        f"No upstream key is usable for the model '{route.name}': every key is cooling down "
        f"or disabled, or the provider is backing off. Retry in {seconds} s.",
        headers={"retry-after": str(seconds), "retry-after-ms": str(int(wait * 1000))},
    )


# -- the loop ------------------------------------------------------------------------------

ProviderCharge = Callable[[Deployment], Awaitable[float | None]]


@dataclass(slots=True)
class Served:
    """An attempt that answered: its result, and the key lease and span that stay open while
    the answer is delivered (per-key concurrency caps count a stream until it ends)."""

    result: Reply | OpenStream
    step: Try

    def close(self, report: Report, abandoned: bool = False) -> None:
        """The answer is delivered, or `abandoned` (the client went away): the key is free,
        the attempt span ends."""
        self.step.lease.release()
        finish_attempt_span(report.attempt_span, report, "client_cancel" if abandoned else None)


@dataclass(slots=True)
class Attempts:
    """The I/O around the planner, for one request."""

    request: Request
    upstream: Upstream
    tel: Telemetry
    report: Report
    queue: CapacityQueue | None = None  # policy.queue (None: no queue)
    max_queue: int = 1000  # policy.queue.max_length
    hedges: HedgeStats | None = None  # the routes' observed time to a first event
    _tasks: Tasks = field(default_factory=lambda: Tasks("attempts"))

    async def run(self, planner: Planner, charge: ProviderCharge) -> Served | Failure:
        """Attempts until one answers or the planner gives up. Returns what answered (still
        open: the caller closes it) or the last failure; raises a GatewayError of the
        gateway's own (no key usable, provider budgets spent)."""
        while True:
            step = planner.next()
            if isinstance(step, Fail):
                if isinstance(step.answer, GatewayError):
                    raise step.answer
                return step.answer
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            if isinstance(step, Queue):
                await self._queued(planner, step)
                continue
            try:
                wait = await charge(step.deployment)
            except BaseException:  # the client left during the charge: the key is free again
                step.lease.release()
                raise
            if wait is not None:
                # Over the provider's own budget: not an attempt; fall back to the next one.
                planner.over_budget(step, wait)
                continue
            if step.retry is not None:
                self._retried(step.retry)
            after_s = self._hedge_after()
            if after_s is None:
                served = await self._attempt(planner, step)
            else:
                served = await self._hedged(planner, step, charge, after_s)
            if served is not None:
                return served

    def _hedge_after(self) -> float | None:
        """Seconds after which a silent attempt gets a parallel twin (None: no hedging)."""
        hedge = self.request.route.hedge
        if hedge is None or self.hedges is None:
            return None
        if hedge.after_ms == "p95":
            return self.hedges.p95(self.request.route.name)
        return float(hedge.after_ms) / 1000

    async def _hedged(
        self, planner: Planner, first: Try, charge: ProviderCharge, after_s: float
    ) -> Served | None:
        """`first`, and up to `max_hedges` more attempts on other keys started each `after_s`
        while none has answered: the first to give a valid first event (or a whole answer)
        wins and the others are cancelled at once (connection closed, lease released). Each
        attempt reports into its own scratch report; the winner's goes to the request's."""
        assert self.request.route.hedge is not None
        max_hedges = self.request.route.hedge.max_hedges
        main = self.report
        runs: dict[asyncio.Task[Served | None], Report] = {}
        order: list[asyncio.Task[Served | None]] = []

        def start(step: Try) -> None:
            scratch = dataclasses.replace(main, timings=Timings(), retry_reasons=[])
            task = self._tasks.spawn(self._attempt(planner, step, scratch), "hedged-attempt")
            runs[task] = scratch
            order.append(task)

        start(first)
        hedges = 0
        winner: tuple[asyncio.Task[Served | None], Served] | None = None
        try:
            while winner is None:
                pending = [t for t in order if not t.done()]
                if not pending:
                    break
                timeout = after_s if hedges < max_hedges else None
                done, _ = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    hedges += 1
                    step = planner.hedge()
                    if step is None:
                        hedges = max_hedges  # no other key to race with
                        continue
                    try:
                        refused = await charge(step.deployment) is not None
                    except BaseException:
                        step.lease.release()
                        raise
                    if refused:
                        step.lease.release()  # over the provider budget: no hedge
                        hedges = max_hedges
                        continue
                    main.hedged = True
                    start(step)
                    continue
                for task in order:
                    if task in done and winner is None and (served := task.result()) is not None:
                        winner = (task, served)
        finally:
            losers = [t for t in order if winner is None or t is not winner[0]]
            for task in losers:
                if not task.done():
                    task.cancel()
            try:
                # Shielded: the losers' leases are released even if the client leaves now.
                await asyncio.shield(asyncio.gather(*losers, return_exceptions=True))
            except BaseException:
                if winner is not None:  # nobody will deliver it
                    delivered = winner[1]
                    if isinstance(delivered.result, OpenStream):
                        delivered.result.response.close()
                    delivered.close(runs[winner[0]], abandoned=True)
                raise
            for task in losers:  # a loser that answered at the same moment: closed too
                if not task.cancelled() and task.exception() is None:
                    lost = task.result()
                    if lost is not None:
                        if isinstance(lost.result, OpenStream):
                            lost.result.response.close()
                        lost.close(runs[task], abandoned=True)
            main.attempts += len(order)
            if len(order) > 1:  # a hedge started in this round
                outcome = (
                    "all_failed"
                    if winner is None
                    else ("first_won" if winner[0] is order[0] else "hedge_won")
                )
                main.hedge_won = None if winner is None else outcome.removesuffix("_won")
                self.tel.metrics.child(self.tel.metrics.hedges, outcome).inc()
        if winner is None:
            _adopt(main, runs[order[-1]])  # the failure the request reports is the last one's
            return None
        task, served = winner
        _adopt(main, runs[task])
        return served

    async def _queued(self, planner: Planner, step: Queue) -> None:
        """Wait in the capacity queue until the planner takes a key (its next step), or
        raise the error the request would have had without the queue."""
        queue, report = self.queue, self.report
        remaining = planner.queue_s - report.queued_s
        if queue is None or remaining <= 0:
            raise step.error
        provider = self.request.route.deployments[0].provider.name
        if len(queue) >= self.max_queue:
            raise _queue_full(self.request.route.name)
        loop = asyncio.get_running_loop()
        metrics = self.tel.metrics
        depth = metrics.child(metrics.queue_depth, provider)
        depth.inc()
        started = time.perf_counter()
        try:
            taken = await queue.wait(
                planner.take,
                priority=self.request.caller.priority,
                provider=provider,
                timeout_s=min(remaining, max(0.0, planner.deadline - time.time())),
                max_length=self.max_queue,
                retry_at=None if step.retry_in is None else loop.time() + step.retry_in,
                group=self.request.route.name,
            )
        except asyncio.CancelledError:
            planner.drop_taken()  # the client left while a key was being handed to it
            raise
        except QueueFull:
            raise _queue_full(self.request.route.name) from None
        finally:
            depth.dec()
            waited = time.perf_counter() - started
            report.queued_s += waited
            metrics.child(metrics.queue_wait, provider).observe(waited)
        if taken is None:
            raise step.error

    async def _attempt(
        self, planner: Planner, step: Try, report: Report | None = None
    ) -> Served | None:
        """One attempt; `report`: a hedged attempt's scratch report (else the request's)."""
        hedged = report is not None
        report = report or self.report
        span = self._span(step, planner.begin(step))
        report.attempting(step.deployment, step.lease.key, span)
        started = report.timings.attempt_started = time.perf_counter()
        try:
            result = await self.upstream.attempt(self.request, step.deployment, step.lease, report)
        except BaseException:  # the client went away (the handler is cancelled), or lost
            step.lease.release()
            finish_attempt_span(span, report, "hedge_lost" if hedged else "client_cancel")
            raise
        if isinstance(result, Failure):
            finish_attempt_span(span, report, result.verdict.reason)
            self._health(step, planner.record(step, result))
            return None
        planner.record(step, None)
        if self.hedges is not None:
            self.hedges.observe(self.request.route.name, time.perf_counter() - started)
        return Served(result, step)

    def _span(self, step: Try, number: int) -> Span:
        endpoint = self.request.endpoint
        deployment = step.deployment
        key = step.lease.key
        span = self.tel.child(
            self.report.span, f"{endpoint.operation} {deployment.model}", SpanKind.CLIENT
        )
        if span.is_recording():
            span.set_attributes(
                attrs(
                    gen_ai__operation__name=endpoint.operation,
                    gen_ai__provider__name=endpoint.family.value,
                    gen_ai__request__model=deployment.model,
                    gen_ai__request__stream=self.request.parsed.stream,
                    gen_ai__request__max_tokens=_max_tokens(self.request),
                    server__address=deployment.server_address,
                    server__port=deployment.server_port,
                    gateway__deployment=f"{deployment.provider.name}/{deployment.model}",
                    gateway__key_id=key.id,
                    gateway__key_fp=key.fingerprint,
                    gateway__attempt=number,
                )
            )
        return span

    def _retried(self, retry: Retry) -> None:
        report = self.report
        report.retry_reasons.append(retry.reason)
        self.tel.metrics.child(self.tel.metrics.retries, retry.provider, retry.reason).inc()
        backoff_ms = round(retry.backoff_s * 1000, 3)
        _log.info(
            "upstream attempt failed",
            attempt=report.attempts,
            reason=retry.reason,
            deployment=report.deployment,
            key_id=report.key_id,
            key_fp=report.key_fp,
            caller=report.caller,
            backoff_ms=backoff_ms,
        )
        report.span.add_event(
            "gateway.retry",
            {
                "gateway.attempt": report.attempts + 1,
                "gateway.retry.reason": retry.reason,
                "gateway.retry.backoff_ms": backoff_ms,
            },
        )

    def _health(self, step: Try, changes: list[HealthChange]) -> None:
        provider = step.deployment.provider.name
        for change in changes:
            seconds = round(max(0.0, change.block.until - time.time()), 3)
            log_health(provider, change, seconds)
            self.report.span.add_event(
                "gateway.provider_backoff"
                if change.fingerprint is None
                else f"gateway.key_{change.block.state}",
                attrs(
                    gateway__key_id=change.subject if change.fingerprint else None,
                    gateway__key_fp=change.fingerprint,
                    gateway__provider=provider,
                    gateway__reason=change.block.reason,
                    gateway__seconds=seconds,
                ),
            )


def _queue_full(model: str) -> GatewayError:
    return GatewayError(
        503,
        Kind.OVERLOADED,
        f"Every upstream key for the model '{model}' is busy and the gateway's queue for them "
        "is full.",
        headers={"retry-after": "1"},
    )


class HedgeStats:
    """Per route, the time attempts took to a valid first event (the last 256): the `p95` of
    `hedge.after_ms: p95`. Until 20 are known, no hedging on p95."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def observe(self, route: str, seconds: float) -> None:
        samples = self._samples.get(route)
        if samples is None:
            samples = self._samples[route] = deque(maxlen=256)
        samples.append(seconds)

    def p95(self, route: str) -> float | None:
        samples = self._samples.get(route)
        if samples is None or len(samples) < 20:
            return None
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _adopt(main: Report, attempt: Report) -> None:
    """The winning hedged attempt's facts become the request's."""
    main.deployment = attempt.deployment
    main.provider = attempt.provider
    main.key_id = attempt.key_id
    main.key_fp = attempt.key_fp
    main.attempt_span = attempt.attempt_span
    main.upstream_status = attempt.upstream_status
    main.upstream_request_id = attempt.upstream_request_id
    main.timings.attempt_started = attempt.timings.attempt_started
    main.timings.connect_s = attempt.timings.connect_s
    main.timings.first_upstream_byte = attempt.timings.first_upstream_byte


def _max_tokens(request: Request) -> int | None:
    for name in request.endpoint.cap_fields:
        value = as_int(request.parsed.body.get(name))
        if value is not None:
            return value
    return None


def log_health(provider: str, change: HealthChange, seconds: float) -> None:
    block = change.block
    fields = {
        "provider": provider,
        "reason": block.reason,
        "seconds": seconds,
        "strikes": block.strikes,
    }
    if block.state == "disabled":
        _log.error(
            "upstream key disabled", key_id=change.subject, key_fp=change.fingerprint, **fields
        )
    elif block.state == "cooldown":
        _log.warning(
            "upstream key cooling down", key_id=change.subject, key_fp=change.fingerprint, **fields
        )
    else:
        _log.warning("upstream provider backing off", **fields)
