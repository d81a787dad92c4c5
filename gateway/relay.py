"""Upstream SSE body -> client, bytes unchanged, the moment they arrive.

The relay reads whatever the upstream socket has (`readany`), writes it to the client at once,
and feeds the same bytes object to the SSE decoder and the stream observer: no copy, no
re-encoding, no line splitting before forwarding. Deadlines (between chunks, overall) are kept
by a watchdog that costs one clock read per chunk instead of a timer per read.

Only this task writes to the client response, so anything the gateway injects (the final error
event) goes in whole, and only at an event boundary; otherwise the connection is aborted so the
client sees a broken stream rather than a spliced event.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.providers.base import StreamObserver
from gateway.sse import SSEDecoder, SSEError


class StreamEnd(enum.Enum):
    """How a relayed stream ended (a bounded label for logs and metrics)."""

    OK = "ok"  # the API's end marker was seen and the body ended
    UPSTREAM_ERROR = "upstream_error"  # the upstream sent an in-band error event
    TRUNCATED = "truncated"  # the body ended without the end marker
    PAYLOAD_ERROR = "payload_error"  # the upstream connection broke mid-body
    CHUNK_TIMEOUT = "chunk_timeout"  # upstream silence between chunks exceeded chunk_s
    TOTAL_TIMEOUT = "total_timeout"  # the request exceeded total_s
    CLIENT_CANCEL = "client_cancel"  # the client went away


@dataclass(slots=True)
class RelayResult:
    end: StreamEnd
    bytes_out: int
    aborted: bool  # the client connection was cut instead of ending cleanly


class _Watchdog:
    """Cancels the relaying task when the upstream is silent too long or the deadline passes.

    Per chunk the relay only stores `waiting_since`; the timer re-arms itself lazily.
    """

    __slots__ = ("_handle", "_loop", "_task", "deadline", "fired", "idle_s", "waiting_since")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object],
        idle_s: float,
        deadline: float,
    ) -> None:
        self._loop = loop
        self._task = task
        self.idle_s = idle_s
        self.deadline = deadline
        self.waiting_since: float | None = None  # None while not waiting on the upstream
        self.fired: StreamEnd | None = None
        self._handle = loop.call_at(min(loop.time() + idle_s, deadline), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self.deadline:
            self.fired = StreamEnd.TOTAL_TIMEOUT
            self._task.cancel()
            return
        since = self.waiting_since
        due = (since if since is not None else now) + self.idle_s
        if since is not None and now >= due:
            self.fired = StreamEnd.CHUNK_TIMEOUT
            self._task.cancel()
            return
        self._handle = self._loop.call_at(min(due, self.deadline), self._check)

    def stop(self) -> None:
        self._handle.cancel()


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    first_chunk: bytes,
    decoder: SSEDecoder,
    observer: StreamObserver,
    *,
    chunk_s: float,
    deadline: float,
    error_event: Callable[[StreamEnd], bytes],
) -> RelayResult:
    """Forward the rest of an already-prepared SSE response.

    `first_chunk` has been read but not yet written (nor observed). `error_event(end)` renders
    the final event that tells the client why the gateway ended a stream the upstream did not
    end properly (truncated, broken, timed out). Never raises for upstream or client failures
    (they are the result); re-raises a CancelledError that is not its own (client gone).
    The caller closes `upstream` in every case.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    watchdog = _Watchdog(loop, task, chunk_s, deadline)
    content = upstream.content
    write = response.write
    feed = decoder.feed
    on_event = observer.on_event
    observing = True
    out = 0
    chunk = first_chunk
    end = StreamEnd.OK
    try:
        try:
            while chunk:
                try:
                    await write(chunk)
                except ConnectionResetError:
                    return RelayResult(StreamEnd.CLIENT_CANCEL, out, aborted=False)
                out += len(chunk)
                if observing:
                    try:
                        events = feed(chunk)
                    except SSEError:
                        # Observation is best effort: never let it break the relay.
                        observing = False
                    else:
                        if events:
                            now = loop.time()
                            for event in events:
                                on_event(event, now)
                watchdog.waiting_since = loop.time()
                chunk = await content.readany()
                watchdog.waiting_since = None
        except asyncio.CancelledError:
            if watchdog.fired is not None and task.uncancel() == 0:
                end = watchdog.fired
            else:
                raise
        except aiohttp.ClientPayloadError:
            end = StreamEnd.PAYLOAD_ERROR
        except (aiohttp.ClientError, OSError):
            end = StreamEnd.PAYLOAD_ERROR
    finally:
        watchdog.stop()
    observer.on_end()
    facts = observer.facts
    if end is StreamEnd.OK:
        if facts.error_type is not None:
            return RelayResult(StreamEnd.UPSTREAM_ERROR, out, aborted=False)
        if facts.done:
            return RelayResult(StreamEnd.OK, out, aborted=False)
        end = StreamEnd.TRUNCATED
    elif facts.error_type is not None and end is StreamEnd.PAYLOAD_ERROR:
        end = StreamEnd.UPSTREAM_ERROR
    if end is StreamEnd.UPSTREAM_ERROR:
        # The upstream already told the client, in the client's own API format.
        return RelayResult(end, out, aborted=False)
    if observing and decoder.at_boundary:
        try:
            await response.write(error_event(end))
        except ConnectionResetError:
            return RelayResult(end, out, aborted=True)
        return RelayResult(end, out, aborted=False)
    # Mid-event: an injected event would splice into the upstream's half-written one. Cut the
    # connection instead, so the client sees an incomplete body (its SDK raises).
    transport = request.transport
    if transport is not None:
        transport.abort()
    return RelayResult(end, out, aborted=True)
