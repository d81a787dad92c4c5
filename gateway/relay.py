"""The stream owner: the only code that writes to a committed client stream.

`StreamOwner.deliver` takes an `OpenStream` (headers and the held first event) to its end:
commits the response, writes the held bytes, relays the rest, and ends the stream — cleanly
(`write_eof`), with one final error event in the stream's own format, or by aborting the
connection. Its states are explicit: OPEN -> COMMITTED -> RELAYING -> DONE | ERRORED |
ABORTED | CLIENT_GONE.

The relay reads whatever the upstream socket has (`readany`), writes it to the client at once,
and feeds the same bytes object to the SSE decoder and the stream observer: no copy, no
re-encoding, no line splitting before forwarding. Deadlines (between chunks, overall) are kept
by a watchdog that costs one clock read per chunk instead of a timer per read. Anything the
gateway injects (a keep-alive comment, the final error event) goes in whole, and only at an
event boundary; mid-event the connection is aborted, so the client sees a broken stream
rather than a spliced event.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from gateway.budget import BudgetMeter
from gateway.edge import Request
from gateway.errors import Kind
from gateway.logs import get_logger
from gateway.ops import LiveStreams
from gateway.providers import WIRE_APIS
from gateway.providers.base import Stripper
from gateway.render import terminal_event
from gateway.report import Outcome, Report
from gateway.resume.ids import IdInjector
from gateway.resume.store import Recorder
from gateway.sse import SSEDecoder, SSEError, SSEEvent, event_ends
from gateway.telemetry import Telemetry
from gateway.upstream import OpenStream

_log = get_logger("gateway.access")
_KEEPALIVE = b": keep-alive\n\n"
# Pending client bytes past which the relay waits for the client (aiohttp's writer uses 64 KiB).
_HIGH_WATER = 64 * 1024
# Longer than any marker an observer looks for (`"finish_reason":null`, response.incomplete).
_OVERLAP = 32


class State(enum.Enum):
    OPEN = "open"  # nothing sent yet
    COMMITTED = "committed"  # headers sent: from here on only in-band signals are possible
    RELAYING = "relaying"
    DONE = "done"  # ended cleanly (write_eof)
    ERRORED = "errored"  # ended with the gateway's final error event
    ABORTED = "aborted"  # the connection was cut mid-event
    CLIENT_GONE = "client_gone"


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
        task: asyncio.Task[object],
        idle_s: float,
        deadline: float,
        keepalive_s: float,
        at_boundary: Callable[[], bool],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = task
        self.idle_s = idle_s
        self.deadline = deadline
        self.keepalive_s = keepalive_s
        self.at_boundary = at_boundary
        now = time.perf_counter()
        self.waiting_since: float | None = None  # None while not waiting on the upstream
        self.last_write = now
        self.fired: Outcome | None = None
        self.keepalive_due = False
        self._handle = self._loop.call_later(self._next(now) - now, self._check)

    def _next(self, now: float) -> float:
        since = self.waiting_since if self.waiting_since is not None else now
        due = since + self.idle_s
        if self.keepalive_s:
            due = min(due, max(self.last_write, since) + self.keepalive_s)
        return min(due, self.deadline)

    def _check(self) -> None:
        now = time.perf_counter()
        if now >= self.deadline:
            self.fired = Outcome.TOTAL_TIMEOUT
            self._task.cancel()
            return
        since = self.waiting_since
        if since is not None:
            if now >= since + self.idle_s:
                self.fired = Outcome.CHUNK_TIMEOUT
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

    def fire(self, outcome: Outcome) -> None:
        """End the relay now with `outcome` (an operator's cancel at an event boundary)."""
        if self.fired is None:
            self.fired = outcome
            self._handle.cancel()
            self._task.cancel()

    def claim(self) -> bool:
        """Whether the cancellation being handled is this watchdog's own (and only its own:
        a client that went away at the same time wins)."""
        if self.fired is None and not self.keepalive_due:
            return False
        return self._task.uncancel() == 0

    def resume(self) -> None:
        """After a keep-alive was written: clear the signal and re-arm."""
        self.keepalive_due = False
        now = time.perf_counter()
        self.last_write = now
        self._handle = self._loop.call_later(self._next(now) - now, self._check)

    def stop(self) -> None:
        self._handle.cancel()


class _Direct:
    """Writes relayed chunks straight to the client's transport, HTTP/1.1 chunk-framed as
    aiohttp's writer would, without its per-write coroutines; `send` says when the client's
    buffer is past the high-water mark, and `drain` then waits for it (backpressure: the
    upstream is not read meanwhile). Used once aiohttp has sent the headers."""

    __slots__ = ("_transport", "drain")

    def __init__(self, transport: asyncio.Transport, drain: Callable[[], Awaitable[None]]) -> None:
        self._transport = transport
        self.drain = drain

    @classmethod
    def of(cls, request: web.Request, response: web.StreamResponse) -> _Direct | None:
        transport = request.transport
        # aiohttp frames an HTTP/1.1 response of unknown length as chunked when it prepares it
        # (it sets the header, not `response.chunked`); anything else goes through aiohttp.
        if transport is None or response.headers.get("Transfer-Encoding") != "chunked":
            return None
        return cls(transport, request.writer.drain)

    def send(self, data: bytes) -> bool:
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return transport.get_write_buffer_size() > _HIGH_WATER


def _sequence_after(event: SSEEvent) -> int:
    """The `sequence_number` an event after `event` carries (Responses; 0 without one)."""
    try:
        number = orjson.loads(event.data).get("sequence_number")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return number + 1 if isinstance(number, int) and not isinstance(number, bool) else 0


def _observed(chunk: bytes, now: float) -> None:
    """A metered stream's reads are observed before they are written (`StreamOwner._gate`)."""


class StreamOwner:
    """Takes one committed stream from its held first event to its end. While it relays it is
    registered in `streams` under `stream_id` (the `x-gateway-stream-id` header the caller
    got), where an operator can end it (`stop`)."""

    def __init__(
        self,
        request: web.Request,
        stream: OpenStream,
        req: Request,
        report: Report,
        *,
        stream_id: str,
        streams: LiveStreams | None = None,
        recorder: Recorder | None = None,
        inject_ids: bool = False,
        meter: BudgetMeter | None = None,
    ) -> None:
        self.request = request
        self.stream = stream
        self.req = req
        self.report = report
        self.stream_id = stream_id
        self.streams = streams
        self.state = State.OPEN
        # Set by `stop`: the stream ends with this outcome at the next event boundary.
        self._stop: Outcome | None = None
        self._watchdog: _Watchdog | None = None
        self.observing = True  # the decoder still follows the stream (best effort)
        self.stripper: Stripper | None = (
            WIRE_APIS[req.endpoint.family].usage_stripper() if req.parsed.inject_usage else None
        )
        self.out = 0  # bytes written to the client (and, once draining, that would have been)
        # Resumable: every client-visible byte also goes to `recorder`, and a client that goes
        # away no longer ends the stream: the relay drains the upstream to its end.
        self.recorder = recorder
        self.draining = False
        # resume.inject_ids: `id: <offset>` in each event (EventSource clients reconnect).
        self.injector = IdInjector() if inject_ids else None
        self._sent = 0  # bytes the client got before it went away (while draining)
        self._cancel_absorbed = False
        self._cut = False  # the stream ended mid-event (no terminal event could be added)
        self._seen_first = False  # the first token has passed (quiet chunks are only counted)
        self._tail = b""  # the last bytes of the previous read (markers split over two reads)
        self._hot = False  # an event that matters may be completing: show the next events
        # Under a spend budget every read is observed before it is written, event by event
        # (`_gate`), and the stream ends after the event that spends the budget.
        self.meter = meter
        self._clean_cut = False  # cut at an event boundary the decoder did not see as one
        self._abort_now = False  # a blind metered stream is spent: end it without a boundary
        # The number the terminal event carries when the held read was cut (the observer saw
        # the events after the cut).
        self._sequence: int | None = None

    async def deliver(
        self, response: web.StreamResponse, tel: Telemetry, keepalive_s: float
    ) -> Outcome:
        """Commit `response` (headers set by the caller), relay the stream to its end, and end
        it. Returns how it ended; never raises for upstream or client failures. Closes the
        upstream response."""
        report = self.report
        report.streaming(self.stream.status, self.stream.facts)
        active = tel.metrics.child(tel.metrics.active_streams, report.model_label)
        streams = self.streams
        meter = self.meter
        if meter is not None:
            meter.start(self._budget_spent)
        try:
            await response.prepare(self.request)
            self.state = State.COMMITTED
            active.inc()
            if streams is not None:
                streams.add(self, report)
            try:
                end = await self._relay(response, keepalive_s)
            finally:
                active.dec()
                if streams is not None:
                    streams.remove(self.stream_id)
        finally:
            self.stream.response.close()
            # Also when the client's leaving cancels the relay.
            report.bytes_out = self._sent if self.draining else self.out
            if self.recorder is not None:
                # Aborted mid-event (live or while draining): a reattach must break there too.
                self.recorder.end(cut=self._cut or self.state is State.ABORTED)
                report.drained = self.draining
        report.streamed(end)
        cut = end is Outcome.BUDGET_EXCEEDED or report.drain_end == Outcome.BUDGET_EXCEEDED.value
        if cut and meter is not None:
            tel.metrics.child(tel.metrics.budget_exceeded, meter.spec.tier, "stream").inc()
        return end

    def _budget_spent(self) -> None:
        """The shared figures say the budget is spent: end at the next event boundary (not a
        stream whose content is over: its finish reason or end marker has passed)."""
        facts = self.stream.facts
        if facts.finish_reason is None and not facts.done:
            self.stop(Outcome.BUDGET_EXCEEDED)

    async def _relay(self, response: web.StreamResponse, keepalive_s: float) -> Outcome:
        if not await self._write_held(response):
            return self._gone()
        self.state = State.RELAYING
        stopped = self._stop
        if stopped is not None and self._at_boundary():
            return await self._end(response, stopped)
        end = await self._pump(response, keepalive_s)
        if end is Outcome.CLIENT_CANCEL:
            return self._gone()
        if end is self._stop:
            return await self._end(response, end)
        self.stream.observer.on_end()
        end = self._classify(end)
        if end in (Outcome.CHUNK_TIMEOUT, Outcome.TOTAL_TIMEOUT):
            self._killed(end)
        return await self._end(response, end)

    async def _write_held(self, response: web.StreamResponse) -> bool:
        """The held first event (already scrubbed); False when the client is gone."""
        stream, report = self.stream, self.report
        held = stream.held if self.meter is None else self._gate_held(stream.held)
        first = held if self.stripper is None else self.stripper.feed(held)
        if self.injector is not None:
            first = self.injector.feed(first)
        if self.recorder is not None:
            self.recorder.append(first)
        try:
            if first:
                await response.write(first)
        except ConnectionResetError:
            if not self._start_draining(None):
                return False
        self.out = len(first)
        report.timings.first_byte_sent = time.perf_counter()
        if stream.facts.first_token_at is not None:
            self._first_token()
            self._start_quiet(stream.held)
        return True

    def _gate_held(self, held: bytes) -> bytes:
        """The held first event(s), metered with a decoder of their own (the stream's and
        the observer have seen them already): cut after the content event that spends the
        budget."""
        cut = self._spent_at(held, SSEDecoder(), time.perf_counter(), live=False)
        if cut is None:
            return held
        end, event = cut
        if self._stop is None:
            self._stop = Outcome.BUDGET_EXCEEDED
        if end < len(held):
            self._clean_cut = True  # the stream's decoder saw what follows
            self._sequence = _sequence_after(event)
        return held[:end]

    def _gate(self, chunk: bytes) -> bytes:
        """A metered stream's read, observed before it is written: each content event is
        counted, and the read is cut right after the event that spends the budget (what
        follows is never sent)."""
        now = time.perf_counter()
        if self.observing:
            cut = self._spent_at(chunk, self.stream.decoder, now, live=True)
            if cut is not None:
                if self._stop is None:
                    self._stop = Outcome.BUDGET_EXCEEDED
                # At a boundary the decoder dispatched on (an injector may still hold the
                # CR of a split CRLF): the terminal event goes right here.
                self._clean_cut = True
                return chunk[: cut[0]]
            if self.observing:
                return chunk
        return self._blind(chunk, now)

    def _blind(self, chunk: bytes, now: float) -> bytes:
        """A metered stream that can no longer be decoded (an event past the decoder's
        bound): each read counts as if all its bytes were text, and a spent budget ends the
        stream at once, by cutting the connection (no event boundary is known)."""
        meter = self.meter
        assert meter is not None
        if meter.count(len(chunk), now) and self._stop is None:
            self._stop = Outcome.BUDGET_EXCEEDED
            self._abort_now = True
        return chunk

    def _spent_at(
        self, data: bytes, decoder: SSEDecoder, now: float, live: bool
    ) -> tuple[int, SSEEvent] | None:
        """Feed `data` to `decoder`, counting its content events (`live`: the stream's own
        decoder, whose events the observer sees too); where to cut it (just after the event
        that spent the budget) and that event, or None. A read that cannot spend the budget
        is fed whole; one that may is fed piece by piece, at the places an event can end."""
        meter = self.meter
        assert meter is not None
        if meter.roomy(len(data) + decoder.pending_bytes):
            self._count(data, decoder, now, live)
            return None
        start = 0
        for end in event_ends(data):
            piece = data[start:end] if start or end < len(data) else data
            spent = self._count(piece, decoder, now, live)
            if spent is not None:
                return end, spent
            if live and not self.observing:
                return None
            start = end
        return None

    def _count(self, piece: bytes, decoder: SSEDecoder, now: float, live: bool) -> SSEEvent | None:
        """Decode `piece` and count its content events (shown to the observer when `live`);
        the event that spent the budget, if one did. A live decoder that fails stops
        observing the stream (see `_blind`)."""
        try:
            events = decoder.feed(piece)
        except SSEError:
            if live:
                self.observing = False
            return None
        if not events:
            return None
        stream, meter = self.stream, self.meter
        assert meter is not None
        observer = stream.observer
        size = observer.content_size
        spent = None
        for event in events:
            if live:
                observer.on_event(event, now)
            chars = size(event)
            if chars and meter.count(chars, now) and spent is None:
                spent = event
        if live:
            facts = stream.facts
            facts.last_event_at = now
            if not self._seen_first and facts.first_token_at is not None:
                self._seen_first = True
                self._first_token()
        return spent

    async def _pump(self, response: web.StreamResponse, keepalive_s: float) -> Outcome:
        """Relay upstream reads to the client until the upstream body ends (OK: classified
        by the caller), a watchdog fires, the upstream breaks, or the client goes away."""
        task = asyncio.current_task()
        assert task is not None
        timeouts = self.req.route.timeouts
        watchdog = _Watchdog(
            task,
            timeouts.chunk_s,
            self.report.started + timeouts.total_s,
            keepalive_s,
            self._at_boundary,
        )
        self._watchdog = watchdog
        try:
            return await self._loop(response, watchdog)
        finally:
            self._watchdog = None
            watchdog.stop()

    async def _loop(self, response: web.StreamResponse, watchdog: _Watchdog) -> Outcome:
        # The hot path: locals only, one clock read per chunk (the write's end, the events'
        # time and the start of the next wait).
        content, write = self.stream.response.content, response.write
        stripper, observe = self.stripper, self._observe
        gate = None
        if self.meter is not None:
            gate, observe = self._gate, _observed  # observed by the gate, before the write
        direct = _Direct.of(self.request, response) if self.out else None
        record = self.recorder.append if self.recorder is not None else None
        injector = self.injector
        draining = self.draining
        clock = time.perf_counter
        now = clock()
        resumed = False  # back from a keep-alive: the upstream's silence goes on
        unobserved = b""
        while True:
            try:
                if not resumed:
                    watchdog.waiting_since = now
                resumed = False
                chunk = await content.readany()
                watchdog.waiting_since = None
                if gate is not None and chunk:
                    chunk = gate(chunk)
                if stripper is None:
                    visible = chunk
                else:
                    visible = stripper.feed(chunk) if chunk else stripper.flush()
                if injector is not None:
                    visible = injector.feed(visible) if chunk else visible + injector.flush()
                if record is not None:
                    record(visible)
                unobserved = chunk  # until observed: a cancel during the write must not skip it
                try:
                    if not visible or draining:
                        pass
                    elif direct is None:
                        await write(visible)
                    elif direct.send(visible):
                        await direct.drain()  # the client is slow: so is the upstream read
                except ConnectionResetError:
                    if not self._start_draining(None):
                        return Outcome.CLIENT_CANCEL
                    draining = True
                if not chunk:
                    return Outcome.OK
                self.out += len(visible)  # read live by /admin/streams
                now = clock()
                watchdog.last_write = now
                if self.observing:
                    observe(chunk, now)
                unobserved = b""
                if self._stop is not None and (self._abort_now or self._at_boundary()):
                    return self._stop
            except asyncio.CancelledError:
                if not watchdog.claim():
                    # Not the watchdog's: the client went away. A resumable stream goes on.
                    if not self._start_draining(asyncio.current_task()):
                        raise
                    draining = True
                    if unobserved:  # the chunk whose write was interrupted: recorded, and
                        self.out += len(unobserved)  # now observed (usage, end marker)
                        if self.observing:
                            observe(unobserved, clock())
                        unobserved = b""
                    if watchdog.fired is not None:  # it fired in the same loop turn
                        return watchdog.fired
                    if watchdog.keepalive_due:
                        watchdog.resume()
                    continue
                fired = await self._interrupted(watchdog, write)
                if fired is not None:
                    return fired
                draining = self.draining  # the keep-alive's write may have found the client gone
                resumed = True
            except (aiohttp.ClientError, OSError):
                return Outcome.PAYLOAD_ERROR

    def _start_draining(self, task: asyncio.Task[object] | None) -> bool:
        """The client went away: with a recorder (resume on), keep reading the upstream to
        its end without writing (True); otherwise the stream ends (False). A second
        cancellation while draining (shutdown) is not absorbed."""
        if self.recorder is None:
            return False
        if self.draining:
            # Draining began on a failed write; aiohttp's own cancellation for the same
            # disconnect follows: absorbed once. Any later one (shutdown) ends the stream.
            if task is not None and not self._cancel_absorbed:
                task.uncancel()
                self._cancel_absorbed = True
                return True
            return False
        if task is not None:
            task.uncancel()
            self._cancel_absorbed = True
        self.draining = True
        self._sent = self.out
        self.report.span.add_event("gateway.client_gone_draining")
        return True

    def stop(self, outcome: Outcome) -> bool:
        """End this stream with `outcome` (its terminal error event, the upstream closed) at
        the next event boundary: at once when it is at one, else when the event being relayed
        is whole. False when the stream is already ending."""
        if self.state not in (State.COMMITTED, State.RELAYING) or self._stop is not None:
            return False
        if self.stream.facts.done:
            return False  # its end marker has passed: nothing is left to cut
        self._stop = outcome
        watchdog = self._watchdog
        if watchdog is not None and self._at_boundary():
            watchdog.fire(outcome)  # interrupts the wait for the upstream (or the client)
        return True

    def _at_boundary(self) -> bool:
        """Between two events (False when the stream is not followed as SSE: never known)."""
        injector = self.injector
        return self._clean_cut or (
            self.observing
            and self.stream.decoder.at_boundary
            and (injector is None or injector.at_boundary)
        )

    def _with_id(self, event: bytes) -> bytes:
        return event if self.injector is None else self.injector.feed(event)

    def live_events(self) -> int:
        return self.stream.facts.events

    def live_ttft_ms(self) -> float | None:
        first = self.stream.facts.first_token_at
        return None if first is None else (first - self.report.started) * 1000

    def _observe(self, chunk: bytes, now: float) -> None:
        """Feed `chunk` to the decoder and its events to the observer. Once the first token
        has passed, the events of a chunk the observer calls quiet are only counted (what
        matters later, a finish reason, usage, an error, the end, is found by its bytes: a
        marker split over two reads is caught by the overlap with the previous read, an event
        still incomplete keeps the next reads shown). Observation is best effort: a stream that
        is not SSE stops being observed, never relayed."""
        stream = self.stream
        try:
            events = stream.decoder.feed(chunk)
        except SSEError:
            self.observing = False
            return
        observer, facts = stream.observer, stream.facts
        if self._seen_first:
            if not self._hot:
                window = self._tail + chunk[:_OVERLAP]
                self._hot = not (observer.quiet(chunk) and observer.quiet(window))
            # The last bytes seen, across reads shorter than a marker too.
            tail = chunk if len(chunk) >= _OVERLAP else self._tail + chunk
            self._tail = tail[-_OVERLAP:]
            if events:
                if self._hot:
                    for event in events:
                        observer.on_event(event, now)
                else:
                    observer.skip(events)
                facts.last_event_at = now
            if self._hot and stream.decoder.at_boundary:
                self._hot = False
            return
        if events:
            for event in events:
                observer.on_event(event, now)
            facts.last_event_at = now
            if facts.first_token_at is not None:
                self._first_token()
                self._start_quiet(chunk)

    def _start_quiet(self, last: bytes) -> None:
        """The first token has passed: from here on, quiet chunks are only counted. Until the
        stream is at an event boundary the next reads are shown (an event may be completing)."""
        self._seen_first = True
        self._tail = last[-_OVERLAP:]  # a short read's earlier bytes are in `hot` below
        self._hot = not self.stream.decoder.at_boundary

    async def _interrupted(
        self, watchdog: _Watchdog, write: Callable[[bytes], Awaitable[None]]
    ) -> Outcome | None:
        """The watchdog interrupted a read: its outcome, or None after a keep-alive comment
        (relaying goes on)."""
        fired = watchdog.fired
        if fired is not None:
            return fired
        if self.recorder is not None:
            # Recorded while draining too: a reattached client's proxies see the silence
            # broken as the first connection's would have.
            self.recorder.append(_KEEPALIVE)
        if self.injector is not None:
            self.injector.skip(len(_KEEPALIVE))
        if self.draining:
            watchdog.resume()
            return None
        if not await self._keepalive(write) and not self._start_draining(None):
            return Outcome.CLIENT_CANCEL
        watchdog.resume()
        return None

    @staticmethod
    async def _keepalive(write: Callable[[bytes], Awaitable[None]]) -> bool:
        """Upstream silence interrupted the read without losing data (aiohttp keeps what
        arrived buffered): tell idle proxies we are alive. False when the client is gone."""
        try:
            await write(_KEEPALIVE)
        except ConnectionResetError:
            return False
        return True

    def _classify(self, end: Outcome) -> Outcome:
        """A clean end is complete when the end marker or a finish reason was seen (servers
        that omit `[DONE]` or `message_stop`); otherwise it was truncated. An upstream's own
        in-band error makes it an upstream error."""
        facts = self.stream.facts
        if end is Outcome.OK:
            if facts.error_type is not None:
                return Outcome.UPSTREAM_ERROR
            if facts.done or not self.observing or facts.finish_reason is not None:
                return Outcome.OK
            return Outcome.TRUNCATED
        if facts.error_type is not None and end is Outcome.PAYLOAD_ERROR:
            return Outcome.UPSTREAM_ERROR
        return end

    async def _end(self, response: web.StreamResponse, end: Outcome) -> Outcome:
        """End the stream: cleanly, with the gateway's error event (only at an event
        boundary), or by cutting the connection mid-event."""
        if self.draining:
            # Nobody to write to: what the client would have got is recorded for a reattach.
            self.report.drain_end = end.value
            if end not in (Outcome.OK, Outcome.UPSTREAM_ERROR):
                assert self.recorder is not None
                if self._at_boundary():
                    self.recorder.append(self._with_id(self._error_event(end)))
                else:
                    self._cut = True
            return self._gone()
        if end in (Outcome.OK, Outcome.UPSTREAM_ERROR):
            # An upstream's in-band error already told the client, in the client's format.
            return await self._eof(response, end)
        if self._clean_cut or (self.observing and self.stream.decoder.at_boundary):
            event = self._with_id(self._error_event(end))
            if self.recorder is not None:
                self.recorder.append(event)
            try:
                await response.write(event)
            except ConnectionResetError:
                self.state = State.ABORTED
                return end
            self.state = State.ERRORED
            return await self._eof(response, end)
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self.state = State.ABORTED
        return end

    async def _eof(self, response: web.StreamResponse, end: Outcome) -> Outcome:
        try:
            await response.write_eof()
        except ConnectionResetError:
            return self._gone()
        if self.state is State.RELAYING:
            self.state = State.DONE
        return end

    def _gone(self) -> Outcome:
        self.state = State.CLIENT_GONE
        return Outcome.CLIENT_CANCEL

    def _error_event(self, end: Outcome) -> bytes:
        provider = self.stream.provider
        timeouts = self.req.route.timeouts
        if end is Outcome.OPERATOR_CANCEL:
            kind = Kind.CANCELLED_BY_OPERATOR
            message = "An operator of this gateway ended the stream (cancelled_by_operator)."
        elif end is Outcome.BUDGET_EXCEEDED:
            kind = Kind.BUDGET_EXCEEDED
            meter = self.meter
            what = "cost" if meter is not None and meter.spent_by == "cost" else "token"
            tier = meter.spec.tier if meter is not None else "?"
            message = (
                f"Budget exceeded: the {what} budget of tier '{tier}' is spent; the gateway "
                "ended the stream (budget_exceeded)."
            )
        elif end is Outcome.CHUNK_TIMEOUT:
            kind = Kind.UPSTREAM_TIMEOUT
            message = (
                f"The upstream provider '{provider}' went silent for more than "
                f"{timeouts.chunk_s:g} s; the gateway ended the stream."
            )
        elif end is Outcome.TOTAL_TIMEOUT:
            kind = Kind.UPSTREAM_TIMEOUT
            message = f"The request exceeded the gateway's limit of {timeouts.total_s:g} s."
        else:
            kind = Kind.UPSTREAM_ERROR
            message = f"The upstream provider '{provider}' ended the stream before it was complete."
        sequence = self._sequence
        if sequence is None:
            sequence = self.stream.observer.next_sequence_number()
        return terminal_event(self.req.endpoint, kind, message, sequence)

    def _first_token(self) -> None:
        """Recorded live, the moment the first content event passes (not at the end)."""
        report = self.report
        facts = self.stream.facts
        assert facts.first_token_at is not None
        span = report.attempt_span
        span.add_event("gen_ai.first_token")
        # The attempt's own time to first chunk (the server span has the caller's).
        started = report.timings.attempt_started or report.started
        span.set_attribute("gen_ai.response.time_to_first_chunk", facts.first_token_at - started)

    def _killed(self, end: Outcome) -> None:
        report, facts = self.report, self.stream.facts
        report.span.add_event(
            f"gateway.stream_{end.value}",
            {"gateway.events": facts.events, "gateway.limit_s": self.req.route.timeouts.chunk_s},
        )
        _log.warning(
            "stream killed",
            reason=end.value,
            deployment=report.deployment,
            key_id=report.key_id,
            caller=report.caller,
            events=facts.events,
        )
