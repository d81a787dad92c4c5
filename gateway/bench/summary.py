"""The figures of one run, and the repeats of each (gap, concurrency, target) summarised:
medians with their min-max spread, and each target compared with the direct and nginx runs
of the same repeat."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.bench.machine import RunCost
from gateway.bench.workload import RunStats, Target, percentile


@dataclass(frozen=True, slots=True)
class RunResult:
    """The figures of one run, in milliseconds unless named otherwise."""

    target: str
    repeat: int  # 0-based
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
    client_cpu_pct: float
    upstream_cpu_pct: float | None = None
    cpu_ms_per_stream: float | None = None
    rss_mib: float | None = None
    hwm_mib: float | None = None
    listen_overflows: int | None = None

    @classmethod
    def build(
        cls, target: Target, concurrency: int, stats: RunStats, cost: RunCost, repeat: int = 0
    ) -> RunResult:
        ttfts, gaps, totals = sorted(stats.ttfts), sorted(stats.gaps), sorted(stats.totals)
        attempted = stats.ok + stats.errors.total()
        before, after = cost.before, cost.after
        cpu = None
        if before is not None and after is not None and attempted:
            cpu = (after.cpu_s - before.cpu_s) * 1000 / attempted
        wall = cost.wall_s or math.nan
        upstream = cost.upstream_cpu_s
        return cls(
            target=target.name,
            repeat=repeat,
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
            client_cpu_pct=cost.client_cpu_s / wall * 100,
            upstream_cpu_pct=upstream / wall * 100 if upstream is not None else None,
            cpu_ms_per_stream=cpu,
            rss_mib=after.rss_mib if after else None,
            hwm_mib=after.hwm_mib if after else None,
            listen_overflows=cost.listen_overflows,
        )

    @property
    def where(self) -> str:
        """The run, as progress and error lines name it."""
        return (
            f"gap {self.gap_ms} ms, concurrency {self.concurrency}, {self.target}, "
            f"repeat {self.repeat + 1}"
        )


@dataclass(frozen=True, slots=True)
class Stat:
    """A figure over the repeats: the median and the range; None where no run had it."""

    median: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        known = sorted(v for v in values if v is not None and not math.isnan(v))
        if not known:
            return cls(None, None, None)
        return cls(statistics.median(known), known[0], known[-1])


@dataclass(frozen=True, slots=True)
class Summary:
    """One (gap, concurrency, target) over its repeats. `added_*` are target - direct and
    `*_vs_nginx` target / nginx, each within one repeat, then the median over the repeats."""

    gap_ms: int
    concurrency: int
    target: str
    runs: int
    errors: int
    streams: Stat
    streams_per_s: Stat
    ttft_p50: Stat
    ttft_p99: Stat
    added_ttft_p50: Stat
    added_ttft_p99: Stat
    gap_p50: Stat
    gap_p99: Stat
    stream_p50: Stat
    cpu_ms_per_stream: Stat
    streams_per_s_vs_nginx: Stat
    cpu_vs_nginx: Stat
    rss_mib: Stat
    hwm_mib: Stat
    client_cpu_pct: Stat
    upstream_cpu_pct: Stat


Repeat = dict[str, RunResult]  # one repeat of one cell, by target


def summarise(results: Sequence[RunResult]) -> list[Summary]:
    """Each (gap, concurrency) cell in the order it ran, its targets in their order."""
    cells: dict[tuple[int, int], dict[int, Repeat]] = {}
    for r in results:
        cells.setdefault((r.gap_ms, r.concurrency), {}).setdefault(r.repeat, {})[r.target] = r
    summaries = []
    for repeats in cells.values():
        targets = dict.fromkeys(t for runs in repeats.values() for t in runs)
        summaries += [_summary(t, list(repeats.values())) for t in targets]
    return summaries


def _paired(
    repeats: Sequence[Repeat],
    target: str,
    base: str,
    how: Callable[[RunResult, RunResult], float | None],
) -> Stat:
    if target == base:
        return Stat(None, None, None)
    return Stat.of(how(rep[target], rep[base]) for rep in repeats if target in rep and base in rep)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(target: str, repeats: Sequence[Repeat]) -> Summary:
    runs = [rep[target] for rep in repeats if target in rep]

    def stat(figure: Callable[[RunResult], float | None]) -> Stat:
        return Stat.of(figure(r) for r in runs)

    return Summary(
        gap_ms=runs[0].gap_ms,
        concurrency=runs[0].concurrency,
        target=target,
        runs=len(runs),
        errors=sum(r.errors for r in runs),
        streams=stat(lambda r: r.streams),
        streams_per_s=stat(lambda r: r.streams_per_s),
        ttft_p50=stat(lambda r: r.ttft_p50),
        ttft_p99=stat(lambda r: r.ttft_p99),
        added_ttft_p50=_paired(repeats, target, "direct", lambda r, d: r.ttft_p50 - d.ttft_p50),
        added_ttft_p99=_paired(repeats, target, "direct", lambda r, d: r.ttft_p99 - d.ttft_p99),
        gap_p50=stat(lambda r: r.gap_p50),
        gap_p99=stat(lambda r: r.gap_p99),
        stream_p50=stat(lambda r: r.stream_p50),
        cpu_ms_per_stream=stat(lambda r: r.cpu_ms_per_stream),
        streams_per_s_vs_nginx=_paired(
            repeats, target, "nginx", lambda r, n: _ratio(r.streams_per_s, n.streams_per_s)
        ),
        cpu_vs_nginx=_paired(
            repeats, target, "nginx", lambda r, n: _ratio(r.cpu_ms_per_stream, n.cpu_ms_per_stream)
        ),
        rss_mib=stat(lambda r: r.rss_mib),
        hwm_mib=stat(lambda r: r.hwm_mib),
        client_cpu_pct=stat(lambda r: r.client_cpu_pct),
        upstream_cpu_pct=stat(lambda r: r.upstream_cpu_pct),
    )
