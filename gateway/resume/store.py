"""Where a resumable stream's bytes are kept: the exact client-visible bytes, in order, so that
a reattach from byte N gets what the first connection would have received after its first N.

A `Recorder` is one stream's writer: `append` is called on the hot path with each chunk the
relay writes (no copy, no await: the memory store keeps the bytes objects, the Redis store
queues them for one pipelined flush per event-loop turn), `end` once the stream has ended.
`read(id, offset)` yields the bytes from `offset` on, following the live tail until the end.

`MemoryStore` keeps everything in this process, bounded by `memory_bytes`: past it the oldest
ended streams are evicted first (and, with nothing ended left to evict, the stream being
written stops being resumable). Ended streams are forgotten `ttl_s` after their end; a stream
that outgrows `max_stream_bytes` keeps being relayed but drops its bytes and answers 410.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Meta:
    """What a reattach needs to know before it reads."""

    caller: str
    family: str  # the wire API of the stream ("openai" | "anthropic")
    length: int  # client-visible bytes so far (all of them once ended)
    ended: bool
    oversize: bool


class StreamCut(Exception):
    """The stream being read was cut (the first connection saw a broken stream, or its bytes
    were dropped mid-read): a reattach must end as broken too, never cleanly."""


class Recorder(Protocol):
    def append(self, data: bytes) -> None:
        """The next client-visible bytes (the hot path: never awaits)."""

    def end(self, *, cut: bool = False) -> None:
        """The stream has ended: its bytes are complete (reattachable for the TTL). `cut`:
        it ended mid-event (the connection was aborted), as a reattach must too."""


class ReplayStore(Protocol):
    name: str

    def begin(
        self, stream_id: str, caller: str, family: str, *, ttl_s: float, max_bytes: int
    ) -> Recorder:
        """A recorder for a new stream: kept `ttl_s` after its end, unless it grows past
        `max_bytes` (then it answers 410)."""

    async def meta(self, stream_id: str) -> Meta | None: ...

    def read(self, stream_id: str, offset: int) -> AsyncIterator[bytes]:
        """The bytes from `offset` on, live until the stream ends (nothing once it has ended
        and everything was read). Raises StreamCut after the last bytes of a stream that was
        cut, or one evicted or grown past its bound while being read."""

    async def close(self) -> None: ...


class _Entry:
    __slots__ = (
        "caller",
        "chunks",
        "cut",
        "ended",
        "expires",
        "family",
        "gen",
        "length",
        "oversize",
        "ttl_s",
        "waiters",
    )

    def __init__(self, caller: str, family: str, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.caller = caller
        self.family = family
        self.chunks: list[bytes] = []
        self.gen = 0  # changes when `chunks` is compacted (readers' cursors start over)
        self.cut = False
        self.length = 0
        self.ended = False
        self.oversize = False
        self.expires = 0.0  # monotonic, once ended
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class _MemoryRecorder:
    __slots__ = ("_entry", "_max", "_store")

    def __init__(self, store: MemoryStore, entry: _Entry, max_bytes: int) -> None:
        self._store = store
        self._entry = entry
        self._max = max_bytes

    def append(self, data: bytes) -> None:
        entry = self._entry
        if entry.oversize or not data:
            return
        entry.length += len(data)
        if entry.length > self._max:
            self._store.drop(entry)
        else:
            entry.chunks.append(data)
            self._store.grow(entry, len(data))
        if entry.waiters:
            entry.wake()

    def end(self, *, cut: bool = False) -> None:
        self._entry.cut = cut
        self._store.ended(self._entry)


class MemoryStore:
    """Resumable streams in this process (see the module docstring)."""

    name = "memory"

    def __init__(self, *, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        self._entries: dict[str, _Entry] = {}
        self._ended: OrderedDict[str, _Entry] = OrderedDict()  # by end time, oldest first
        self._ids: dict[int, str] = {}  # id(entry) -> stream id
        self.kept_bytes = 0
        self.evicted = 0
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def begin(
        self, stream_id: str, caller: str, family: str, *, ttl_s: float, max_bytes: int
    ) -> _MemoryRecorder:
        self._expire()
        entry = _Entry(caller, family, ttl_s)
        self._entries[stream_id] = entry
        self._ids[id(entry)] = stream_id
        return _MemoryRecorder(self, entry, max_bytes)

    def grow(self, entry: _Entry, n: int) -> None:
        self.kept_bytes += n
        while self.kept_bytes > self.memory_bytes:
            if self._ended:
                self._evict(next(iter(self._ended)))
                self.evicted += 1
            else:  # only live streams left: the one growing stops being resumable
                self.drop(entry)
                return

    def drop(self, entry: _Entry) -> None:
        """`entry` is too large to keep: its bytes go, it answers 410 from now on."""
        if not entry.oversize:
            entry.oversize = True
            self.kept_bytes -= sum(len(c) for c in entry.chunks)
            entry.chunks = []
            entry.wake()

    def ended(self, entry: _Entry) -> None:
        stream_id = self._ids.get(id(entry))
        if stream_id is None or entry.ended:
            return
        entry.ended = True
        entry.expires = time.monotonic() + entry.ttl_s
        if len(entry.chunks) > 1:  # one bytes object per stream from now on
            entry.chunks = [b"".join(entry.chunks)]
            entry.gen += 1
        self._ended[stream_id] = entry  # end order: the eviction order
        # Expiry order (TTLs may differ between streams after a reload).
        heapq.heappush(self._expiry, (entry.expires, next(self._seq), stream_id))
        entry.wake()
        self._expire()

    def _evict(self, stream_id: str) -> None:
        entry = self._entries.pop(stream_id, None)
        self._ended.pop(stream_id, None)
        if entry is None:
            return
        self._ids.pop(id(entry), None)
        self.kept_bytes -= sum(len(c) for c in entry.chunks)
        entry.chunks = []
        entry.oversize = True  # a reader still following it stops
        entry.wake()

    def _expire(self) -> None:
        now = time.monotonic()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, _, stream_id = heapq.heappop(expiry)
            if stream_id in self._ended:  # not evicted for room already
                self._evict(stream_id)

    async def meta(self, stream_id: str) -> Meta | None:
        self._expire()
        entry = self._entries.get(stream_id)
        if entry is None:
            return None
        return Meta(entry.caller, entry.family, entry.length, entry.ended, entry.oversize)

    async def read(self, stream_id: str, offset: int) -> AsyncIterator[bytes]:
        entry = self._entries.get(stream_id)
        if entry is None:
            return
        position = offset
        loop = asyncio.get_running_loop()
        # A cursor (chunk index, its start) so that following a live stream costs the new
        # chunks only, not a scan from the start on every append.
        index, start, gen = 0, 0, entry.gen
        while not entry.oversize:
            chunks = entry.chunks
            if gen != entry.gen:
                index, start, gen = 0, 0, entry.gen
            while index < len(chunks) and start + len(chunks[index]) <= position:
                start += len(chunks[index])
                index += 1
            if index < len(chunks):
                head = chunks[index][position - start :]
                rest = chunks[index + 1 :]
                data = b"".join([head, *rest]) if rest else head
                start = position = position + len(data)
                index = len(chunks)
                yield data
                continue
            if entry.ended:
                if entry.cut:
                    raise StreamCut
                return
            waiter: asyncio.Future[None] = loop.create_future()
            entry.waiters.append(waiter)
            await waiter
        raise StreamCut  # evicted or grown past its bound while being read

    @property
    def streams(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        for entry in self._entries.values():
            entry.wake()
