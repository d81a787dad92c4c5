"""GCRA (generic cell rate algorithm) as pure functions of the stored TAT and the clock.

A limit of `limit` units per `period` seconds has an emission interval T = period / limit and a
burst tolerance of one whole period: a caller may spend its full budget at once, after which
budget comes back continuously (one unit every T). One number per key (the theoretical arrival
time, TAT); exact `retry_after`, `remaining` and `reset` for headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Float tolerance (seconds): the last unit of a full budget spent in one instant must not be
# denied by rounding (60/7 * 7 is not exactly 60).
EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    tat: float  # the TAT to store (unchanged when denied)
    retry_after: float  # seconds until this cost would be allowed (0 when allowed)
    remaining: int  # units left after this decision
    reset_after: float  # seconds until the budget is whole again


def gcra(tat: float | None, now: float, limit: int, period: float, cost: int) -> GcraResult:
    """Decide one request of `cost` units. A cost above `limit` is charged as `limit` (it can
    pass with a full budget; reconciliation then charges the rest)."""
    interval = period / limit
    cost = max(0, min(cost, limit))
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * interval
    allow_at = new_tat - period
    if allow_at - now > EPSILON:
        return GcraResult(
            allowed=False,
            tat=base,
            retry_after=allow_at - now,
            remaining=_remaining(base, now, period, interval),
            reset_after=base - now,
        )
    return GcraResult(
        allowed=True,
        tat=new_tat,
        retry_after=0.0,
        remaining=_remaining(new_tat, now, period, interval),
        reset_after=new_tat - now,
    )


def adjust(tat: float | None, now: float, limit: int, period: float, delta: int) -> float:
    """Charge (`delta` > 0) or refund (`delta` < 0) units after the fact (token reconciliation).
    A refund never takes the TAT below `now`: an unused budget cannot be banked."""
    base = now if tat is None or tat < now else tat
    return max(now, base + delta * (period / limit))


def _remaining(tat: float, now: float, period: float, interval: float) -> int:
    # The same tolerance as the decision, so that `remaining` units always pass.
    return max(0, math.floor((period - (tat - now) + EPSILON) / interval))
