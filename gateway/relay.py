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
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.admission import UsageStripper
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


_KEEPALIVE = b": keep-alive\n\n"


class _Watchdog:
    """Interrupts the relaying task when the upstream is silent too long (kill), when the
    deadline passes (kill), or when a keep-alive comment is due (the relay writes it and
    goes back to reading).

    Per chunk the relay only stores `waiting_since`; the timer re-arms itself lazily. Times
    are `time.perf_counter()` values (the relay's one clock read per chunk serves the figures
    too; under uvloop the loop clock only ticks in whole milliseconds); the timer itself is the
    loop's, armed with a delay.
    """

    __slots__ = (
        "_handle",
        "_loop",
        "_task",
        "at_boundary",
        "deadline",
        "fired",
        "idle_s",
        "keepalive_due",
        "keepalive_s",
        "last_write",
        "waiting_since",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[object],
        idle_s: float,
        deadline: float,
        keepalive_s: float,
        at_boundary: Callable[[], bool],
    ) -> None:
        self._loop = loop
        self._task = task
        self.idle_s = idle_s
        self.deadline = deadline
        self.keepalive_s = keepalive_s
        self.at_boundary = at_boundary
        now = time.perf_counter()
        self.waiting_since: float | None = None  # None while not waiting on the upstream
        self.last_write = now
        self.fired: StreamEnd | None = None
        self.keepalive_due = False
        self._handle = loop.call_later(self._next(now) - now, self._check)

    def _next(self, now: float) -> float:
        since = self.waiting_since if self.waiting_since is not None else now
        due = since + self.idle_s
        if self.keepalive_s:
            due = min(due, max(self.last_write, since) + self.keepalive_s)
        return min(due, self.deadline)

    def _check(self) -> None:
        now = time.perf_counter()
        if now >= self.deadline:
            self.fired = StreamEnd.TOTAL_TIMEOUT
            self._task.cancel()
            return
        since = self.waiting_since
        if since is not None:
            if now >= since + self.idle_s:
                self.fired = StreamEnd.CHUNK_TIMEOUT
                self._task.cancel()
                return
            if (
                self.keepalive_s
                and now >= max(self.last_write, since) + self.keepalive_s
                and self.at_boundary()
            ):
                self.keepalive_due = True
                self._task.cancel()
                return
        self._handle = self._loop.call_later(max(self._next(now) - now, 0.001), self._check)

    def resume(self) -> None:
        """After a keep-alive was written: clear the signal and re-arm."""
        self.keepalive_due = False
        now = time.perf_counter()
        self.last_write = now
        self._handle = self._loop.call_later(self._next(now) - now, self._check)

    def stop(self) -> None:
        self._handle.cancel()


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    decoder: SSEDecoder,
    observer: StreamObserver,
    *,
    chunk_s: float,
    deadline: float,
    keepalive_s: float,
    error_event: Callable[[StreamEnd], bytes],
    stripper: UsageStripper | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> RelayResult:
    """Forward the rest of an already-prepared SSE response, reading upstream from where the
    caller's peek stopped (what it read is already written, fed and observed).

    `on_first_token` is called once, the moment the first content event has passed (live
    telemetry). `error_event(end)` renders the final event that tells the client why the
    gateway ended a stream the upstream did not end properly (truncated, broken, timed out).
    `stripper`, when given, removes the usage the gateway asked for on the caller's behalf.
    Keep-alive comments go out after `keepalive_s` of upstream silence, only at event
    boundaries. `deadline` is a `time.perf_counter()` value.

    A body that ends cleanly is complete when the API's end marker was seen, or when a finish
    reason was (servers that omit `[DONE]` or `message_stop`); otherwise it was truncated.
    Never raises for upstream or client failures (they are the result); re-raises a
    CancelledError that is not its own (client gone). The caller closes `upstream`.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    observing = True

    def at_boundary() -> bool:
        return observing and decoder.at_boundary

    watchdog = _Watchdog(loop, task, chunk_s, deadline, keepalive_s, at_boundary)
    content = upstream.content
    write = response.write
    feed = decoder.feed
    on_event = observer.on_event
    facts = observer.facts
    out = 0
    end = StreamEnd.OK
    resumed = False  # back from a keep-alive: the upstream's silence goes on
    # One clock read per chunk serves as the write's end, the events' time and the start of
    # the next wait.
    clock = time.perf_counter
    now = clock()
    try:
        while True:
            try:
                if not resumed:
                    watchdog.waiting_since = now
                resumed = False
                chunk = await content.readany()
                watchdog.waiting_since = None
                if not chunk:
                    if stripper is not None:
                        rest = stripper.flush()
                        if rest:
                            await write(rest)
                    break
                try:
                    if stripper is None:
                        await write(chunk)
                        out += len(chunk)
                    else:
                        visible = stripper.feed(chunk)
                        if visible:
                            await write(visible)
                            out += len(visible)
                except ConnectionResetError:
                    return RelayResult(StreamEnd.CLIENT_CANCEL, out, aborted=False)
                now = clock()
                watchdog.last_write = now
                if observing:
                    try:
                        events = feed(chunk)
                    except SSEError:
                        # Observation is best effort: never let it break the relay.
                        observing = False
                    else:
                        if events:
                            for event in events:
                                on_event(event, now)
                            facts.last_event_at = now
                            if on_first_token is not None and facts.first_token_at is not None:
                                on_first_token()
                                on_first_token = None
            except asyncio.CancelledError:
                fired = watchdog.fired
                if (fired is None and not watchdog.keepalive_due) or task.uncancel() != 0:
                    raise
                if fired is None:
                    # Upstream silence: the upstream read was interrupted without losing data
                    # (aiohttp keeps what arrived buffered); tell idle proxies we are alive.
                    try:
                        await write(_KEEPALIVE)
                    except ConnectionResetError:
                        return RelayResult(StreamEnd.CLIENT_CANCEL, out, aborted=False)
                    watchdog.resume()
                    resumed = True
                    continue
                end = fired
                break
            except (aiohttp.ClientError, OSError):
                end = StreamEnd.PAYLOAD_ERROR
                break
    finally:
        watchdog.stop()
    observer.on_end()
    if end is StreamEnd.OK:
        if facts.error_type is not None:
            return RelayResult(StreamEnd.UPSTREAM_ERROR, out, aborted=False)
        if facts.done or not observing or facts.finish_reason is not None:
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
