"""The capacity queue alone: order, hand-over, timeouts, cancellation, bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.queue import CapacityQueue, QueueFull


class Capacity:
    """Units of something the waiters take one at a time."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.order: list[str] = []

    def taker(self, name: str) -> Callable[[], str | None]:
        def take() -> str | None:
            if self.free <= 0:
                return None
            self.free -= 1
            self.order.append(name)
            return name

        return take


async def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    queue = CapacityQueue()
    cap = Capacity()
    waits = []
    for name, priority in (("std-1", 0), ("std-2", 0), ("gold-1", 10), ("low", -5), ("gold-2", 10)):
        waits.append(
            asyncio.ensure_future(
                queue.wait(
                    cap.taker(name), priority=priority, provider="p", timeout_s=5, max_length=10
                )
            )
        )
        await asyncio.sleep(0)
    assert queue.depth["p"] == 5
    for _ in range(5):
        cap.free += 1
        queue.offer()
        await asyncio.sleep(0)
    assert await asyncio.gather(*waits) == ["std-1", "std-2", "gold-1", "low", "gold-2"]
    assert cap.order == ["gold-1", "gold-2", "std-1", "std-2", "low"]
    assert len(queue) == 0 and queue.depth["p"] == 0


async def test_a_waiter_that_cannot_use_the_capacity_lets_the_next_one_take_it() -> None:
    queue = CapacityQueue()
    other, mine = Capacity(), Capacity()
    first = asyncio.ensure_future(
        queue.wait(other.taker("a"), priority=10, provider="p", timeout_s=5, max_length=10)
    )
    second = asyncio.ensure_future(
        queue.wait(mine.taker("b"), priority=0, provider="q", timeout_s=5, max_length=10)
    )
    await asyncio.sleep(0)
    mine.free = 1
    queue.offer()
    assert await second == "b"
    assert not first.done()
    first.cancel()


async def test_timeout_returns_none_and_leaves_the_queue() -> None:
    queue = CapacityQueue()
    result = await queue.wait(
        Capacity().taker("x"), priority=0, provider="p", timeout_s=0.05, max_length=1
    )
    assert result is None and len(queue) == 0


async def test_a_cancelled_waiter_leaves_at_once_and_is_never_handed_capacity() -> None:
    queue = CapacityQueue()
    cap = Capacity()
    waiting = asyncio.ensure_future(
        queue.wait(cap.taker("gone"), priority=0, provider="p", timeout_s=5, max_length=1)
    )
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(queue) == 0
    cap.free = 1
    queue.offer()
    assert cap.order == [] and cap.free == 1


async def test_a_full_queue_refuses_at_once() -> None:
    queue = CapacityQueue()
    held = asyncio.ensure_future(
        queue.wait(Capacity().taker("a"), priority=0, provider="p", timeout_s=5, max_length=1)
    )
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await queue.wait(
            Capacity().taker("b"), priority=99, provider="p", timeout_s=5, max_length=1
        )
    held.cancel()


async def test_capacity_that_returns_by_time_is_offered_when_it_does() -> None:
    queue = CapacityQueue()
    cap = Capacity()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, lambda: setattr(cap, "free", 1))
    result = await queue.wait(
        cap.taker("t"),
        priority=0,
        provider="p",
        timeout_s=2,
        max_length=1,
        retry_at=loop.time() + 0.06,
    )
    assert result == "t"
