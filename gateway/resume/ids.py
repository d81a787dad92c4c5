"""`resume.inject_ids`: an `id: <offset>` line in each event, the one documented exception to
byte-exact relay. The offset is the client-visible byte count at the end of that event (its id
line included), so a browser EventSource that reconnects sends `Last-Event-ID: <bytes it has>`
and the gateway resumes it exactly there.

An event is whole at its blank line (LF, CRLF or CR line endings); an incomplete event is held
until its end arrives (so with ids on, bytes leave at event boundaries, not as they arrive).
"""

from __future__ import annotations

_ENDINGS = ((b"\r\n\r\n", b"\r\n"), (b"\n\n", b"\n"), (b"\r\r", b"\r"))


class IdInjector:
    __slots__ = ("_held", "offset")

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset  # client-visible bytes so far
        self._held = b""

    def skip(self, n: int) -> None:
        """`n` bytes went to the client around the injector (a keep-alive comment)."""
        self.offset += n

    def feed(self, data: bytes) -> bytes:
        """The whole events of `held + data`, each with its id line; the rest is held."""
        buf = self._held + data if self._held else data
        out: list[bytes] = []
        start = 0
        position = self.offset
        while True:
            found = _next_end(buf, start)
            if found is None:
                break
            end, sep, eol = found
            body = buf[start : end + len(eol)]  # the event's lines, each with its ending
            line = _id_line(position + len(body) + len(eol), eol)
            out += (body, line, eol)  # eol: the blank line that dispatches it
            position += len(body) + len(line) + len(eol)
            start = end + len(sep)
        self._held = buf[start:]
        self.offset = position
        return b"".join(out)

    def flush(self) -> bytes:
        """At the end: whatever incomplete event is held, as it is."""
        rest, self._held = self._held, b""
        self.offset += len(rest)
        return rest

    @property
    def at_boundary(self) -> bool:
        return not self._held


def _id_line(before: int, eol: bytes) -> bytes:
    """`id: N` + eol where N = `before` + the line's own length (the offset counts it)."""
    base = before + 4 + len(eol)  # "id: " and the line ending
    digits = len(str(base))
    while len(str(base + digits)) != digits:
        digits += 1
    return b"id: %d%b" % (base + digits, eol)


def _next_end(buf: bytes, start: int) -> tuple[int, bytes, bytes] | None:
    """The earliest event end at or after `start`: (index, separator, line ending)."""
    best: tuple[int, bytes, bytes] | None = None
    for sep, eol in _ENDINGS:
        index = buf.find(sep, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, sep, eol)
    return best
