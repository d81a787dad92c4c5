"""The one way the gateway starts background work: named tasks, each kept referenced until it
ends (asyncio holds only weak references, so an unreferenced task can vanish mid-run), with an
exception logged instead of lost. A test keeps `asyncio.create_task` out of everything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from gateway.logs import get_logger

_log = get_logger("gateway")

T = TypeVar("T")


class Tasks:
    """The background tasks of one owner (a JWT verifier, a Redis limiter, the reloader)."""

    __slots__ = ("_name", "_tasks")

    def __init__(self, name: str) -> None:
        self._name = name  # the owner, in log lines
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start `coro` as a task named `name`, kept until it ends. An exception it ends with
        (other than cancellation) is logged with the task's name."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            _log.error(
                "background task failed",
                owner=self._name,
                task=task.get_name(),
                error=type(exc).__name__,
                exc_info=exc,
            )

    async def wait(self) -> None:
        """Wait for every task still running (their exceptions are logged, not raised)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
