"""Sans-I/O incremental Server-Sent Events decoder that only observes.

The relay forwards upstream bytes to the client unchanged; a copy of every chunk is fed to
:class:`SSEDecoder` so the gateway can see events (first token, usage, finish reason, errors)
and know when the stream sits at an event boundary. The decoder never re-encodes anything and
never decodes ``data`` payloads: they stay raw UTF-8 bytes, so a chunk boundary inside a
multi-byte character is harmless.

Grammar and processing follow WHATWG HTML "Server-sent events", section "Interpreting an event
stream", except that ``SSEEvent.id`` reports only the id given inside that event.

It runs on every chunk of every stream, so the hot path is written for CPython: lines are split
in C by ``bytes.splitlines`` (which, for ``bytes``, breaks only at CR, LF and CRLF: exactly the
SSE line ends), a chunk is copied only when a partial line from the previous chunk must be
joined to it, and a single-line ``data`` payload is the line slice itself.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Final, NoReturn

__all__ = ["SSEDecoder", "SSEError", "SSEEvent", "SSELineTooLong", "event_ends"]

_BOM: Final = b"\xef\xbb\xbf"
_LF: Final = 10
_CR: Final = 13
_COLON: Final = 58


class SSEError(Exception):
    """Base class of every error raised by this module."""


class SSELineTooLong(SSEError):
    """A line, or the accumulated data of one event, exceeded ``max_line_bytes``.

    Raised by :meth:`SSEDecoder.feed`; the decoder is unusable afterwards (every later
    ``feed`` raises this again), and the caller is expected to stop observing the stream
    while still relaying it.
    """


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    ``event`` is the value of the last ``event:`` field of the event, ``""`` when it had none
    (deliberately not replaced by ``"message"``). ``data`` is the event's data lines joined
    with ``b"\\n"``, as raw bytes exactly as received. ``id`` is the last ``id:`` field given
    inside this event (an id containing NUL is ignored), ``None`` if none; the spec's
    persistent last-event-id is intentionally not carried over. ``retry`` is the last
    ``retry:`` value of this event that consisted only of ASCII digits, else ``None``.
    """

    event: str
    data: bytes
    id: str | None
    retry: int | None


