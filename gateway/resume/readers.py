"""Reattaches open now on this instance, per stream and per caller."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Readers:
    """Reattaches open now on this instance, per stream and per caller (each one follows a
    live tail and, with Redis, holds a connection in XREAD BLOCK: they are bounded)."""

    def __init__(self) -> None:
        self.per_stream: dict[str, int] = {}
        self.per_caller: dict[str, int] = {}

    @contextlib.contextmanager
    def open(self, stream_id: str, caller: str) -> Iterator[None]:
        for counts, key in ((self.per_stream, stream_id), (self.per_caller, caller)):
            counts[key] = counts.get(key, 0) + 1
        try:
            yield
        finally:
            for counts, key in ((self.per_stream, stream_id), (self.per_caller, caller)):
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]
