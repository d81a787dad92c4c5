"""`gateway bench` settings: the command line parsed once, and the fixed parts of the method."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Before the measured runs: a few streams on each target (connections, imports, caches).
WARMUP_STREAMS = 20
WARMUP_CONCURRENCY = 5
# What a run can be sent to: the fake provider itself, nginx in front of it, the gateway with
# quiet logging and no limits, the gateway with production features on, and the quiet gateway
# metering every stream against spend budgets (in memory, and in a redis-server).
TARGETS = (
    "direct",
    "nginx",
    "gateway",
    "gateway-prod",
    "gateway-budget",
    "gateway-budget-redis",
)
PROXIES = TARGETS[1:]
SWEEP_TARGETS = ("direct", "nginx", "gateway")
SOAK_TARGETS = ("gateway",)


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


def _targets(text: str | None, soak: bool) -> tuple[str, ...]:
    if text is None:
        return SOAK_TARGETS if soak else SWEEP_TARGETS
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        raise BenchError(f"--targets: expected some of {','.join(TARGETS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise BenchError(f"--targets: a target is named twice in {text!r}")
    return names


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """The command line, parsed once."""

    concurrency: tuple[int, ...]
    gaps_ms: tuple[int, ...]
    chunks: int
    streams: int  # 0: max(200, 4 x concurrency) per run
    max_seconds: float
    markdown: bool
    tracing: bool = False  # the gateways export every trace (sampled 100 %) over OTLP
    targets: tuple[str, ...] = SWEEP_TARGETS  # in the order each cell runs them
    repeats: int = 1
    soak: int = 0  # > 0: hold this many slow streams at once instead of the sweep
    soak_chunks: int = 30
    soak_gap_ms: int = 1000

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        """Raises BenchError naming the bad option."""
        soak = int(getattr(args, "soak", 0) or 0)
        settings = cls(
            concurrency=_int_list(str(args.concurrency), "concurrency", 1),
            gaps_ms=_int_list(str(args.gaps), "gaps", 0),
            chunks=int(args.chunks),
            streams=int(args.streams),
            max_seconds=float(args.max_seconds),
            markdown=bool(args.markdown),
            tracing=bool(getattr(args, "tracing", False)),
            targets=_targets(getattr(args, "targets", None), soak > 0),
            repeats=int(getattr(args, "repeats", 1)),
            soak=soak,
            soak_chunks=int(getattr(args, "soak_chunks", 30)),
            soak_gap_ms=int(getattr(args, "soak_gap_ms", 1000)),
        )
        settings._check()
        return settings

    def _check(self) -> None:
        for bad, message in (
            (self.chunks < 1, "--chunks must be >= 1"),
            (self.streams < 0, "--streams must be >= 0"),
            (not self.max_seconds > 0, "--max-seconds must be > 0"),
            (self.repeats < 1, "--repeats must be >= 1"),
            (self.soak < 0, "--soak must be >= 0"),
            (self.soak_chunks < 1, "--soak-chunks must be >= 1"),
            (self.soak_gap_ms < 0, "--soak-gap-ms must be >= 0"),
        ):
            if bad:
                raise BenchError(message)

    def streams_for(self, concurrency: int) -> int:
        return self.streams or max(200, 4 * concurrency)

    @property
    def peak_streams(self) -> int:
        """The most streams in flight at once through one target (what proxies are sized for)."""
        return self.soak or max(self.concurrency)
