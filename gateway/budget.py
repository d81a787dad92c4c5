"""Spend budgets on the request path (tiers.<t>.budget: tokens and cost per UTC day and month).

- Admission (`check`): a caller whose budget is spent gets 429 `budget_exceeded`, with
  `retry-after` until the spent window is whole again; every answer carries what is left
  (`x-gateway-budget-remaining`, `x-gateway-budget-remaining-cost`).
- A committed stream is metered (`BudgetMeter`): the relay hands it each content event
  before the event's bytes are written; an event counts max(1, ceil(chars / 4)) output
  tokens and their cost at the deployment's output price. When a budget reaches zero the
  relay ends the stream right after that event, with a terminal `budget_exceeded` event in
  the caller's format. Charges go to the limits backend in the background, one in flight at
  a time, and at most every CHARGE_INTERVAL_S while more than a tenth of the tightest budget
  is left (then after every event). A charge starts from a content event (no timer of its
  own: on this path every extra loop wake-up costs more than the charge). Each reply brings
  the shared figures (the caller's other streams, on every instance), and when they say the
  budget is spent the stream ends at its next event boundary.
- At the end (`BudgetMeter.close`, from admission's settlement) the upstream's own usage,
  when it reported it for a stream that ended as it should, replaces the estimate, and the
  difference is charged (or refunded). A whole (non-stream) answer is charged its usage.

The prompt is charged when the stream starts: the upstream's own count when its first event
carries it (Anthropic's message_start), else the gateway's estimate of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.errors import GatewayError, Kind
from gateway.limits.base import Limiter, LimiterUnavailable
from gateway.limits.budget import BudgetSpec, BudgetState, Pricing, money, retry_seconds
from gateway.logs import get_logger
from gateway.providers.base import Usage
from gateway.report import Report
from gateway.tasks import Tasks
from gateway.telemetry import Telemetry

_log = get_logger("gateway.budget")

# Far from the edge, a stream's charges are at least this far apart; within the last tenth of
# the tightest budget every event is charged as soon as the previous charge is back.
CHARGE_INTERVAL_S = 0.25

REMAINING = "x-gateway-budget-remaining"
REMAINING_COST = "x-gateway-budget-remaining-cost"
BUDGET_HEADERS = (REMAINING, REMAINING_COST)
_NAMES = {
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
    "cost_per_day": "cost per day",
    "cost_per_month": "cost per month",
}


def remaining_headers(spec: BudgetSpec, state: BudgetState) -> dict[str, str]:
    headers = {}
    tokens = state.remaining_tokens(spec)
    if tokens is not None:
        headers[REMAINING] = str(max(0, tokens))
    cost = state.remaining_cost(spec)
    if cost is not None:
        headers[REMAINING_COST] = money(cost)
    return headers


async def check(
    limiter: Limiter, subject: str, spec: BudgetSpec, report: Report, tel: Telemetry
) -> BudgetState:
    """The caller's standing under its budgets; raises 429 `budget_exceeded` when one is
    spent (503 when the shared backend is down and the mode is fail_closed)."""
    try:
        state = await limiter.budget(subject, spec, 0, 0)
    except LimiterUnavailable:
        raise GatewayError(
            503,
            Kind.LIMITER_UNAVAILABLE,
            "Budgets are unavailable (their shared store cannot be reached); the gateway is "
            "configured to refuse requests then.",
            headers={"retry-after": "1"},
        ) from None
    if state.degraded:
        report.limiter = "degraded"  # the local fallback's share (Redis is down)
    headers = remaining_headers(spec, state)
    spent = state.spent(spec)
    if spent is not None:
        name, wait = spent
        tel.metrics.child(tel.metrics.budget_exceeded, spec.tier, "admission").inc()
        report.limiter = ("degraded_" if state.degraded else "") + "denied_budget"
        raise GatewayError(
            429,
            Kind.BUDGET_EXCEEDED,
            f"Budget exceeded: the {_NAMES[name]} budget of tier '{spec.tier}' is spent "
            f"(budget_exceeded). It is whole again in {retry_seconds(wait)} s (UTC calendar "
            "windows).",
            # Both SDKs honour retry-after without a cap (the Anthropic SDK would sleep until
            # midnight); they never retry an answer that says it should not be.
            headers={
                "retry-after": str(retry_seconds(wait)),
                "x-should-retry": "false",
                **headers,
            },
        )
    report.extra_headers.update(headers)
    return state


class BudgetTally:
    """One caller's metered streams on this instance: what they counted and have not had
    charged yet, and the freshest shared figures any of them got back. A stream's view of
    what is left is those figures less everything counted here, so the caller's streams on
    one instance see each other at once, not a charge interval late."""

    __slots__ = ("cost", "left_cost", "left_tokens", "meters", "tokens")

    def __init__(self) -> None:
        self.tokens = 0  # counted by the streams here, not yet charged (or in flight)
        self.cost = 0
        self.left_tokens: int | None = None  # the shared figures last seen
        self.left_cost: int | None = None
        self.meters: set[BudgetMeter] = set()


class BudgetTallies:
    """The tallies by caller: one while the caller has a metered stream open here."""

    __slots__ = ("_by",)

    def __init__(self) -> None:
        self._by: dict[str, BudgetTally] = {}

    def __len__(self) -> int:
        return len(self._by)

    def join(self, subject: str, meter: BudgetMeter) -> BudgetTally:
        tally = self._by.get(subject)
        if tally is None:
            tally = self._by[subject] = BudgetTally()
        tally.meters.add(meter)
        return tally

    def leave(self, subject: str, meter: BudgetMeter) -> None:
        tally = self._by.get(subject)
        if tally is not None:
            tally.meters.discard(meter)
            if not tally.meters:
                del self._by[subject]


class BudgetMeter:
    """One committed stream's spend against its caller's budgets (see the module text)."""

    __slots__ = (
        "_charged_cost",
        "_charged_tokens",
        "_closing",
        "_edge_cost",
        "_edge_tokens",
        "_floor_cost",
        "_floor_tokens",
        "_input",
        "_next_charge",
        "_on_spent",
        "_pending_cost",
        "_pending_tokens",
        "_price",
        "_shared_at",
        "_shared_charged",
        "_shared_cost",
        "_shared_tokens",
        "_tallies",
        "_tally",
        "_task",
        "_tasks",
        "_wake",
        "_window_cost",
        "_window_tokens",
        "_windows",
        "failures",
        "limiter",
        "output_tokens",
        "spec",
        "spent",
        "spent_by",
        "subject",
    )

    def __init__(
        self,
        limiter: Limiter,
        subject: str,
        spec: BudgetSpec,
        state: BudgetState,
        pricing: Pricing | None,
        input_tokens: int,
        tallies: BudgetTallies | None = None,
    ) -> None:
        """`tallies`: the instance's per-caller tallies (None: a tally of its own; this
        stream sees the others only through the shared figures)."""
        self.limiter = limiter
        self.subject = subject
        self.spec = spec
        self._price = pricing
        self._input = max(0, input_tokens)
        self.output_tokens = 0  # estimated from the content events so far
        self._charged_tokens = 0  # acknowledged by the backend
        self._charged_cost = 0
        # Of those, what the shared store took (not the local fallback, Redis down).
        self._shared_charged = [0, 0]
        # The prompt is charged with the first flush.
        self._pending_tokens = self._input
        self._pending_cost = pricing.cost(self._input, 0) if pricing is not None else 0
        # Below these, charges are no longer batched: a tenth of the tightest budget, or more
        # when the caller spends faster (twice what all its streams spent, on every instance,
        # in one CHARGE_INTERVAL_S, as the shared figures show it).
        self._floor_tokens = self._edge_tokens = _tenth(spec.tokens_per_day, spec.tokens_per_month)
        self._floor_cost = self._edge_cost = _tenth(spec.cost_per_day, spec.cost_per_month)
        self._shared_at: float | None = None  # perf_counter of the figures the rate is from
        self._shared_tokens: int | None = None
        self._shared_cost: int | None = None
        self._next_charge = 0.0  # perf_counter: no charge starts before (far from the edge)
        # The windows the last charge went to, and what this stream charged in them.
        self._windows = state.windows
        self._window_tokens = self._window_cost = 0
        self.spent = False
        self.spent_by: str | None = None  # tokens | cost
        self._on_spent: Callable[[], object] | None = None
        self._tallies = tallies
        tally = self._tally = tallies.join(subject, self) if tallies is not None else BudgetTally()
        tally.meters.add(self)
        tally.tokens += self._pending_tokens
        tally.cost += self._pending_cost
        self._see(state)
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks = Tasks("budget-meter")
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # charges the backend did not take

    def start(self, on_spent: Callable[[], object]) -> None:
        """Start charging in the background; `on_spent` is called (once) when the shared
        figures say a budget is spent."""
        self._on_spent = on_spent
        self._task = self._tasks.spawn(self._flush_loop(), "budget-charges")
        self._wake.set()  # the prompt

    def roomy(self, size: int) -> bool:
        """Whether no read of `size` bytes (plus what the decoder holds) can spend a budget:
        an event's output tokens never exceed its bytes."""
        left, left_cost = self._view()
        if left is not None and left <= size:
            return False
        left = left_cost
        price = self._price
        if left is not None and price is not None:
            out = self.output_tokens
            return left > price.output_cost(out + size) - price.output_cost(out)
        return True

    def count(self, chars: int, now: float) -> bool:
        """One content event of `chars` characters of output, at `now` (perf_counter);
        whether a budget is spent now (the relay ends the stream after this event)."""
        tokens = (chars + 3) // 4 or 1
        before = self.output_tokens
        self.output_tokens = before + tokens
        self._pending_tokens += tokens
        price = self._price
        cost = 0
        if price is not None:
            cost = price.output_cost(before + tokens) - price.output_cost(before)
            self._pending_cost += cost
        self._tally.tokens += tokens
        self._tally.cost += cost
        self._check()
        if now >= self._next_charge or self._near_edge():
            self._wake.set()  # the charger runs after this loop turn's callbacks
        return self.spent

    def _near_edge(self) -> bool:
        left, left_cost = self._view()
        if left is not None and left <= self._edge_tokens:
            return True
        return left_cost is not None and left_cost <= self._edge_cost

    def _view(self) -> tuple[int | None, int | None]:
        """What is left as this stream knows it (tokens, nano-units; None: no such budget):
        the freshest shared figures less everything counted here and not charged yet."""
        tally = self._tally
        tokens = None if tally.left_tokens is None else tally.left_tokens - tally.tokens
        cost = None if tally.left_cost is None else tally.left_cost - tally.cost
        return tokens, cost

    def _check(self) -> None:
        """Mark the budget spent when what is left reached zero; every other stream of the
        caller here (its tally) learns it too (`on_spent`: each ends at its next event
        boundary; this one is ended by its caller, from `count`'s answer or `_flush`)."""
        left, left_cost = self._view()
        if left is not None and left <= 0:
            by = "tokens"
        elif left_cost is not None and left_cost <= 0:
            by = "cost"
        else:
            return
        if not self.spent:
            self.spent, self.spent_by = True, by
        for meter in list(self._tally.meters):
            if meter is not self and not meter.spent:
                meter.spent, meter.spent_by = True, by
                if meter._on_spent is not None:
                    meter._on_spent()

    def _see(self, state: BudgetState) -> None:
        """Take the shared figures, less what was counted here and not yet charged."""
        shared_tokens = state.remaining_tokens(self.spec)
        shared_cost = state.remaining_cost(self.spec)
        self._rate(shared_tokens, shared_cost)
        self._tally.left_tokens, self._tally.left_cost = shared_tokens, shared_cost
        self._check()

    def _rate(self, tokens: int | None, cost: int | None) -> None:
        """Move the edges with the caller's rate of spending: from shared figures at least half
        an interval apart (shorter spans, near the edge, keep the last estimate)."""
        now = time.perf_counter()
        since = self._shared_at
        if since is not None:
            elapsed = now - since
            if elapsed < CHARGE_INTERVAL_S / 2:
                return
            scale = 2 * CHARGE_INTERVAL_S / elapsed
            if tokens is not None and self._shared_tokens is not None:
                spent = self._shared_tokens - tokens
                self._edge_tokens = max(self._floor_tokens, int(spent * scale))
            if cost is not None and self._shared_cost is not None:
                spent = self._shared_cost - cost
                self._edge_cost = max(self._floor_cost, int(spent * scale))
        self._shared_at, self._shared_tokens, self._shared_cost = now, tokens, cost

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            charged = await self._flush()
            self._next_charge = time.perf_counter() + CHARGE_INTERVAL_S
            # What was counted while the charge was out waits for the next count that may
            # start one (far from the edge: after the interval)...
            self._wake.clear()
            if self._closing:
                return
            if charged and (self._pending_tokens or self._pending_cost) and self._near_edge():
                # ...except near the edge, where it goes at once (not after a failed charge:
                # a backend that refuses at once would make this spin).
                self._wake.set()

    async def _flush(self) -> bool:
        """Charge what is pending; False when the backend did not take it."""
        tokens, cost = self._pending_tokens, self._pending_cost
        if not tokens and not cost:
            return True
        self._pending_tokens = self._pending_cost = 0
        try:
            state = await self.limiter.budget(self.subject, self.spec, tokens, cost)
        except LimiterUnavailable:
            # Kept for the next charge (the stream goes on under the figures known here).
            self._pending_tokens += tokens
            self._pending_cost += cost
            self.failures += 1
            return False
        # Counted in the tally until the reply's figures hold it (not while in flight).
        self._tally.tokens -= tokens
        self._tally.cost -= cost
        self._charged_tokens += tokens
        self._charged_cost += cost
        self._charged_in(state, tokens, cost)
        was_spent = self.spent
        self._see(state)
        if self.spent and not was_spent and self._on_spent is not None:
            self._on_spent()
        return True

    async def close(self, usage: Usage | None, complete: bool) -> tuple[int, int]:
        """The stream is over: stop charging in the background, replace the estimate with
        the upstream's usage (its prompt count whenever it gave one; its output count only
        for a stream that ended as it should: a cut stream's is not final) and charge the
        difference. Returns what the stream was charged in all (tokens, nano-units)."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        # What is still pending goes in the correction below, charged on its own.
        tally = self._tally
        tally.tokens -= self._pending_tokens
        tally.cost -= self._pending_cost
        self._pending_tokens = self._pending_cost = 0
        tally.meters.discard(self)
        if self._tallies is not None:
            self._tallies.leave(self.subject, self)
        prompt = self._input
        output = self.output_tokens
        if usage is not None:
            if usage.input_tokens is not None:
                prompt = usage.input_tokens
            if complete and usage.output_tokens is not None:
                output = usage.output_tokens
        price = self._price
        total_tokens = prompt + output
        total_cost = price.cost(prompt, output) if price is not None else 0
        # The correction goes to the windows of the last charge; a refund takes back at most
        # what this stream charged there (a stream across midnight must not leave the new day
        # with less than nothing).
        # Against what the shared store took: what the local fallback got during an outage is
        # not there to correct.
        tokens = max(total_tokens - self._shared_charged[0], -self._window_tokens)
        cost = max(total_cost - self._shared_charged[1], -self._window_cost)
        await self.charge(tokens, cost)
        return self._charged_tokens, self._charged_cost

    async def charge(self, tokens: int, cost: int) -> None:
        if not tokens and not cost:
            return
        try:
            state = await self.limiter.budget(
                self.subject, self.spec, tokens, cost, at=self._windows
            )
        except LimiterUnavailable:
            self.failures += 1
            _log.warning("budget charge lost", caller=self.subject, tokens=tokens)
            return
        self._charged_tokens += tokens
        self._charged_cost += cost
        self._charged_in(state, tokens, cost)

    def _charged_in(self, state: BudgetState, tokens: int, cost: int) -> None:
        """Keep what this stream charged in the windows of its last charge: what a refund at
        the end may take back. Charges the local fallback took (Redis down) do not count: a
        refund sent once Redis is back must not take from it what it never got."""
        windows = state.windows
        if windows.day != self._windows.day:
            self._windows = windows
            self._window_tokens = self._window_cost = 0
        if not state.degraded:
            self._window_tokens += tokens
            self._window_cost += cost
            self._shared_charged[0] += tokens
            self._shared_charged[1] += cost


def _tenth(*limits: int | None) -> int:
    set_ = [limit for limit in limits if limit is not None]
    return min(set_) // 10 if set_ else 0


async def charge_answer(
    limiter: Limiter,
    subject: str,
    spec: BudgetSpec,
    pricing: Pricing | None,
    usage: Usage | None,
    prompt_estimate: int,
    body_bytes: int = 0,
) -> tuple[int, int]:
    """Charge a whole (non-stream) answer its usage; without one, the prompt estimate and
    the answer's bytes / 4 as its output (on the high side, as the prompt estimate). Returns
    what was charged (tokens, nano-units)."""
    prompt = prompt_estimate
    output = -(-body_bytes // 4)
    if usage is not None:
        prompt = usage.input_tokens if usage.input_tokens is not None else prompt
        output = usage.output_tokens or 0
    tokens = prompt + output
    cost = pricing.cost(prompt, output) if pricing is not None else 0
    if tokens or cost:
        try:
            await limiter.budget(subject, spec, tokens, cost)
        except LimiterUnavailable:
            _log.warning("budget charge lost", caller=subject, tokens=tokens)
    return tokens, cost