class SSEDecoder:
    """Incremental SSE decoder: feed it raw chunks, get the events they complete.

    Plain synchronous code with no I/O, not thread-safe; one instance per stream. Chunk
    boundaries may fall anywhere (inside a CRLF, inside the BOM, inside a multi-byte UTF-8
    character); the result is the same as feeding the whole stream at once.
    """

    __slots__ = (
        "_bom_pending",
        "_bytes_fed",
        "_data",
        "_data_size",
        "_event_type",
        "_events",
        "_failed",
        "_id",
        "_in_event",
        "_max",
        "_partial",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        """Create a decoder; ``max_line_bytes`` caps one line and one event's data (>= 1)."""
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        # Bytes seen at the start of the stream that may still turn out to be a split BOM;
        # None once the BOM question is settled.
        self._bom_pending: bytes | None = b""
        # Unterminated last line of the previous chunk (never contains CR or LF).
        self._partial = bytearray()
        # The previous chunk ended in CR: an LF opening the next chunk completes that CRLF.
        self._skip_lf = False
        # Field state of the event being assembled.
        self._data: list[bytes] = []
        # Joined size of the data lines; tracked only once an event has a second data line.
        self._data_size = 0
        self._event_type = b""
        self._id: bytes | None = None
        self._retry: int | None = None
        self._in_event = False
        self._failed = False
        self._events = 0
        self._bytes_fed = 0

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at an event boundary.

        That is: no partial line pending and no field line of an undispatched event; a block
        made only of comments counts as a boundary once its line has ended. Only then may the
        gateway inject its own keep-alive comment or error event into the client stream.
        When the last chunk ended in CR this is True although the upstream's next byte may be
        the LF of a CRLF: after an injected block that LF merely reads as an extra blank line,
        which dispatches nothing.
        """
        return not (self._in_event or self._partial or self._bom_pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the event being assembled (its data so far and the pending line)."""
        return len(self._partial) + sum(len(d) for d in self._data)

    @property
    def events(self) -> int:
        """Number of events dispatched so far."""
        return self._events

    @property
    def bytes_fed(self) -> int:
        """Total number of bytes passed to :meth:`feed`, BOM included."""
        return self._bytes_fed

    def close(self) -> list[SSEEvent]:
        """Signal the end of the stream; always returns ``[]``.

        Per spec an event not terminated by a blank line is not dispatched, so nothing can
        complete here. No state is reset; this exists so callers can state the end of stream.
        """
        return []

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completed, in stream order.

        The returned list is new and owned by the caller. Raises :class:`SSELineTooLong` when
        a line (without its line end), or the data of one event, exceeds ``max_line_bytes``;
        events completed earlier in the same chunk are then lost, and the decoder refuses all
        further input.
        """
        lines = self._lines(chunk)
        if not lines:
            return []
        # The event state lives in locals for the loop (attribute access is the main cost
        # here) and is written back at the end; on an exception the decoder is dead anyway.
        out: list[SSEEvent] = []
        data = self._data
        event_type = self._event_type
        event_id = self._id
        retry = self._retry
        in_event = self._in_event
        for line in lines:
            if not line:
                if data:
                    out.append(
                        SSEEvent(
                            event_type.decode("utf-8", "replace") if event_type else "",
                            data[0] if len(data) == 1 else b"\n".join(data),
                            None if event_id is None else event_id.decode("utf-8", "replace"),
                            retry,
                        )
                    )
                    data.clear()  # the event holds its own bytes, not this list
                    self._data_size = 0
                # A blank line ends the block whether or not it dispatched anything.
                event_type = b""
                event_id = None
                retry = None
                in_event = False
            elif line.startswith(b"data: "):
                # By far the most common line: skip the general field parsing below.
                in_event = True
                if data:
                    self._check_data_size(data, len(line) - 6)
                data.append(line[6:])
            elif line[0] != _COLON:  # lines starting with ":" are comments
                in_event = True
                colon = line.find(b":")
                if colon < 0:
                    name = line
                    value = b""
                else:
                    name = line[:colon]
                    value = line[colon + 2 if line[colon + 1 : colon + 2] == b" " else colon + 1 :]
                if name == b"data":
                    if data:
                        self._check_data_size(data, len(value))
                    data.append(value)
                elif name == b"event":
                    event_type = value
                elif name == b"id":
                    if b"\x00" not in value:
                        event_id = value
                elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
                    # Past int()'s digit limit there is no sane reconnection time: ignore it.
                    with contextlib.suppress(ValueError):
                        retry = int(value)
        self._event_type = event_type
        self._id = event_id
        self._retry = retry
        self._in_event = in_event
        if out:
            self._events += len(out)
        return out

    def _lines(self, chunk: bytes | bytearray | memoryview) -> list[bytes]:
        """The complete lines `chunk` ends (joined with what was pending), line ends
        removed; what follows the last line end is kept pending. Raises SSELineTooLong."""
        if self._failed:
            raise SSELineTooLong("SSE decoder stopped after an earlier oversized line")
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        size = len(chunk)
        if not size:
            return []
        self._bytes_fed += size

        if self._bom_pending is not None:
            chunk = self._strip_bom(chunk)
            if not chunk:
                return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []

        last = chunk[-1]
        partial = self._partial
        if partial:
            if b"\n" not in chunk and b"\r" not in chunk:
                # Still inside the same line: grow the pending bytes (amortised, so a long
                # line arriving in many small chunks stays linear).
                partial += chunk
                if len(partial) > self._max:
                    self._fail("SSE line exceeds max_line_bytes")
                return []
            chunk = b"".join((partial, chunk))
            partial.clear()

        lines = chunk.splitlines()
        if last == _CR:
            self._skip_lf = True
        elif last != _LF:
            tail = lines.pop()
            if len(tail) > self._max:
                self._fail("SSE line exceeds max_line_bytes")
            partial += tail
            if not lines:
                return []
        if len(chunk) > self._max:
            # Only a chunk longer than the cap can hold an oversized complete line.
            for line in lines:
                if len(line) > self._max:
                    self._fail("SSE line exceeds max_line_bytes")

        return lines

    def _check_data_size(self, data: list[bytes], added: int) -> None:
        """Account for one more data line of ``added`` bytes; raise past the cap.

        Called only from the second data line of an event on: a single line already passed
        the per-line check.
        """
        if not self._data_size:
            self._data_size = len(data[0])
        self._data_size += added + 1
        if self._data_size > self._max:
            self._fail("SSE event data exceeds max_line_bytes")

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drop one UTF-8 BOM at the very start of the stream, which may arrive split."""
        pending = self._bom_pending
        assert pending is not None
        if pending:
            chunk = pending + chunk
        if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
            self._bom_pending = chunk
            return b""
        self._bom_pending = None
        return chunk[len(_BOM) :] if chunk.startswith(_BOM) else chunk

    def _fail(self, message: str) -> NoReturn:
        """Mark the decoder dead and raise; the caller stops observing but keeps relaying."""
        self._failed = True
        raise SSELineTooLong(message)


# Two line ends in a row (CR, LF or CRLF each), overlapping matches included: every place a
# blank line can end.
_BLANK_LINE = re.compile(rb"(?=([\r\n](?:\r\n|[\r\n])))")


def event_ends(chunk: bytes) -> list[int]:
    """Offsets in `chunk` after which the decoder may have dispatched an event: every end of
    a blank line, a line end opening the chunk (the previous read ended a line), and the
    chunk's end. Feeding `chunk` piece by piece at these offsets shows which piece completed
    which event (some pieces complete none); the result is the same as feeding it whole."""
    if b"\r" in chunk:
        ends = [m.start() + len(m.group(1)) for m in _BLANK_LINE.finditer(chunk)]
    else:  # LF framing, by far the most common: one find per blank line
        ends = []
        find = chunk.find
        at = find(b"\n\n")
        while at >= 0:
            ends.append(at + 2)
            at = find(b"\n\n", at + 1)
    if chunk[:1] in (b"\n", b"\r"):
        first = 2 if chunk[:2] == b"\r\n" else 1
        if not ends or ends[0] != first:
            ends.insert(0, first)
    if not ends or ends[-1] != len(chunk):
        ends.append(len(chunk))
    return ends


def _bench(events: int = 300, rounds: int = 200) -> float:
    """Return µs per event for a synthetic OpenAI chat stream fed one event per chunk."""
    payload = (
        b'{"id":"chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0","object":"chat.completion.chunk",'
        b'"created":1770933892,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default",'
        b'"system_fingerprint":"fp_de604bd877","choices":[{"index":0,"delta":{"content":'
        b'" popular"},"logprobs":null,"finish_reason":null}],"usage":null,'
        b'"obfuscation":"yoKFv"}'
    )
    chunks = [b"data: " + payload + b"\n\n" for _ in range(events - 1)] + [b"data: [DONE]\n\n"]
    best = float("inf")
    for _ in range(rounds):
        decoder = SSEDecoder()
        feed = decoder.feed
        t0 = time.perf_counter()
        for chunk in chunks:
            feed(chunk)
        best = min(best, time.perf_counter() - t0)
        assert decoder.events == events
    return best / events * 1e6


if __name__ == "__main__":
    per_event = _bench()
    print(f"{per_event:.3f} µs/event, {per_event * 300:.1f} µs per 300-event stream (best of 200)")
