"""The queue for shared upstream capacity (`policy.queue`).

When no attempt can start because every key is at its `max_concurrent_per_key`, cooling down
for a while, or the provider's own budget is spent for now, a request waits here instead of
failing: higher tier priority first, first come first served within a priority. Capacity is
handed over, not raced for: when a key's lease is released (or a timer says a cooldown or a
budget has run out) the waiters are offered the capacity in order, each taking it with its own
synchronous `take` (the planner's pick), so a request that arrives at that moment cannot
jump the queue. A waiter that times out gets today's error; one whose client goes away
(its task is cancelled) leaves at once. One queue per process, across reloads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
# While a waiter's capacity comes back by time (a cooldown, a budget), how often it looks.
_RECHECK_S = 0.25


class QueueFull(Exception):
    """`max_length` requests are waiting already."""


class _Waiter(Generic[T]):
    __slots__ = ("future", "group", "provider", "retry_at", "take")

    def __init__(
        self,
        future: asyncio.Future[T],
        take: Callable[[], T | None],
        provider: str,
        retry_at: float | None,
        group: str,
    ) -> None:
        self.future = future
        self.take = take
        self.provider = provider
        self.group = group  # waiters of one group (a model) take alike: one refusal is theirs
        self.retry_at = retry_at  # loop time when capacity returns by itself (a cooldown)


class CapacityQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, _Waiter[Any]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._offering = False
        self._again = False
        self.depth: dict[str, int] = {}  # waiting requests per provider (a metric)

    def __len__(self) -> int:
        return len(self._heap)

    async def wait(
        self,
        take: Callable[[], T | None],
        *,
        priority: int,
        provider: str,
        timeout_s: float,
        max_length: int,
        retry_at: float | None = None,
        group: str = "",
    ) -> T | None:
        """Wait until `take()` gives something (returned) or `timeout_s` passes (None).
        `retry_at` (loop time): when capacity comes back by itself. Raises QueueFull."""
        if len(self._heap) >= max_length:
            raise QueueFull
        loop = asyncio.get_running_loop()
        waiter: _Waiter[T] = _Waiter(loop.create_future(), take, provider, retry_at, group)
        entry = (-priority, next(self._seq), waiter)
        heapq.heappush(self._heap, entry)
        self.depth[provider] = self.depth.get(provider, 0) + 1
        self._arm(loop)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter.future
        except TimeoutError:
            # Capacity handed over at the very moment the wait ran out: it is taken.
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()
            return None
        finally:
            self.depth[provider] -= 1
            if not waiter.future.done():
                waiter.future.cancel()
            self._remove(entry)
            self._arm(loop)

    def _remove(self, entry: tuple[int, int, _Waiter[Any]]) -> None:
        try:
            self._heap.remove(entry)
        except ValueError:
            return
        heapq.heapify(self._heap)

    def offer(self) -> None:
        """Capacity may have freed: offer it to the waiters, best first, until one cannot
        use it... and go on: a lower waiter may need another provider's key."""
        if self._offering:
            self._again = True  # a release during an offer: offer once more after it
            return
        if not self._heap:
            return
        self._offering = True
        try:
            self._again = True
            while self._again:
                self._again = False
                refused: set[str] = set()  # groups whose best waiter could not take
                for entry in sorted(self._heap):
                    waiter = entry[2]
                    if waiter.future.done() or (waiter.group and waiter.group in refused):
                        continue
                    taken = waiter.take()
                    if taken is not None:
                        waiter.future.set_result(taken)
                        self._remove(entry)
                    else:
                        refused.add(waiter.group)
        finally:
            self._offering = False
        self._arm(asyncio.get_running_loop())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """A timer for the earliest moment capacity returns by itself (cooldowns, budgets)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        times = [e[2].retry_at for e in self._heap if e[2].retry_at is not None]
        if times:
            self._timer = loop.call_at(max(min(times), loop.time() + 0.001), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        due = [e[2] for e in self._heap if e[2].retry_at is not None and e[2].retry_at <= now]
        for waiter in due:
            # Offered now; if it still cannot start (another cooldown), look again shortly.
            waiter.retry_at = now + _RECHECK_S
        self.offer()
