"""Spend budgets: tokens and cost per UTC calendar day and month (pure maths, no I/O).

Cost is kept in integer nano-units of the pricing currency (1 unit = 10**9), so that sums
are exact in Redis (INCRBY) and in Lua (doubles hold integers exactly up to 2**53, about
9 million units). A window is named by its calendar date: the day `2026-12-01` and the month
`2026-12` (UTC); its counters are dropped once it has ended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

NANO = 1_000_000_000  # nano-units per currency unit
# A window's counters outlive its end by this much (an instance whose clock is a little behind
# still charges the window it thinks it is in).
WINDOW_GRACE_S = 3600.0


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A tier's budgets (None = no such budget); costs in nano-units."""

    tier: str
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_day: int | None = None
    cost_per_month: int | None = None

    @property
    def has_tokens(self) -> bool:
        return self.tokens_per_day is not None or self.tokens_per_month is not None

    @property
    def has_cost(self) -> bool:
        return self.cost_per_day is not None or self.cost_per_month is not None

    def scaled(self, divisor: int) -> BudgetSpec:
        """Each budget divided by `divisor` (at least 1): one instance's share of the whole
        (the local fallback while the shared backend is down)."""
        if divisor <= 1:
            return self

        def share(value: int | None) -> int | None:
            return None if value is None else max(1, value // divisor)

        return BudgetSpec(
            self.tier,
            share(self.tokens_per_day),
            share(self.tokens_per_month),
            share(self.cost_per_day),
            share(self.cost_per_month),
        )


@dataclass(frozen=True, slots=True)
class Windows:
    """The calendar day and month (UTC) a moment falls in, and when each ends (unix s)."""

    day: str  # 2026-12-01
    month: str  # 2026-12
    day_start: float
    day_end: float
    month_end: float

    @classmethod
    def at(cls, unix_s: float) -> Windows:
        # Whole seconds: fromtimestamp rounds to the microsecond, which would put the last
        # instant of a day in the next one.
        t = datetime.fromtimestamp(math.floor(unix_s), UTC)
        day = datetime(t.year, t.month, t.day, tzinfo=UTC)
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return cls(
            day=f"{t.year:04d}-{t.month:02d}-{t.day:02d}",
            month=f"{t.year:04d}-{t.month:02d}",
            day_start=day.timestamp(),
            day_end=(day + timedelta(days=1)).timestamp(),
            month_end=datetime(year, month, 1, tzinfo=UTC).timestamp(),
        )

    def holds(self, unix_s: float) -> bool:
        return self.day_start <= unix_s < self.day_end


class WindowClock:
    """`Windows.at(now)`, computed once per day (the calendar maths is not free)."""

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: Windows | None = None

    def at(self, unix_s: float) -> Windows:
        current = self._current
        if current is None or not current.holds(unix_s):
            current = self._current = Windows.at(unix_s)
        return current


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What a subject has used in its current day and month (after the charge, if any)."""

    windows: Windows
    tokens_day: int
    cost_day: int
    tokens_month: int
    cost_month: int
    backend: str
    now: float  # unix s, when this was read
    degraded: bool = False  # from the local fallback (the shared backend is down)
    # The fallback enforces each budget divided by the number of instances.
    divisor: int = 1

    def remaining_tokens(self, spec: BudgetSpec) -> int | None:
        """Tokens left in the tightest token budget (None: no token budget); may be < 0."""
        spec = spec.scaled(self.divisor)
        return _tightest(
            (spec.tokens_per_day, self.tokens_day), (spec.tokens_per_month, self.tokens_month)
        )

    def remaining_cost(self, spec: BudgetSpec) -> int | None:
        """Nano-units left in the tightest cost budget (None: no cost budget); may be < 0."""
        spec = spec.scaled(self.divisor)
        return _tightest((spec.cost_per_day, self.cost_day), (spec.cost_per_month, self.cost_month))

    def spent(self, spec: BudgetSpec) -> tuple[str, float] | None:
        """The budget that is spent (`tokens_per_day`, ...) and the seconds until every spent
        one is whole again; None when none is spent."""
        spec = spec.scaled(self.divisor)
        day_left = self.windows.day_end - self.now
        month_left = self.windows.month_end - self.now
        worst: tuple[str, float] | None = None
        for name, limit, used, wait in (
            ("tokens_per_month", spec.tokens_per_month, self.tokens_month, month_left),
            ("cost_per_month", spec.cost_per_month, self.cost_month, month_left),
            ("tokens_per_day", spec.tokens_per_day, self.tokens_day, day_left),
            ("cost_per_day", spec.cost_per_day, self.cost_day, day_left),
        ):
            if limit is not None and used >= limit and (worst is None or wait > worst[1]):
                worst = (name, wait)
        return worst


def _tightest(*pairs: tuple[int | None, int]) -> int | None:
    left = [limit - used for limit, used in pairs if limit is not None]
    return min(left) if left else None


@dataclass(frozen=True, slots=True)
class Pricing:
    """A deployment's prices, in nano-units per million tokens."""

    input_per_mtok: int
    output_per_mtok: int

    @classmethod
    def of(cls, input_per_mtok: float, output_per_mtok: float) -> Pricing:
        return cls(round(input_per_mtok * NANO), round(output_per_mtok * NANO))

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Nano-units for that many tokens (rounded up: never under the invoice)."""
        total = input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        return -(-total // 1_000_000)

    def output_cost(self, output_tokens: int) -> int:
        return -(-output_tokens * self.output_per_mtok // 1_000_000)


def money(nano: int) -> str:
    """Nano-units as a decimal in currency units (`4.99985`, `5`, `0`), never negative."""
    units, frac = divmod(max(0, nano), NANO)
    return f"{units}.{frac:09d}".rstrip("0").rstrip(".")


def to_nano(units: float | None) -> int | None:
    return None if units is None else round(units * NANO)


def retry_seconds(wait_s: float) -> int:
    return max(1, math.ceil(wait_s))
