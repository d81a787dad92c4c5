"""The benchmark's client: a closed loop of streaming requests, each stream's SSE events
counted without parsing, and what the streams recorded (TTFT, event gaps, durations)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"
# Per-request bounds: a stalled stream becomes an error instead of hanging its run.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
_DONE_MARKER = b"data: [DONE]\n\n"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Exact nearest-rank percentile of already sorted values (NaN when there are none).

    Nearest rank returns an observed sample: the smallest value with at least q % of the samples
    at or below it; with fewer than 100 samples, p99 is the maximum.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(slots=True)
class RunStats:
    """What one run's streams recorded (seconds); mutated by the client coroutines only."""

    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def fail(self, reason: str) -> None:
        self.errors[reason] += 1

    def error_kinds(self) -> str:
        """The failures by kind, most frequent first: "3 x HTTP 502, 1 x TimeoutError"."""
        return ", ".join(f"{n} x {why}" for why, n in self.errors.most_common())


class EventCounter:
    """Counts SSE events in a byte stream fed in arbitrary pieces, by their b"\\n\\n"
    terminators (the framing of the OpenAI streams the fake provider sends), exactly as
    `bytes.count` would on the whole stream; remembers whether it ends with `data: [DONE]`."""

    __slots__ = ("_pending_newline", "_tail")

    def __init__(self) -> None:
        # A trailing "\n" of the previous piece that no terminator has used yet.
        self._pending_newline = False
        self._tail = b""

    def feed(self, piece: bytes) -> int:
        """The number of events that `piece` completes."""
        data = b"\n" + piece if self._pending_newline else piece
        n = data.count(b"\n\n")
        if data.endswith(b"\n"):
            # count() pairs a run of newlines from its start: an odd run leaves one over.
            self._pending_newline = (len(data) - len(data.rstrip(b"\n"))) % 2 == 1
        else:
            self._pending_newline = False
        self._tail = (self._tail + piece)[-len(_DONE_MARKER) :]
        return n

    @property
    def ended_with_done(self) -> bool:
        return self._tail == _DONE_MARKER


@dataclass(frozen=True, slots=True)
class Target:
    """Where one run's requests go and the stream they script, with everything encoded once."""

    name: str  # "direct" or "gateway"
    url: str
    headers: Mapping[str, str]
    body: bytes
    chunks: int
    gap_ms: int
    timeout: aiohttp.ClientTimeout

    @property
    def expected_events(self) -> int:
        return self.chunks + 3  # role chunk, content chunks, finish chunk, [DONE]

    @property
    def scripted_s(self) -> float:
        """The upstream gaps of one stream (between its chunks, before [DONE])."""
        return (self.chunks + 2) * self.gap_ms / 1000


def make_target(name: str, base_url: str, key: str, chunks: int, gap_ms: int) -> Target:
    """Streams of `chunks` content chunks `gap_ms` apart (scripted through x-fake-* headers)
    from `base_url`, the fake provider or the gateway in front of it, sent with `key`."""
    body = (
        b'{"model":"' + MODEL.encode() + b'","stream":true,'
        b'"messages":[{"role":"user","content":"Benchmark stream."}]}'
    )
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "x-fake-chunks": str(chunks),
        "x-fake-gap-ms": str(gap_ms),
    }
    return Target(
        name, base_url + CHAT_PATH, headers, body, chunks, gap_ms, request_timeout(chunks, gap_ms)
    )


def request_timeout(chunks: int, gap_ms: int) -> aiohttp.ClientTimeout:
    # Generous against the scripted duration (role + chunks + finish + [DONE] events).
    scripted_s = (chunks + 3) * gap_ms / 1000
    return aiohttp.ClientTimeout(
        total=30 + 3 * scripted_s, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )


async def one_stream(session: aiohttp.ClientSession, target: Target, stats: RunStats) -> None:
    """Send one streaming request and record its TTFT, event gaps and duration into `stats`.

    Events are counted by their b"\\n\\n" terminators without parsing anything, so the client
    stays cheap: it shares the CPU with the gateway and the fake provider. TTFT ends when the
    second event (the first content chunk, after the role chunk) has been received in full.
    Events that arrive in one read are recorded with a gap of 0 after the first of them.
    """
    perf = time.perf_counter
    gaps = stats.gaps
    sent = perf()
    try:
        async with session.post(
            target.url, data=target.body, headers=target.headers, timeout=target.timeout
        ) as resp:
            if resp.status != 200:
                await resp.read()
                stats.fail(f"HTTP {resp.status}")
                return
            counter = EventCounter()
            events = 0
            ttft = -1.0
            last = sent
            async for piece in resp.content.iter_any():
                now = perf()
                n = counter.feed(piece)
                if not n:
                    continue
                events += n
                if ttft < 0:
                    if events >= 2:
                        ttft = now - sent
                        gaps.extend([0.0] * (events - 2))
                else:
                    gaps.append(now - last)
                    if n > 1:
                        gaps.extend([0.0] * (n - 1))
                last = now
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.fail(type(exc).__name__)
        return
    if events != target.expected_events or not counter.ended_with_done:
        stats.fail(f"incomplete ({events}/{target.expected_events} events)")
        return
    stats.ok += 1
    stats.ttfts.append(ttft)
    stats.totals.append(last - sent)


async def run_closed_loop(
    target: Target, *, concurrency: int, streams: int, max_seconds: float
) -> RunStats:
    """`concurrency` workers, each starting its next stream when the last ends, until `streams`
    streams have started or `max_seconds` have passed; streams in flight then finish (each is
    bounded by its request timeout).

    Worker i starts i/concurrency of one scripted stream duration late: the fake provider is
    perfectly periodic, so workers started together would stay in lockstep for the whole run,
    every event and every new request arriving in bursts of `concurrency` at once.
    """
    stats = RunStats()
    ramp_s = target.scripted_s
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        started = time.perf_counter()
        deadline = started + max_seconds
        claimed = 0

        async def worker(i: int) -> None:
            nonlocal claimed
            await asyncio.sleep(ramp_s * i / concurrency)
            while claimed < streams and time.perf_counter() < deadline:
                claimed += 1
                await one_stream(session, target, stats)

        assert target.timeout.total is not None
        # A backstop only: the per-request timeouts already bound every stream.
        async with asyncio.timeout(max_seconds + target.timeout.total + 10):
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        stats.elapsed_s = time.perf_counter() - started
    return stats
