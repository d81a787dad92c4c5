"""`gateway bench`: one streaming workload sent directly to the fake provider and through the
gateway, both running as subprocesses on loopback; prints latency percentiles, throughput and
the gateway process's CPU and memory cost.

The contract of `run_bench`: it always stops the subprocesses it started (also on Ctrl-C), every
run is bounded by its stream count and by `--max-seconds`, every request has a timeout, and the
exit status is 0 only if no stream failed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import importlib.util
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "config" / "demo.yaml"
CALLER_KEY = "demo-key-not-secret"  # its sha256 is in config/demo.yaml
MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"

WARMUP_STREAMS = 20
WARMUP_CONCURRENCY = 5
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# Per-request bounds: a stalled stream becomes an error instead of hanging its run.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
_DONE_MARKER = b"data: [DONE]\n\n"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class BenchError(Exception):
    """The benchmark cannot run (bad arguments, a subprocess that does not come up)."""


# --- settings ------------------------------------------------------------------------------


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


# --- statistics ----------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process's counters from /proc."""

    cpu_s: float
    rss_mib: float
    hwm_mib: float


def sample_process(pid: int) -> ProcSample | None:
    """utime+stime, VmRSS and VmHWM of `pid`; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    kib = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kib[key] = int(value.split()[0])
    return ProcSample(
        cpu_s=ticks / os.sysconf("SC_CLK_TCK"),
        rss_mib=kib.get("VmRSS", 0) / 1024,
        hwm_mib=kib.get("VmHWM", 0) / 1024,
    )


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (system-wide
    TcpExt ListenOverflows); None where /proc/net/netstat is not available."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    # Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: value1 value2 ...".
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


@dataclass(frozen=True, slots=True)
class RunResult:
    """The figures of one run, in milliseconds unless named otherwise."""

    path: str  # "direct" or "gateway"
    gap_ms: int
    concurrency: int
    streams: int
    errors: int
    error_kinds: str
    streams_per_s: float
    ttft_p50: float
    ttft_p99: float
    gap_p50: float
    gap_p99: float
    stream_p50: float
    cpu_ms_per_stream: float | None = None
    rss_mib: float | None = None
    hwm_mib: float | None = None
    listen_overflows: int | None = None

    @classmethod
    def build(
        cls,
        path: str,
        gap_ms: int,
        concurrency: int,
        stats: RunStats,
        before: ProcSample | None = None,
        after: ProcSample | None = None,
        listen_overflows: int | None = None,
    ) -> RunResult:
        ttfts = sorted(stats.ttfts)
        gaps = sorted(stats.gaps)
        totals = sorted(stats.totals)
        attempted = stats.ok + stats.errors.total()
        cpu = None
        if before is not None and after is not None and attempted:
            cpu = (after.cpu_s - before.cpu_s) * 1000 / attempted
        return cls(
            path=path,
            gap_ms=gap_ms,
            concurrency=concurrency,
            streams=stats.ok,
            errors=stats.errors.total(),
            error_kinds=", ".join(f"{n} x {why}" for why, n in stats.errors.most_common()),
            streams_per_s=stats.ok / stats.elapsed_s if stats.elapsed_s > 0 else math.nan,
            ttft_p50=percentile(ttfts, 50) * 1000,
            ttft_p99=percentile(ttfts, 99) * 1000,
            gap_p50=percentile(gaps, 50) * 1000,
            gap_p99=percentile(gaps, 99) * 1000,
            stream_p50=percentile(totals, 50) * 1000,
            cpu_ms_per_stream=cpu,
            rss_mib=after.rss_mib if after else None,
            hwm_mib=after.hwm_mib if after else None,
            listen_overflows=listen_overflows,
        )


# --- the client ----------------------------------------------------------------------------


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
    """Where one run's requests go, with everything encoded once."""

    name: str
    url: str
    headers: Mapping[str, str]
    body: bytes


def make_target(name: str, base_url: str, key: str, chunks: int, gap_ms: int) -> Target:
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
    return Target(name, base_url + CHAT_PATH, headers, body)


