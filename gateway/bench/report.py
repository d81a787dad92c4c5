"""The benchmark's report: the machine and the method described, the sweep's table (aligned
plain text or Markdown) and its notes (the client as the bottleneck, dropped connections)."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import aiohttp

from gateway.bench.servers import find_binary
from gateway.bench.settings import WARMUP_CONCURRENCY, WARMUP_STREAMS, BenchSettings
from gateway.bench.summary import RunResult, Stat, Summary, summarise

# A client (or fake provider) event loop this busy may be what limits a run, not the target.
BUSY_PCT = 90.0


# --- the machine and the method ------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; without /proc, what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        return platform.processor() or "unknown CPU"
    return "unknown CPU"


def nginx_version() -> str | None:
    """ "nginx/1.22.1" as `nginx -v` says it; None without nginx."""
    binary = find_binary("nginx")
    if binary is None:
        return None
    try:
        proc = subprocess.run(  # noqa: S603  (a server binary, no shell)
            [binary, "-v"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stderr.strip().rpartition(": ")[2] or None


def machine_description(targets: Sequence[str] = ()) -> list[str]:
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
    nginx = nginx_version() if "nginx" in targets else None
    cores_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    return [
        f"Machine: {cpu_model()}, {cores_text}, {platform.system()} {platform.release()}",
        f"Software: Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}"
        + (f", {nginx}" if nginx else ""),
    ]


_TARGET_TEXT = {
    "direct": "direct = the fake provider itself (the floor)",
    "nginx": (
        "nginx = nginx in front of the fake with deploy/nginx/gateway.conf's proxy settings "
        "(proxy_buffering off, HTTP/1.1 to an upstream keep-alive pool of 64, empty Connection "
        "header, gzip off, long timeouts), worker_processes 1, access log off"
    ),
    "gateway": "gateway = `gateway serve` on bench.yaml: no limits, access log off",
    "gateway-prod": (
        "gateway-prod = a second `gateway serve` with production features: a tier with every "
        "limit set (in-memory limiter, limits too high to deny) and the JSON access log on "
        "(stderr to a file); its token limit makes the gateway ask upstream for the usage "
        "chunk and strip it from the client's stream, so the fake sends one event more (one "
        "upstream gap more before [DONE])"
    ),
    "gateway-budget": (
        "gateway-budget = `gateway serve` on bench.yaml, access log off, a caller whose tier has "
        "only spend budgets (tokens and cost, per day and month, too high to run out), kept in "
        "memory: every read is decoded and each content event parsed and charged before it is "
        "written, and the gateway asks upstream for the usage chunk (one event more)"
    ),
    "gateway-budget-redis": (
        "gateway-budget-redis = the same with the budgets in a redis-server on loopback (one "
        "charge in flight per stream, pipelined per loop turn)"
    ),
}


def _targets_description(settings: BenchSettings) -> str:
    return "Targets: " + "; ".join(_TARGET_TEXT[t] for t in settings.targets) + "."


def _runs_description(settings: BenchSettings) -> str:
    streams = (
        f"{settings.streams} streams" if settings.streams else "max(200, 4 x concurrency) streams"
    )
    repeats = (
        f"{settings.repeats} times; figures are medians over the repeats, (min-max) beside "
        "the key ones"
        if settings.repeats > 1
        else "once"
    )
    return (
        f"Each run: a closed loop of `concurrency` clients, each starting its next stream when "
        f"the last ends, until {streams} or {settings.max_seconds:g} s (streams in flight then "
        "finish), the workers' starts spread over one scripted stream duration (the fake is "
        "periodic: started together, they would stay in lockstep); streams/s = streams / run "
        "time, ramp included. For each (gap, concurrency) the targets run interleaved, "
        f"{' -> '.join(settings.targets)}, {repeats}. A warm-up of {WARMUP_STREAMS} streams at "
        f"concurrency {WARMUP_CONCURRENCY} on each target precedes all runs."
    )


def method_description(settings: BenchSettings) -> list[str]:
    return [
        f"Workload: OpenAI chat completion streams of {settings.chunks} content chunks from the "
        "built-in fake provider (`gateway fake-provider`), upstream gap between events as in the "
        "table; the client, the fake provider and each target are separate processes on one "
        "machine.",
        _targets_description(settings),
        _runs_description(settings),
        "TTFT: request sent -> first content event (the 2nd SSE event) received in full; it "
        "includes one upstream gap, as the fake sends the role chunk first. "
        "Chunk gap: time between consecutive events after it, as the client reads them "
        "(events arriving in one read count as gap 0). Stream: request sent -> last event.",
        "Percentiles: exact, nearest rank over all samples of a run (an observed value; with "
        "fewer than 100 samples p99 is the maximum). Times in ms. +TTFT = target - direct and "
        "'vs nginx' = target / nginx, each within one repeat (then the median).",
        "Target cost: CPU time of the target's process (nginx: its one worker) over the run "
        "per stream (its threads' run time in /proc/PID/task/*/schedstat, in ns), VmRSS after "
        "the run, peak = VmHWM since start. Client CPU %: the client's event-loop thread "
        "(getrusage) over the run time; fake CPU %: the fake provider's. Near 100 %, that "
        "process, not the target, may be what limits the run.",
    ]


def _tracing_description(settings: BenchSettings) -> str:
    if settings.tracing:
        return (
            "Tracing: ON, every request traced (100 % sampled) by both gateways and exported "
            "over OTLP/HTTP to a local sink"
        )
    return "Tracing: off (no OTLP endpoint: a no-op tracer); metrics on"


def description(settings: BenchSettings) -> list[str]:
    """The lines above a table: the machine, the method, tracing."""
    return [
        *machine_description(settings.targets),
        *method_description(settings),
        _tracing_description(settings),
    ]


# --- the table -----------------------------------------------------------------------------


def num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    """`value` with `digits` decimals ("-" when there is none)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


