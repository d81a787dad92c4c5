"""The benchmark's figures and their report: each run's result, the machine and the method
described, and the table (aligned plain text or Markdown)."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import aiohttp

from gateway.bench.processes import RunCost
from gateway.bench.settings import WARMUP_CONCURRENCY, WARMUP_STREAMS, BenchSettings
from gateway.bench.workload import RunStats, Target, percentile


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
    def build(cls, target: Target, concurrency: int, stats: RunStats, cost: RunCost) -> RunResult:
        ttfts = sorted(stats.ttfts)
        gaps = sorted(stats.gaps)
        totals = sorted(stats.totals)
        attempted = stats.ok + stats.errors.total()
        before, after = cost.before, cost.after
        cpu = None
        if before is not None and after is not None and attempted:
            cpu = (after.cpu_s - before.cpu_s) * 1000 / attempted
        return cls(
            path=target.name,
            gap_ms=target.gap_ms,
            concurrency=concurrency,
            streams=stats.ok,
            errors=stats.errors.total(),
            error_kinds=stats.error_kinds(),
            streams_per_s=stats.ok / stats.elapsed_s if stats.elapsed_s > 0 else math.nan,
            ttft_p50=percentile(ttfts, 50) * 1000,
            ttft_p99=percentile(ttfts, 99) * 1000,
            gap_p50=percentile(gaps, 50) * 1000,
            gap_p99=percentile(gaps, 99) * 1000,
            stream_p50=percentile(totals, 50) * 1000,
            cpu_ms_per_stream=cpu,
            rss_mib=after.rss_mib if after else None,
            hwm_mib=after.hwm_mib if after else None,
            listen_overflows=cost.listen_overflows,
        )

    @property
    def where(self) -> str:
        """The run, as progress and error lines name it."""
        return f"gap {self.gap_ms} ms, concurrency {self.concurrency}, {self.path}"


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


def machine_description() -> list[str]:
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
        f"Machine: {cpu_model()}, {cores_text}, {platform.system()} {platform.release()}",
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


def _tracing_description(settings: BenchSettings) -> str:
    if settings.tracing:
        return (
            "Tracing: ON, every request traced (100 % sampled) and exported over OTLP/HTTP to a "
            "local sink"
        )
    return "Tracing: off (no OTLP endpoint: no-op tracer); metrics on, access log off"


# --- the table -----------------------------------------------------------------------------

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


def _row(r: RunResult, base: RunResult | None) -> list[str]:
    """The cells of one run; `base` is the direct run the +TTFT columns compare with."""
    return [
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


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    direct: dict[tuple[int, int], RunResult] = {
        (r.gap_ms, r.concurrency): r for r in results if r.path == "direct"
    }
    return [
        _row(r, direct.get((r.gap_ms, r.concurrency)) if r.path == "gateway" else None)
        for r in results
    ]


def _markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(md for md, _ in _COLUMNS) + " |",
        # Numbers right-aligned, the path column left-aligned.
        "|" + "|".join("---" if md == "path" else "---:" for md, _ in _COLUMNS) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _plain_table(rows: Sequence[Sequence[str]]) -> list[str]:
    header = [plain for _, plain in _COLUMNS]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in (header, *rows)
    ]


def render(settings: BenchSettings, results: Sequence[RunResult]) -> str:
    """The whole report: the description lines, a blank line, the table, then a note on
    dropped connections if any run had some."""
    rows = table_rows(results)
    description = [
        *machine_description(),
        *method_description(settings),
        _tracing_description(settings),
    ]
    if settings.markdown:
        lines = [f"- {line}" for line in description]
        lines += ["", *_markdown_table(rows)]
    else:
        lines = [*description, "", *_plain_table(rows)]
    lines += _overflow_note(results)
    return "\n".join(lines)


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