def request_timeout(chunks: int, gap_ms: int) -> aiohttp.ClientTimeout:
    # Generous against the scripted duration (role + chunks + finish + [DONE] events).
    scripted_s = (chunks + 3) * gap_ms / 1000
    return aiohttp.ClientTimeout(
        total=30 + 3 * scripted_s, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )


async def one_stream(
    session: aiohttp.ClientSession,
    target: Target,
    expected_events: int,
    limits: aiohttp.ClientTimeout,
    stats: RunStats,
) -> None:
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
            target.url, data=target.body, headers=target.headers, timeout=limits
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
    if events != expected_events or not counter.ended_with_done:
        stats.fail(f"incomplete ({events}/{expected_events} events)")
        return
    stats.ok += 1
    stats.ttfts.append(ttft)
    stats.totals.append(last - sent)


async def run_closed_loop(
    target: Target,
    *,
    concurrency: int,
    streams: int,
    max_seconds: float,
    chunks: int,
    gap_ms: int,
) -> RunStats:
    """`concurrency` workers, each starting its next stream when the last ends, until `streams`
    streams have started or `max_seconds` have passed; streams in flight then finish (each is
    bounded by its request timeout).

    Worker i starts i/concurrency of one scripted stream duration late: the fake provider is
    perfectly periodic, so workers started together would stay in lockstep for the whole run,
    every event and every new request arriving in bursts of `concurrency` at once.
    """
    stats = RunStats()
    ramp_s = (chunks + 2) * gap_ms / 1000  # the scripted gaps of one stream
    expected_events = chunks + 3  # role chunk, content chunks, finish chunk, [DONE]
    limits = request_timeout(chunks, gap_ms)
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
                await one_stream(session, target, expected_events, limits, stats)

        assert limits.total is not None
        # A backstop only: the per-request timeouts already bound every stream.
        async with asyncio.timeout(max_seconds + limits.total + 10):
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        stats.elapsed_s = time.perf_counter() - started
    return stats


# --- the subprocesses ----------------------------------------------------------------------


@dataclass(slots=True)
class Service:
    """A subprocess this benchmark started, with the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all bound at once, so they cannot repeat)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str]) -> Service:
    with log.open("wb") as out:
        # A new session: Ctrl-C reaches only the benchmark, which then stops these in order.
        proc = subprocess.Popen(  # noqa: S603  (our own interpreter and module, no shell)
            [sys.executable, "-m", "gateway", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(env),
            start_new_session=True,
        )
    return Service(name, proc, log)


def stop(service: Service) -> None:
    proc = service.proc
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _expand(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    if isinstance(value, str) and "${" in value:

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise BenchError(f"{DEMO_CONFIG}: ${{{name}}} is not set and has no default")

        return _ENV_REF.sub(sub, value)
    return value


def bench_config(source: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The demo config with `${...}` resolved against `env` and quiet logging: one access-log
    line per stream would cost the gateway CPU the benchmark would then charge to it."""
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise BenchError(f"{source}: the top level is not a mapping")
    config: dict[str, Any] = _expand(data, env)
    telemetry = dict(config.get("telemetry") or {})
    telemetry.update(access_log=False, log_format="json", log_level="warning")
    config["telemetry"] = telemetry
    return config


async def wait_ready(
    session: aiohttp.ClientSession, service: Service, url: str, deadline: float
) -> None:
    """Poll `url` until it answers 200. Raises BenchError if the process exits or time runs
    out, with the end of its output."""
    while True:
        code = service.proc.poll()
        if code is not None:
            raise BenchError(f"{service.name} exited with status {code}:\n{service.log_tail()}")
        try:
            async with session.get(
                url,
                headers={"Authorization": "Bearer bench"},
                timeout=aiohttp.ClientTimeout(total=1),
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{service.name} did not answer GET {url} within {READY_TIMEOUT_S:g} s:\n"
                f"{service.log_tail()}"
            )
        await asyncio.sleep(0.1)


