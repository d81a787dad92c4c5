"""`gateway bench --soak N`: N slow streams held through one target at once, ramped up over a
few seconds, and what holding them costs the target: memory per stream, open files, CPU
against the fake provider's. The client is kept cheap: one session, N connections, nothing
done per chunk but counting events."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp

from gateway.bench.machine import client_cpu_seconds, cpu_seconds, open_fds, rss_mib
from gateway.bench.report import machine_description, markdown_table, num, plain_table
from gateway.bench.settings import BenchError, BenchSettings
from gateway.bench.workload import EventCounter, RunStats, Target

SAMPLE_INTERVAL_S = 0.25
MAX_RAMP_S = 5.0
# New streams a second at most during the ramp: each costs the target an accept, a request and
# an upstream connection; thousands a second would measure connection storms, not holding.
RAMP_RATE = 500.0
SETTLE_S = 0.5  # after the last stream, before the "after" reading
# File descriptors a process needs beside its streams' sockets (listeners, logs, epoll...).
SPARE_FDS = 64


def check_open_files(settings: BenchSettings, limit: int) -> None:
    """Raises BenchError when a soak needs more open files than `limit` allows: each stream
    holds a client socket (here) and, through a proxy, an accepted and an upstream socket."""
    if not settings.soak:
        return
    per_stream = 2 if any(t != "direct" for t in settings.targets) else 1
    need = per_stream * settings.soak + SPARE_FDS
    if need > limit:
        most = (limit - SPARE_FDS) // per_stream
        raise BenchError(
            f"--soak {settings.soak} needs about {need} open files in one process (a client "
            f"and an upstream socket per stream through a proxy), but the limit is {limit} "
            f"(ulimit -Hn): soak at most {most} streams, or raise the hard limit"
        )


@dataclass(slots=True)
class _Held:
    """What the client and the sampler see as the soak runs; mutated by their coroutines."""

    stats: RunStats = field(default_factory=RunStats)
    open_now: int = 0
    open_most: int = 0
    rss_peak: float | None = None
    fds_peak: int | None = None

    def sample(self, pid: int | None) -> None:
        if pid is None:
            return
        rss, fds = rss_mib(pid), open_fds(pid)
        if rss is not None:
            self.rss_peak = max(rss, self.rss_peak or 0.0)
        if fds is not None:
            self.fds_peak = max(fds, self.fds_peak or 0)


@dataclass(frozen=True, slots=True)
class SoakResult:
    """One target's soak: streams asked, held and failed; the target process's memory, files
    and CPU (None for the direct target); the fake provider's and the client's CPU."""

    target: str
    asked: int
    ok: int
    errors: int
    error_kinds: str
    held_most: int
    elapsed_s: float
    rss_idle: float | None
    rss_peak: float | None
    rss_after: float | None
    fds_peak: int | None
    fds_after: int | None
    target_cpu_s: float | None
    upstream_cpu_s: float | None
    client_cpu_s: float

    @property
    def kib_per_stream(self) -> float | None:
        if self.rss_peak is None or self.rss_idle is None or not self.asked:
            return None
        return (self.rss_peak - self.rss_idle) * 1024 / self.asked


async def _stream(
    session: aiohttp.ClientSession, target: Target, delay_s: float, held: _Held
) -> None:
    """One slow stream, started `delay_s` late; only its events are counted."""
    await asyncio.sleep(delay_s)
    stats = held.stats
    counter = EventCounter()
    events = 0
    try:
        async with session.post(
            target.url, data=target.body, headers=target.headers, timeout=target.timeout
        ) as resp:
            if resp.status != 200:
                await resp.read()
                stats.fail(f"HTTP {resp.status}")
                return
            held.open_now += 1
            held.open_most = max(held.open_most, held.open_now)
            try:
                async for piece in resp.content.iter_any():
                    events += counter.feed(piece)
            finally:
                held.open_now -= 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.fail(type(exc).__name__)
        return
    if events != target.expected_events or not counter.ended_with_done:
        stats.fail(f"incomplete ({events}/{target.expected_events} events)")
        return
    stats.ok += 1


async def _sampler(pid: int | None, held: _Held, done: asyncio.Event) -> None:
    while not done.is_set():
        held.sample(pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), SAMPLE_INTERVAL_S)


async def _hold(target: Target, n: int, pid: int | None, bound_s: float) -> _Held:
    """`n` streams of `target`, started over the ramp, while the sampler reads `pid`; streams
    still open after `bound_s` are cancelled and counted as failed."""
    held = _Held()
    ramp_s = min(max(MAX_RAMP_S, n / RAMP_RATE), target.scripted_s / 2)
    connector = aiohttp.TCPConnector(limit=n, limit_per_host=0)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
        asyncio.TaskGroup() as group,
    ):
        done = asyncio.Event()
        group.create_task(_sampler(pid, held, done), name="soak-sampler")
        try:
            async with asyncio.timeout(ramp_s + bound_s):
                await asyncio.gather(
                    *(_stream(session, target, ramp_s * i / n, held) for i in range(n))
                )
        except TimeoutError:
            unfinished = n - held.stats.ok - held.stats.errors.total()
            held.stats.errors["cancelled at the time bound"] += unfinished
        finally:
            done.set()
    return held


async def soak(
    target: Target, n: int, pids: tuple[int | None, int], max_seconds: float
) -> SoakResult:
    """Hold `n` streams of `target` at once. `pids`: the target process (None for direct)
    and the fake provider. Bounded by the scripted duration + `max_seconds`."""
    pid, upstream = pids
    idle = rss_mib(pid) if pid is not None else None
    before = (
        cpu_seconds(pid) if pid is not None else None,
        cpu_seconds(upstream),
        client_cpu_seconds(),
    )
    started = asyncio.get_running_loop().time()
    held = await _hold(target, n, pid, target.scripted_s + max_seconds)
    elapsed = asyncio.get_running_loop().time() - started
    await asyncio.sleep(SETTLE_S)
    after = (
        cpu_seconds(pid) if pid is not None else None,
        cpu_seconds(upstream),
        client_cpu_seconds(),
    )
    return SoakResult(
        target=target.name,
        asked=n,
        ok=held.stats.ok,
        errors=held.stats.errors.total(),
        error_kinds=held.stats.error_kinds(),
        held_most=held.open_most,
        elapsed_s=elapsed,
        rss_idle=idle,
        rss_peak=held.rss_peak,
        rss_after=rss_mib(pid) if pid is not None else None,
        fds_peak=held.fds_peak,
        fds_after=open_fds(pid) if pid is not None else None,
        target_cpu_s=_minus(after[0], before[0]),
        upstream_cpu_s=_minus(after[1], before[1]),
        client_cpu_s=after[2] - before[2],
    )


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


# --- the report ----------------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("target", "target"),
    ("streams", "streams"),
    ("errors", "errors"),
    ("held at once", "held"),
    ("duration s", "secs"),
    ("RSS idle MiB", "rss_idle"),
    ("RSS peak MiB", "rss_peak"),
    ("RSS after MiB", "rss_after"),
    ("KiB/stream", "kib/stream"),
    ("fds at peak", "fds_peak"),
    ("fds after", "fds_after"),
    ("target CPU s", "target_cpu_s"),
    ("fake CPU s", "fake_cpu_s"),
    ("target/fake CPU", "target/fake"),
    ("client CPU s", "client_cpu_s"),
)


def _row(r: SoakResult) -> list[str]:
    ratio = r.target_cpu_s / r.upstream_cpu_s if r.target_cpu_s and r.upstream_cpu_s else None
    return [
        r.target,
        str(r.asked),
        str(r.errors),
        str(r.held_most),
        num(r.elapsed_s, 1),
        num(r.rss_idle, 1),
        num(r.rss_peak, 1),
        num(r.rss_after, 1),
        num(r.kib_per_stream, 1),
        str(r.fds_peak) if r.fds_peak is not None else "-",
        str(r.fds_after) if r.fds_after is not None else "-",
        num(r.target_cpu_s, 2),
        num(r.upstream_cpu_s, 2),
        num(ratio, 2),
        num(r.client_cpu_s, 2),
    ]


def soak_description(settings: BenchSettings) -> list[str]:
    n = settings.soak
    return [
        *machine_description(settings.targets),
        f"Soak: {n} OpenAI chat completion streams of {settings.soak_chunks} content chunks "
        f"{settings.soak_gap_ms} ms apart from the fake provider, held through one target at "
        f"once (targets one after another: {', '.join(settings.targets)}), their starts spread "
        f"over min(max({MAX_RAMP_S:g} s, N / {RAMP_RATE:g} a second), half a stream); one "
        f"client session with {n} connections, "
        "counting events only.",
        "Target process (nginx: its worker): VmRSS before the soak (idle, after a warm-up), "
        f"its peak (sampled every {SAMPLE_INTERVAL_S:g} s), and {SETTLE_S:g} s after the "
        "client closed its connections (memory freed stays mostly with the allocator; idle "
        "upstream keep-alive connections stay open); KiB/stream = (peak - idle) / streams; "
        "fds = /proc/PID/fd entries, the most sampled and after; CPU s = its threads' run time "
        "over the soak (/proc/PID/task/*/schedstat), the fake provider's and the client "
        "thread's beside it. Held at once: the most streams the client had open together.",
    ]


def render_soak(settings: BenchSettings, results: list[SoakResult]) -> str:
    """The soak's report: its description, a blank line, one table row per target."""
    rows = [_row(r) for r in results]
    if settings.markdown:
        lines = [f"- {line}" for line in soak_description(settings)]
        lines += ["", *markdown_table([md for md, _ in _COLUMNS], rows, left=0)]
    else:
        lines = [*soak_description(settings), "", *plain_table([p for _, p in _COLUMNS], rows)]
    return "\n".join(lines)
