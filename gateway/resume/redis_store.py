"""Resumable streams in Redis: any instance behind the load balancer can serve a reattach.

Per stream, under one hash tag (one Cluster slot): a Redis Stream `<prefix>:rs:{id}:d` whose
entries are the client-visible chunks in order (field `d`), ended by an entry with field `e`
(`1`: complete, `o`: outgrew `max_stream_bytes`), and a hash `<prefix>:rs:{id}:m` with the
caller, the wire API, the length so far and the state (`live` | `ended` | `oversize`). Both
expire: while live after `live_ttl_s` (the route's total timeout and the TTL: a writer that
died does not leave them forever), once ended `ttl_s` after the end.

The writer never waits for Redis: `append` queues the chunk and the queue goes out in one
pipeline per event-loop turn, one flush at a time per stream (so entries keep their order).
A failed flush makes the stream unresumable (its meta says oversize when Redis comes back: a
reattach gets 410, never a stream with a hole). Readers follow the live tail with XREAD BLOCK.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.logs import get_logger
from gateway.resume.store import Meta, StreamCut
from gateway.tasks import Tasks

_log = get_logger("gateway.resume")
_FAILURES = (RedisError, OSError, TimeoutError)
_BLOCK_MS = 1000
_READ_COUNT = 256
_CALL_TIMEOUT_S = 5.0


class _RedisRecorder:
    __slots__ = (
        "_broken",
        "_created",
        "_cut",
        "_data",
        "_ended",
        "_flushing",
        "_identity",
        "_length",
        "_max",
        "_meta",
        "_oversize_due",
        "_pending",
        "_store",
        "_ttl_s",
    )

    def __init__(
        self,
        store: RedisStore,
        keys: tuple[str, str],
        identity: dict[str, str],
        ttl_s: float,
        max_bytes: int,
    ) -> None:
        data_key, meta_key = keys
        self._store = store
        self._identity = identity  # caller, family: written with the first flush
        self._created = False
        self._cut = False
        self._oversize_due = False
        self._ttl_s = ttl_s
        self._max = max_bytes
        self._data = data_key
        self._meta = meta_key
        self._pending: list[bytes] = []
        self._length = 0
        self._flushing = False
        self._ended = False
        self._broken = False  # oversize or a failed write: no more bytes kept

    def append(self, data: bytes) -> None:
        if self._broken or not data:
            return
        self._length += len(data)
        if self._length > self._max:
            self._broken = True
            self._pending.clear()
            # Through the flush loop: after a flush in flight, never overwritten by it.
            self._oversize_due = True
            self._kick()
            return
        self._pending.append(data)
        self._kick()

    def start(self) -> None:
        """Write the stream's meta now (a reattach may come before the first chunk)."""
        self._kick()

    def end(self, *, cut: bool = False) -> None:
        if not self._ended:
            self._ended = True
            self._cut = cut
            if not self._broken:
                self._kick()

    def _kick(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._store.spawn(self._flush(), "resume-flush")

    async def _flush(self) -> None:
        store = self._store
        try:
            while True:
                if self._oversize_due:
                    self._oversize_due = False
                    await self._mark_oversize()
                    return
                if self._broken or not (self._pending or self._ended or not self._created):
                    return
                await asyncio.sleep(0)  # gather this loop turn's chunks into one pipeline
                batch, self._pending = self._pending, []
                ending = self._ended and not self._pending
                pipe = store.redis.pipeline(transaction=False)
                if not self._created:
                    identity: dict[Any, Any] = {**self._identity, "state": "live"}
                    pipe.hset(self._meta, mapping=identity)
                length = 0
                for chunk in batch:
                    pipe.xadd(self._data, {"d": chunk})
                    length += len(chunk)
                if length:
                    pipe.hincrby(self._meta, "len", length)
                if ending:
                    pipe.xadd(self._data, {"e": "c" if self._cut else "1"})
                    pipe.hset(self._meta, "state", "ended")
                    ttl_ms = int(self._ttl_s * 1000)
                else:
                    ttl_ms = int(store.live_ttl_s * 1000)
                pipe.pexpire(self._data, ttl_ms)
                pipe.pexpire(self._meta, ttl_ms)
                async with asyncio.timeout(_CALL_TIMEOUT_S):
                    await pipe.execute()
                self._created = True
                if ending:
                    return
        except _FAILURES as exc:
            self._broken = True
            _log.warning("resume store write failed", error=type(exc).__name__)
            store.spawn(self._mark_oversize(), "resume-oversize")
        finally:
            self._flushing = False

    async def _mark_oversize(self) -> None:
        store = self._store
        try:
            pipe = store.redis.pipeline(transaction=False)
            pipe.delete(self._data)
            pipe.xadd(self._data, {"e": "o"})
            identity: dict[Any, Any] = {**self._identity, "state": "oversize"}
            pipe.hset(self._meta, mapping=identity)
            ttl_ms = int(max(self._ttl_s, store.live_ttl_s) * 1000)
            pipe.pexpire(self._data, ttl_ms)
            pipe.pexpire(self._meta, ttl_ms)
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                await pipe.execute()
        except _FAILURES as exc:
            _log.warning("resume store write failed", error=type(exc).__name__)


class RedisStore:
    """Resumable streams shared by every instance through one Redis (module docstring)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        live_ttl_s: float = 3600.0,
    ) -> None:
        # Its own client: a reader's XREAD BLOCK holds a connection for up to a second, far
        # past the limiter's socket timeout.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=_CALL_TIMEOUT_S, socket_connect_timeout=2
        )
        self.prefix = prefix
        self.live_ttl_s = live_ttl_s
        self._tasks = Tasks("resume-store")

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    def _keys(self, stream_id: str) -> tuple[str, str]:
        tag = f"{self.prefix}:rs:{{{stream_id}}}"
        return f"{tag}:d", f"{tag}:m"

    def begin(
        self, stream_id: str, caller: str, family: str, *, ttl_s: float, max_bytes: int
    ) -> _RedisRecorder:
        identity = {"caller": caller, "family": family}
        recorder = _RedisRecorder(self, self._keys(stream_id), identity, ttl_s, max_bytes)
        recorder.start()
        return recorder

    async def meta(self, stream_id: str) -> Meta | None:
        _, meta_key = self._keys(stream_id)
        async with asyncio.timeout(_CALL_TIMEOUT_S):
            fields: dict[bytes, bytes] = await self.redis.hgetall(meta_key)  # type: ignore[assignment]
        if not fields or b"caller" not in fields:
            return None
        state = fields.get(b"state", b"live")
        return Meta(
            caller=fields[b"caller"].decode(),
            family=fields.get(b"family", b"openai").decode(),
            length=int(fields.get(b"len", b"0")),
            ended=state == b"ended",
            oversize=state == b"oversize",
        )

    async def read(self, stream_id: str, offset: int) -> AsyncIterator[bytes]:
        data_key, meta_key = self._keys(stream_id)
        position = 0  # bytes of the stream before the next entry
        last = "0-0"
        while True:
            async with asyncio.timeout(_CALL_TIMEOUT_S + _BLOCK_MS / 1000):
                answer: Any = await self.redis.xread(
                    {data_key: last}, count=_READ_COUNT, block=_BLOCK_MS
                )
            if not answer:
                # Nothing new for a second: still there? (the writer's instance may be gone)
                async with asyncio.timeout(_CALL_TIMEOUT_S):
                    if not await self.redis.exists(meta_key):
                        return
                continue
            for entry_id, fields in answer[0][1]:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                marker = fields.get(b"e")
                if marker is not None:
                    if marker != b"1":  # cut (c) or grown past its bound (o)
                        raise StreamCut
                    return
                chunk: bytes = fields.get(b"d", b"")
                end = position + len(chunk)
                if end > offset:
                    yield chunk if position >= offset else chunk[offset - position :]
                position = end

    async def close(self) -> None:
        # Pending flushes (a stream's last bytes and its end marker) get a moment to land:
        # a reattach on another instance must not wait for an end that never comes.
        try:
            async with asyncio.timeout(2.0):
                await self._tasks.wait()
        except TimeoutError:
            pass
        await self._tasks.cancel()
        await self.redis.aclose()