# --- the benchmark -------------------------------------------------------------------------


def _progress(message: str) -> None:
    # Progress goes to stderr so stdout holds only the report (it is pasted into the README).
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def _measure(
    target: Target,
    settings: BenchSettings,
    concurrency: int,
    gap_ms: int,
    gateway_pid: int | None,
) -> RunResult:
    """One run; `gateway_pid` is the process whose cost it charges (None for direct runs)."""
    overflows = listen_overflows()
    before = sample_process(gateway_pid) if gateway_pid is not None else None
    stats = await run_closed_loop(
        target,
        concurrency=concurrency,
        streams=settings.streams_for(concurrency),
        max_seconds=settings.max_seconds,
        chunks=settings.chunks,
        gap_ms=gap_ms,
    )
    after = sample_process(gateway_pid) if gateway_pid is not None else None
    overflows_after = listen_overflows()
    dropped = (
        overflows_after - overflows
        if overflows is not None and overflows_after is not None
        else None
    )
    result = RunResult.build(target.name, gap_ms, concurrency, stats, before, after, dropped)
    _progress(
        f"gap {gap_ms} ms, concurrency {concurrency}, {result.path}: {result.streams} streams, "
        f"{result.errors} errors" + (f" ({result.error_kinds})" if result.errors else "")
    )
    return result


async def _bench(
    settings: BenchSettings, fake: Service, fake_url: str, gateway: Service, gateway_url: str
) -> list[RunResult]:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + READY_TIMEOUT_S
        await wait_ready(session, fake, f"{fake_url}/v1/models", deadline)
        await wait_ready(session, gateway, f"{gateway_url}/healthz", deadline)

    def targets(gap_ms: int) -> tuple[Target, Target]:
        return (
            make_target("direct", fake_url, "sk-bench-direct", settings.chunks, gap_ms),
            make_target("gateway", gateway_url, CALLER_KEY, settings.chunks, gap_ms),
        )

    for target in targets(0):
        stats = await run_closed_loop(
            target,
            concurrency=WARMUP_CONCURRENCY,
            streams=WARMUP_STREAMS,
            max_seconds=settings.max_seconds,
            chunks=settings.chunks,
            gap_ms=0,
        )
        if stats.errors:
            kinds = ", ".join(f"{n} x {why}" for why, n in stats.errors.most_common())
            log = gateway.log_tail() if target.name == "gateway" else fake.log_tail()
            raise BenchError(f"warm-up against {target.name} failed: {kinds}\n{log}")
    _progress(f"warm-up done ({WARMUP_STREAMS} streams at concurrency {WARMUP_CONCURRENCY} each)")

    results: list[RunResult] = []
    for gap_ms in settings.gaps_ms:
        direct, through = targets(gap_ms)
        for concurrency in settings.concurrency:
            results.append(await _measure(direct, settings, concurrency, gap_ms, None))
            results.append(await _measure(through, settings, concurrency, gap_ms, gateway.proc.pid))
    return results


def _client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415  (optional, as in the gateway)
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_async(coro: Coroutine[Any, Any, list[RunResult]]) -> list[RunResult]:
    # uvloop for the client too when available: a cheaper client steals less CPU from the
    # gateway and the fake provider it shares the cores with.
    with asyncio.Runner(loop_factory=_client_loop_factory()) as runner:
        return runner.run(coro)


# --- the report ----------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> list[str]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        model = platform.processor() or model
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    uvloop = _package_version("uvloop") if importlib.util.find_spec("uvloop") else None
    loop = (
        f"uvloop {uvloop} (gateway, fake provider and client)"
        if uvloop
        else "asyncio default loop (uvloop not installed)"
    )
    cores_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    return [
        f"Machine: {model}, {cores_text}, {platform.system()} {platform.release()}",
        f"Software: Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}",
    ]