@dataclass(frozen=True, slots=True)
class Column:
    """A figure of the table: its headers, its value, and whether its spread is shown."""

    markdown: str
    plain: str
    value: Callable[[Summary], Stat]
    digits: int = 2
    sign: bool = False
    spread: bool = False

    def cell(self, s: Summary) -> str:
        return num(self.value(s).median, self.digits, self.sign)

    def range_cell(self, s: Summary) -> str:
        stat = self.value(s)
        if stat.low is None or stat.high is None:
            return "-"
        return f"{num(stat.low, self.digits)}-{num(stat.high, self.digits)}"


_FIGURES = (
    Column("streams", "streams", lambda s: s.streams, 0),
    Column("streams/s", "streams/s", lambda s: s.streams_per_s, 1, spread=True),
    Column("streams/s vs nginx", "sps_vs_nginx", lambda s: s.streams_per_s_vs_nginx),
    Column("TTFT p50", "ttft_p50", lambda s: s.ttft_p50, 3, spread=True),
    Column("TTFT p99", "ttft_p99", lambda s: s.ttft_p99, 3, spread=True),
    Column("+TTFT p50", "+ttft_p50", lambda s: s.added_ttft_p50, 3, sign=True),
    Column("+TTFT p99", "+ttft_p99", lambda s: s.added_ttft_p99, 3, sign=True),
    Column("gap p50", "gap_p50", lambda s: s.gap_p50, 3),
    Column("gap p99", "gap_p99", lambda s: s.gap_p99, 3),
    Column("stream p50", "stream_p50", lambda s: s.stream_p50, 1),
    Column("CPU ms/stream", "cpu_ms/stream", lambda s: s.cpu_ms_per_stream, 2, spread=True),
    Column("CPU vs nginx", "cpu_vs_nginx", lambda s: s.cpu_vs_nginx),
    Column("RSS MiB", "rss_mib", lambda s: s.rss_mib, 1),
    Column("peak RSS MiB", "peak_rss_mib", lambda s: s.hwm_mib, 1),
    Column("client CPU %", "client_cpu%", lambda s: s.client_cpu_pct, 0),
    Column("fake CPU %", "fake_cpu%", lambda s: s.upstream_cpu_pct, 0),
)
_KEYS = (
    ("upstream gap", "gap_ms"),
    ("concurrency", "conc"),
    ("target", "target"),
    ("errors", "errors"),  # over all repeats
)


