"""What on-call reads: the open streams (and the handle that ends one), a five-minute window of
per-model figures, the state of the configuration and of the process (draining or not).

One `Ops` per application. Nothing here runs per chunk: a stream registers once when it is
committed and leaves once when it ends; its live figures (events, bytes, TTFT) are read from
its owner when someone asks. The window takes one sample per finished request (a sink).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.report import Outcome, Report

if TYPE_CHECKING:
    from gateway.config.runtime import Runtime

STREAM_ID_HEADER = "x-gateway-stream-id"
WINDOW_S = 300.0
_BUCKET_S = 10.0
# TTFT samples kept per model and bucket (beyond it, every k-th sample: bounded memory).
_MAX_SAMPLES = 2048


def new_stream_id() -> str:
    """128 random bits, URL-safe: unguessable, so an id alone reveals nothing."""
    return "gs_" + secrets.token_urlsafe(16)


class Cancellable(Protocol):
    """What the registry needs of a stream owner (gateway.relay.StreamOwner)."""

    stream_id: str
    out: int
    draining: bool  # the client left; the upstream is read to its end for a reattach

    def stop(self, outcome: Outcome) -> bool: ...

    def live_events(self) -> int: ...

    def live_ttft_ms(self) -> float | None: ...


@dataclass(slots=True)
class LiveStream:
    """One committed stream, as /admin/streams shows it."""

    id: str
    caller: str | None
    model: str | None
    deployment: str | None
    key_id: str | None
    started_at: float  # unix seconds (the request's start)
    owner: Cancellable = field(repr=False)

    def view(self) -> dict[str, Any]:
        ttft = self.owner.live_ttft_ms()
        return {
            "id": self.id,
            "caller": self.caller,
            "model": self.model,
            "deployment": self.deployment,
            "key_id": self.key_id,
            "started_at": round(self.started_at, 3),
            "ttft_ms": None if ttft is None else round(ttft, 3),
            "events": self.owner.live_events(),
            "bytes": self.owner.out,
            "draining": self.owner.draining,
        }


class LiveStreams:
    """The open streams of this process, by stream id."""

    def __init__(self) -> None:
        self._open: dict[str, LiveStream] = {}
        self._waiters: dict[str, asyncio.Event] = {}  # streams someone waits to see end

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[LiveStream]:
        return iter(list(self._open.values()))

    def add(self, owner: Cancellable, report: Report) -> None:
        started = time.time() - (time.perf_counter() - report.started)
        self._open[owner.stream_id] = LiveStream(
            owner.stream_id,
            report.caller,
            report.model_label,
            report.deployment,
            report.key_id,
            started,
            owner,
        )

    def remove(self, stream_id: str) -> None:
        self._open.pop(stream_id, None)
        if self._waiters:
            waiter = self._waiters.pop(stream_id, None)
            if waiter is not None:
                waiter.set()

    async def wait_ended(self, stream_id: str, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) for the stream to end; True once it has."""
        if stream_id not in self._open:
            return True
        waiter = self._waiters.setdefault(stream_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.wait()
        except TimeoutError:
            return False
        return True

    def get(self, stream_id: str) -> LiveStream | None:
        return self._open.get(stream_id)

    def views(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        streams = sorted(self._open.values(), key=lambda s: s.started_at, reverse=True)
        return [s.view() for s in streams[:limit]]


@dataclass(slots=True)
class _Bucket:
    start: float
    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    seen: int = 0  # TTFT samples offered (ttfts keeps at most _MAX_SAMPLES of them)


class Window:
    """Per model, the last five minutes in ten-second buckets: requests, errors (outcomes that
    count toward the error-rate alert) and time to first token of streams."""

    def __init__(self, window_s: float = WINDOW_S, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._models: dict[str, deque[_Bucket]] = {}

    def record(self, report: Report, _now: float) -> None:
        """A sink: one finished request."""
        now = self._clock()
        buckets = self._models.get(report.model_label)
        if buckets is None:
            buckets = self._models[report.model_label] = deque()
        start = now - now % _BUCKET_S
        if not buckets or buckets[-1].start != start:
            buckets.append(_Bucket(start))
            self._expire(buckets, now)
        bucket = buckets[-1]
        bucket.requests += 1
        if report.label.is_error:
            bucket.errors += 1
        facts = report.facts
        if facts is not None and facts.first_token_at is not None:
            bucket.seen += 1
            ttft_ms = (facts.first_token_at - report.started) * 1000
            if len(bucket.ttfts) < _MAX_SAMPLES:
                bucket.ttfts.append(ttft_ms)
            else:  # reservoir: every sample has the same chance to stay
                slot = secrets.randbelow(bucket.seen)
                if slot < _MAX_SAMPLES:
                    bucket.ttfts[slot] = ttft_ms

    def _expire(self, buckets: deque[_Bucket], now: float) -> None:
        while buckets and buckets[0].start <= now - self.window_s:
            buckets.popleft()

    def summary(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for model, buckets in sorted(self._models.items()):
            self._expire(buckets, now)
            requests = sum(b.requests for b in buckets)
            if not requests:
                continue
            errors = sum(b.errors for b in buckets)
            ttfts = sorted(t for b in buckets for t in b.ttfts)
            out.append(
                {
                    "model": model,
                    "requests": requests,
                    "requests_per_s": round(requests / self.window_s, 3),
                    "ttft_p50_ms": _quantile(ttfts, 0.50),
                    "ttft_p95_ms": _quantile(ttfts, 0.95),
                    "errors": errors,
                    "error_rate": round(errors / requests, 4),
                }
            )
        return out


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return round(values[index], 3)


@dataclass(slots=True)
class ReloadResult:
    at: float  # unix seconds
    ok: bool
    trigger: str  # sighup | watch
    error: str | None = None  # the rejection (never a secret: ConfigError messages name paths)
    restart_required: tuple[str, ...] = ()


@dataclass(slots=True)
class ConfigState:
    """The configuration in service and what the last reload did."""

    path: str | None
    loaded_at: float
    digest: str  # sha256 of the file's bytes
    last_reload: ReloadResult | None = None
    restart_required: tuple[str, ...] = ()  # changed keys that only a restart applies

    def view(self) -> dict[str, Any]:
        last = self.last_reload
        return {
            "path": self.path,
            "loaded_at": round(self.loaded_at, 3),
            "hash": self.digest,
            "last_reload": None
            if last is None
            else {
                "at": round(last.at, 3),
                "ok": last.ok,
                "trigger": last.trigger,
                "error": last.error,
            },
            "restart_required": list(self.restart_required),
        }


def file_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# What a reload cannot change in a running process (compared after each good load).
_RESTART_ONLY = (
    ("server", "host"),
    ("server", "port"),
    ("server", "workers"),
    ("server", "backlog"),
    ("server", "keepalive_timeout_s"),
    ("server", "drain_timeout_s"),
    ("server", "max_body_bytes_in_flight"),
    ("server", "max_upstream_connections"),
    ("state",),
    ("admin",),
    ("resume", "store"),
    ("resume", "memory_bytes"),
    ("telemetry",),
    # Header lines are bounded when the listener starts (a larger token needs a restart).
    ("auth", "jwt", "max_token_bytes"),
)


def restart_required(old: Runtime, new: Runtime) -> tuple[str, ...]:
    """The dotted keys whose new value only a restart applies (the reload applies the rest).
    Compares those sections only (a config's models and keys can be megabytes)."""

    def at(config: object, path: tuple[str, ...]) -> object:
        value: object = config
        for part in path:
            value = getattr(value, part, None)
        return value

    return tuple(
        ".".join(path) for path in _RESTART_ONLY if at(old.config, path) != at(new.config, path)
    )


@dataclass(slots=True)
class Ops:
    """The process's operational state, shared by the public app and the admin listener."""

    config: ConfigState
    started: float = field(default_factory=time.time)
    draining: bool = False
    streams: LiveStreams = field(default_factory=LiveStreams)
    window: Window = field(default_factory=Window)
    admin_url: str | None = None  # where the admin listener listens, once it does