def method_description(settings: BenchSettings) -> list[str]:
    streams = (
        f"{settings.streams} streams" if settings.streams else "max(200, 4 x concurrency) streams"
    )
    return [
        f"Workload: OpenAI chat completion streams of {settings.chunks} content chunks from the "
        "built-in fake provider (`gateway fake-provider`), upstream gap between events as in the "
        "table; the client, the gateway and the fake provider are three processes on one machine.",
        f"Each run: a closed loop of `concurrency` clients, each starting its next stream when "
        f"the last ends, until {streams} or {settings.max_seconds:g} s (streams in flight then "
        "finish), the workers' starts spread over one scripted stream duration (the fake is "
        "periodic: started together, they would stay in lockstep); the same run direct to the "
        "fake provider, then through the gateway; streams/s = streams / run time, ramp "
        "included. A warm-up "
        f"of {WARMUP_STREAMS} streams at concurrency {WARMUP_CONCURRENCY} precedes all runs.",
        "TTFT: request sent -> first content event (the 2nd SSE event) received in full; it "
        "includes one upstream gap, as the fake sends the role chunk first. "
        "Chunk gap: time between consecutive events after it, as the client reads them "
        "(events arriving in one read count as gap 0). Stream: request sent -> last event.",
        "Percentiles: exact, nearest rank over all samples of a run (an observed value; with "
        "fewer than 100 samples p99 is the maximum). Times in ms. +TTFT = gateway - direct.",
        "Gateway cost: utime+stime of the gateway process over the run per stream "
        "(/proc/PID/stat, clock-tick resolution), VmRSS after the run, peak = VmHWM since start.",
    ]


_COLUMNS = (
    # (markdown header, plain-text header)
    ("upstream gap", "gap_ms"),
    ("concurrency", "conc"),
    ("path", "path"),
    ("streams", "streams"),
    ("streams/s", "streams/s"),
    ("TTFT p50", "ttft_p50"),
    ("TTFT p99", "ttft_p99"),
    ("+TTFT p50", "+ttft_p50"),
    ("+TTFT p99", "+ttft_p99"),
    ("gap p50", "gap_p50"),
    ("gap p99", "gap_p99"),
    ("stream p50", "stream_p50"),
    ("errors", "errors"),
    ("CPU ms/stream", "cpu_ms/stream"),
    ("RSS MiB", "rss_mib"),
    ("peak RSS MiB", "peak_rss_mib"),
)


def _num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    direct: dict[tuple[int, int], RunResult] = {
        (r.gap_ms, r.concurrency): r for r in results if r.path == "direct"
    }
    rows = []
    for r in results:
        base = direct.get((r.gap_ms, r.concurrency)) if r.path == "gateway" else None
        rows.append(
            [
                str(r.gap_ms),
                str(r.concurrency),
                r.path,
                str(r.streams),
                _num(r.streams_per_s, 1),
                _num(r.ttft_p50, 3),
                _num(r.ttft_p99, 3),
                _num(r.ttft_p50 - base.ttft_p50, 3, sign=True) if base else "-",
                _num(r.ttft_p99 - base.ttft_p99, 3, sign=True) if base else "-",
                _num(r.gap_p50, 3),
                _num(r.gap_p99, 3),
                _num(r.stream_p50, 1),
                str(r.errors),
                _num(r.cpu_ms_per_stream, 2),
                _num(r.rss_mib, 1),
                _num(r.hwm_mib, 1),
            ]
        )
    return rows


