"""`gateway bench` settings: the command line parsed once, and the fixed parts of the method."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Before the measured runs: a few streams on each path (connections, imports, caches).
WARMUP_STREAMS = 20
WARMUP_CONCURRENCY = 5


class BenchError(Exception):
    """The benchmark cannot run (bad arguments, a subprocess that does not come up)."""


def _int_list(text: str, name: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise BenchError(f"--{name}: expected integers >= {minimum}, got {text!r}")
    return values


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """The command line, parsed once."""

    concurrency: tuple[int, ...]
    gaps_ms: tuple[int, ...]
    chunks: int
    streams: int  # 0: max(200, 4 x concurrency) per run
    max_seconds: float
    markdown: bool
    tracing: bool = False  # the gateway exports every trace (sampled 100 %) over OTLP

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        """Raises BenchError naming the bad option."""
        settings = cls(
            concurrency=_int_list(str(args.concurrency), "concurrency", 1),
            gaps_ms=_int_list(str(args.gaps), "gaps", 0),
            chunks=int(args.chunks),
            streams=int(args.streams),
            max_seconds=float(args.max_seconds),
            markdown=bool(args.markdown),
            tracing=bool(getattr(args, "tracing", False)),
        )
        if settings.chunks < 1:
            raise BenchError("--chunks must be >= 1")
        if settings.streams < 0:
            raise BenchError("--streams must be >= 0")
        if not settings.max_seconds > 0:
            raise BenchError("--max-seconds must be > 0")
        return settings

    def streams_for(self, concurrency: int) -> int:
        return self.streams or max(200, 4 * concurrency)