def _keys(s: Summary) -> list[str]:
    return [str(s.gap_ms), str(s.concurrency), s.target, str(s.errors)]


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0
) -> list[str]:
    """A Markdown table, its column `left` left-aligned and the others (numbers) right."""
    align = ["---" if i == left else "---:" for i in range(len(header))]
    return [f"| {' | '.join(row)} |" for row in (header, align, *rows)]


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """An aligned text table; cells are separated by at least two spaces."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in (header, *rows)
    ]


def _sweep_markdown(summaries: Sequence[Summary], spread: bool) -> list[str]:
    header = [md for md, _ in _KEYS] + [c.markdown for c in _FIGURES]
    rows = [_keys(s) + [_markdown_cell(c, s, spread) for c in _FIGURES] for s in summaries]
    return markdown_table(header, rows, left=2)


def _markdown_cell(column: Column, s: Summary, spread: bool) -> str:
    """The median, and its range in parentheses beside the key figures."""
    text = column.cell(s)
    if spread and column.spread and column.value(s).median is not None:
        text += f" ({column.range_cell(s)})"
    return text


def _sweep_plain(summaries: Sequence[Summary], spread: bool) -> list[str]:
    header = [plain for _, plain in _KEYS]
    for c in _FIGURES:
        header += [c.plain, f"{c.plain}_range"] if spread and c.spread else [c.plain]
    rows = []
    for s in summaries:
        row = _keys(s)
        for c in _FIGURES:
            row += [c.cell(s), c.range_cell(s)] if spread and c.spread else [c.cell(s)]
        rows.append(row)
    return plain_table(header, rows)


def render(settings: BenchSettings, results: Sequence[RunResult]) -> str:
    """The whole report: the description lines, a blank line, the table, then its notes."""
    summaries = summarise(results)
    spread = settings.repeats > 1
    if settings.markdown:
        lines = [f"- {line}" for line in description(settings)]
        lines += ["", *_sweep_markdown(summaries, spread)]
    else:
        lines = [*description(settings), "", *_sweep_plain(summaries, spread)]
    lines += busy_note(results) + _overflow_note(results)
    return "\n".join(lines)


def busy_runs(results: Sequence[RunResult]) -> list[str]:
    """The runs whose client (or fake provider) was busy for BUSY_PCT of a core or more."""
    busy = []
    for r in results:
        who = [
            f"{name} {pct:.0f} %"
            for name, pct in (("client", r.client_cpu_pct), ("fake", r.upstream_cpu_pct))
            if pct is not None and pct >= BUSY_PCT
        ]
        if who:
            busy.append(f"{r.where} ({', '.join(who)})")
    return busy


def busy_note(results: Sequence[RunResult]) -> list[str]:
    busy = busy_runs(results)
    if not busy:
        return []
    return [
        "",
        f"Runs where the client or the fake provider used {BUSY_PCT:.0f} % of a core or more "
        "(that process, not the target, may have limited streams/s and TTFT there): "
        + "; ".join(busy)
        + ".",
    ]


def _overflow_note(results: Sequence[RunResult]) -> list[str]:
    dropped = [r for r in results if r.listen_overflows]
    if not dropped:
        return []
    runs = "; ".join(f"{r.where}: {r.listen_overflows}" for r in dropped)
    return [
        "",
        "Connections dropped by a full listen queue during a run (kernel TcpExt ListenOverflows, "
        f"system-wide): {runs}. A dropped SYN is retried after about 1 s, which shows as a "
        "TTFT near 1,000 ms (the client opens a run's connections as its workers start).",
    ]