def render(settings: BenchSettings, results: Sequence[RunResult]) -> str:
    rows = table_rows(results)
    lines: list[str] = []
    tracing = (
        "Tracing: ON, every request traced (100 % sampled) and exported over OTLP/HTTP to a "
        "local sink"
        if settings.tracing
        else "Tracing: off (no OTLP endpoint: no-op tracer); metrics on, access log off"
    )
    if settings.markdown:
        lines += [
            f"- {line}" for line in [*machine_description(), *method_description(settings), tracing]
        ]
        lines.append("")
        lines.append("| " + " | ".join(md for md, _ in _COLUMNS) + " |")
        # Numbers right-aligned, the path column left-aligned.
        lines.append("|" + "|".join("---" if md == "path" else "---:" for md, _ in _COLUMNS) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        lines += [*machine_description(), *method_description(settings), tracing]
        lines.append("")
        header = [plain for _, plain in _COLUMNS]
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    lines += _overflow_note(results)
    return "\n".join(lines)


def _overflow_note(results: Sequence[RunResult]) -> list[str]:
    dropped = [r for r in results if r.listen_overflows]
    if not dropped:
        return []
    runs = "; ".join(
        f"gap {r.gap_ms} ms, concurrency {r.concurrency}, {r.path}: {r.listen_overflows}"
        for r in dropped
    )
    return [
        "",
        "Connections dropped by a full listen queue during a run (kernel TcpExt ListenOverflows, "
        f"system-wide): {runs}. A dropped SYN is retried after about 1 s, which shows as a "
        "TTFT near 1,000 ms (the client opens a run's connections as its workers start).",
    ]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_bench(args: argparse.Namespace) -> int:
    """`gateway bench`: start the fake provider and the gateway, run the sweep, print the
    report. Returns 0, or 1 if any stream failed or the set-up failed, 2 on bad arguments,
    130 on Ctrl-C; the subprocesses are stopped in every case."""
    try:
        settings = BenchSettings.from_args(args)
    except BenchError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 2
    if not DEMO_CONFIG.exists():
        print(f"gateway bench: {DEMO_CONFIG} not found", file=sys.stderr)
        return 2
    # SIGTERM (a CI job cancelled, `timeout`) unwinds like Ctrl-C, so that the `finally` below
    # still stops the subprocesses instead of leaving them running.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return _run_bench(settings)
    finally:
        if previous is not None:  # None: not ours to set, or installed outside Python
            signal.signal(signal.SIGTERM, previous)


class _Sink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them (the collector's cost is not the gateway's)."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def start_otlp_sink() -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True).start()
    return server


def _run_bench(settings: BenchSettings) -> int:
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        try:
            fake_port, gateway_port = free_ports(2)
            fake_url = f"http://127.0.0.1:{fake_port}"
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            env = {
                **os.environ,
                "FAKE_PROVIDER_URL": fake_url,
                "GATEWAY_PORT": str(gateway_port),
            }
            config = bench_config(DEMO_CONFIG, env)
            if settings.tracing:
                sink = start_otlp_sink()
                config["telemetry"].update(
                    otlp_endpoint=f"http://127.0.0.1:{sink.server_address[1]}", sample_ratio=1.0
                )
                _progress(
                    f"tracing on: every trace exported to {config['telemetry']['otlp_endpoint']}"
                )
            config_path = Path(tmp) / "bench.yaml"
            config_path.write_text(yaml.safe_dump(config))
            services.append(
                spawn(
                    "fake provider",
                    ["fake-provider", "--host", "127.0.0.1", "--port", str(fake_port)],
                    Path(tmp) / "fake.log",
                    env,
                )
            )
            services.append(
                spawn(
                    "gateway",
                    ["serve", "--config", str(config_path), "--port", str(gateway_port)],
                    Path(tmp) / "gateway.log",
                    env,
                )
            )
            fake, gateway = services
            _progress(f"fake provider pid {fake.proc.pid} at {fake_url}")
            _progress(f"gateway pid {gateway.proc.pid} at {gateway_url}")
            results = _run_async(_bench(settings, fake, fake_url, gateway, gateway_url))
        except BenchError as exc:
            print(f"gateway bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("gateway bench: interrupted", file=sys.stderr)
            return 130
        finally:
            for service in reversed(services):
                stop(service)
    print(render(settings, results))
    failed = [r for r in results if r.errors]
    if failed:
        for r in failed:
            print(
                f"gateway bench: gap {r.gap_ms} ms, concurrency {r.concurrency}, {r.path}: "
                f"{r.errors} failed streams ({r.error_kinds})",
                file=sys.stderr,
            )
        return 1
    return 0


__all__ = ["BenchSettings", "EventCounter", "percentile", "run_bench"]
