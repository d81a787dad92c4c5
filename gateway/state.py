"""Shared health state of upstream keys and providers (cooldowns, disabled keys, backoffs).

The key pools read it on every attempt and write it when an upstream fails. Reads are
synchronous and local (a dict lookup on the hot path); a shared backend (Redis, [3/4]) keeps
that local view in step with other instances and publishes local writes. Entries are keyed by
key fingerprint, so every instance that holds the same secret skips it, whatever id its own
config gives it; provider-wide entries are keyed `provider:<name>`.

Times are wall-clock epoch seconds: they are compared across instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson
from redis.exceptions import RedisError

from gateway.logs import get_logger
from gateway.tasks import Tasks

_log = get_logger("gateway.state")

BlockState = Literal["cooldown", "disabled", "backoff"]


@dataclass(frozen=True, slots=True)
class Block:
    """One entry: out of rotation until `until` (an expired entry still remembers strikes)."""

    state: BlockState
    until: float
    reason: str
    strikes: int = 1  # consecutive failures of this kind (doubling, spend-cap detection)


class HealthStore(Protocol):
    def get(self, name: str) -> Block | None:
        """The entry for `name`, expired or not; None when healthy."""

    def put(self, name: str, block: Block) -> None:
        """Record (and, for shared backends, publish) an entry."""

    def clear(self, name: str) -> None:
        """`name` succeeded: forget its entry."""


class MemoryHealthStore:
    """The one-process backend: a dict that outlives config reloads (it lives in the app)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, Block] = {}

    def get(self, name: str) -> Block | None:
        return self._entries.get(name)

    def put(self, name: str, block: Block) -> None:
        self._entries[name] = block

    def clear(self, name: str) -> None:
        self._entries.pop(name, None)

    def entries(self) -> dict[str, Block]:
        return dict(self._entries)


class RedisHealthStore:
    """Key health shared by every instance through one Redis hash.

    Reads stay local and synchronous (the hot path never waits on Redis): a background task
    replaces the local view with the shared one every `refresh_s`. Writes update the local view
    at once and are sent to Redis in the background (bounded by the socket timeout; a failed
    write is logged and the entry stays local until the next successful refresh).
    """

    def __init__(
        self,
        client: Any,
        *,
        key: str = "llmgw:{health}",
        refresh_s: float = 1.0,
        timeout_s: float = 0.5,
        keep_s: float = 3600.0,
    ) -> None:
        self._redis = client
        self._key = key
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._keep_s = keep_s  # expired entries still count strikes this long
        self._entries: dict[str, Block] = {}
        self._tasks = Tasks("health-store")
        self._refresher: asyncio.Task[None] | None = None

    def get(self, name: str) -> Block | None:
        return self._entries.get(name)

    def put(self, name: str, block: Block) -> None:
        self._entries[name] = block
        payload = orjson.dumps([block.state, block.until, block.reason, block.strikes])
        self._spawn(self._write("hset", name, payload))

    def clear(self, name: str) -> None:
        self._entries.pop(name, None)
        self._spawn(self._write("hdel", name, None))

    def entries(self) -> dict[str, Block]:
        return dict(self._entries)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            self._tasks.spawn(coro, "health-store-write")
        except RuntimeError:  # no loop (a unit test of the pool): local only
            coro.close()

    async def _write(self, op: str, name: str, payload: bytes | None) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                if op == "hset":
                    await self._redis.hset(self._key, name, payload)
                else:
                    await self._redis.hdel(self._key, name)
        except (RedisError, OSError, TimeoutError) as exc:
            _log.warning("key health not shared (redis)", error=type(exc).__name__)

    async def refresh(self) -> None:
        """Replace the local view with the shared one (and prune long-expired entries)."""
        async with asyncio.timeout(self._timeout_s):
            raw = await self._redis.hgetall(self._key)
        now = time.time()
        fresh: dict[str, Block] = {}
        stale: list[str] = []
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            try:
                state, until, reason, strikes = orjson.loads(value)
                block = Block(state, float(until), str(reason), int(strikes))
            except (orjson.JSONDecodeError, ValueError, TypeError):
                stale.append(name)
                continue
            if block.until < now - self._keep_s:
                stale.append(name)
            else:
                fresh[name] = block
        self._entries = fresh
        if stale:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.hdel(self._key, *stale)

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.refresh()
        self._refresher = self._tasks.spawn(self._loop(), "health-store-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            # On failure the local view stays; the limiter logs Redis outages.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self.refresh()

    async def close(self) -> None:
        """Stop refreshing; let writes in flight finish (each is bounded by its timeout)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self._tasks.wait()
