"""The one writer of a fake response's body: records every byte it hands to the transport,
splits writes into pieces and compresses them, as scripted."""

from __future__ import annotations

import asyncio
import random
import zlib
from typing import Final

from aiohttp import web

from gateway.fake.records import RequestRecord
from gateway.fake.script import ContentEncoding

_SPLIT_MAX: Final = 64
# The largest single write: bigger events and bodies go out in pieces of this size.
_PIECE_MAX: Final = 64 * 1024


def _compressor(encoding: ContentEncoding) -> zlib._Compress:
    # gzip: a gzip member (wbits 16 + 15); deflate: the zlib format HTTP means by "deflate".
    return zlib.compressobj(wbits=31 if encoding == "gzip" else 15)


def compressed(payload: bytes, encoding: ContentEncoding | None) -> bytes:
    """The whole of ``payload`` in ``encoding`` (``payload`` itself without one)."""
    if encoding is None:
        return payload
    zipper = _compressor(encoding)
    return zipper.compress(payload) + zipper.flush()


class Writer:
    """Writes body bytes to one response and records them.

    With an ``encoding`` each `write` is compressed and sync-flushed on its own, so that it
    can be decoded as soon as it arrives; `finish` ends the encoding. What goes on the wire
    is split into random pieces if scripted, else into pieces of at most 64 KiB.
    """

    __slots__ = ("_keep", "_loop", "_record", "_resp", "_rng", "_zipper")

    def __init__(
        self,
        resp: web.StreamResponse,
        record: RequestRecord,
        split_seed: int | None,
        *,
        keep: bool,
        encoding: ContentEncoding | None = None,
    ) -> None:
        self._resp = resp
        self._record = record
        self._keep = keep
        self._loop = asyncio.get_running_loop()
        # Not for security: a reproducible spread of piece sizes is the point.
        self._rng = random.Random(split_seed) if split_seed is not None else None  # noqa: S311
        self._zipper = _compressor(encoding) if encoding is not None else None

    async def write(self, data: bytes) -> None:
        """Write one event (or body); raises `ConnectionError` if the client went away."""
        if self._zipper is not None:
            data = self._zipper.compress(data) + self._zipper.flush(zlib.Z_SYNC_FLUSH)
        await self._send(data)

    async def finish(self) -> None:
        """End the content encoding (its trailer), if any; call before ``write_eof``."""
        zipper, self._zipper = self._zipper, None
        if zipper is not None:
            await self._send(zipper.flush())

    async def _send(self, data: bytes) -> None:
        record = self._record
        if record.first_byte_at is None:
            record.first_byte_at = self._loop.time()
        rng = self._rng
        if rng is None and len(data) <= _PIECE_MAX:
            await self._put(data)
            return
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            size = rng.randint(1, _SPLIT_MAX) if rng is not None else _PIECE_MAX
            piece = bytes(view[pos : pos + size])
            await self._put(piece)
            pos += len(piece)
            # Yield so that each piece can leave as its own TCP segment.
            await asyncio.sleep(0)

    async def _put(self, piece: bytes) -> None:
        await self._resp.write(piece)
        if self._keep:
            self._record.sent += piece
        self._record.writes += 1
