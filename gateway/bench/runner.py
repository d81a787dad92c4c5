"""`gateway bench`: one streaming workload sent to the fake provider directly and through
each target in front of it (nginx, the gateway, the gateway with production features), all
running as subprocesses on loopback, interleaved and repeated; prints latency percentiles,
throughput and each target process's CPU and memory cost. `--soak N` instead holds N slow
streams through one target at a time and prints what holding them costs.

The contract of `run_bench`: it always stops the subprocesses it started (also on Ctrl-C), every
run is bounded by its stream count and by `--max-seconds`, every request has a timeout, and the
exit status is 0 only if no stream failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from gateway.bench.machine import CostMeter, raise_open_file_limit
from gateway.bench.processes import (
    Layout,
    Services,
    bench_config,
    running_services,
    wait_all_ready,
)
from gateway.bench.report import BUSY_PCT, render
from gateway.bench.settings import (
    WARMUP_CONCURRENCY,
    WARMUP_STREAMS,
    BenchError,
    BenchSettings,
)
from gateway.bench.soak import SoakResult, check_open_files, render_soak, soak
from gateway.bench.summary import RunResult
from gateway.bench.workload import Target, make_target, run_closed_loop

# The fake provider accepts any key; the gateways know the sha256 of theirs (bench.yaml).
KEYS = {
    "direct": "sk-bench-direct",
    "nginx": "sk-bench-direct",  # nginx passes the client's Authorization on to the fake
    "gateway": "demo-key-not-secret",  # a caller without limits
    "gateway-prod": "bench-prod-key-not-secret",  # a caller in the limited tier
    "gateway-budget": "bench-budget-key-not-secret",  # a caller with spend budgets
    "gateway-budget-redis": "bench-budget-key-not-secret",
}
_T = TypeVar("_T")


def _progress(message: str) -> None:
    # Progress goes to stderr so stdout holds only the report (it is pasted into the README).
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _target(services: Services, name: str, chunks: int, gap_ms: int) -> Target:
    service = services.fake if name == "direct" else services.proxies[name]
    return make_target(name, service.url, KEYS[name], chunks, gap_ms)


def _charged_pid(services: Services, name: str) -> int | None:
    return None if name == "direct" else services.proxies[name].charged_pid


def _log_tail(services: Services, name: str) -> str:
    """The end of the target's output (the fake provider's for direct), for failed runs."""
    service = services.fake if name == "direct" else services.proxies[name]
    tail = service.log_tail()
    return f"the end of {service.name}'s log:\n{tail}" if tail else f"{service.name}: no log"


# --- the sweep -----------------------------------------------------------------------------


async def _measure(
    settings: BenchSettings, services: Services, target: Target, cell: tuple[int, int]
) -> RunResult:
    """One run of `target` at `cell` = (concurrency, repeat), charged to the target's process
    (none for direct)."""
    concurrency, repeat = cell
    meter = CostMeter.start(_charged_pid(services, target.name), services.fake.proc.pid)
    stats = await run_closed_loop(
        target,
        concurrency=concurrency,
        streams=settings.streams_for(concurrency),
        max_seconds=settings.max_seconds,
    )
    result = RunResult.build(target, concurrency, stats, meter.stop(), repeat)
    _progress(
        f"{result.where}: {result.streams} streams, "
        f"{result.errors} errors" + (f" ({result.error_kinds})" if result.errors else "")
    )
    if result.errors:
        _progress(_log_tail(services, target.name))
    if result.client_cpu_pct >= BUSY_PCT:
        _progress(
            f"warning: {result.where}: the client used {result.client_cpu_pct:.0f} % of a "
            "core; it may be the bottleneck of this run"
        )
    return result


async def _warm_up(settings: BenchSettings, services: Services) -> None:
    """A few streams on each target first. Raises BenchError if any fails."""
    for name in settings.targets:
        target = _target(services, name, settings.chunks, 0)
        stats = await run_closed_loop(
            target,
            concurrency=WARMUP_CONCURRENCY,
            streams=WARMUP_STREAMS,
            max_seconds=settings.max_seconds,
        )
        if stats.errors:
            raise BenchError(
                f"warm-up against {name} failed: {stats.error_kinds()}\n"
                + _log_tail(services, name)
            )
    _progress(f"warm-up done ({WARMUP_STREAMS} streams at concurrency {WARMUP_CONCURRENCY} each)")


async def _ready(settings: BenchSettings, services: Services) -> None:
    """Every service answers, and a warm-up on each target succeeded. Raises BenchError."""
    await wait_all_ready(services)
    if "nginx" in services.proxies:
        _progress(f"nginx worker pid {services.proxies['nginx'].charged_pid} (measured)")
    await _warm_up(settings, services)


async def _sweep(settings: BenchSettings, services: Services) -> list[RunResult]:
    """Every (gap, concurrency) cell, its targets interleaved within each repeat."""
    await _ready(settings, services)
    results: list[RunResult] = []
    for gap_ms in settings.gaps_ms:
        targets = [_target(services, t, settings.chunks, gap_ms) for t in settings.targets]
        for concurrency in settings.concurrency:
            for repeat in range(settings.repeats):
                for target in targets:
                    cell = (concurrency, repeat)
                    results.append(await _measure(settings, services, target, cell))
    return results


# --- the soak ------------------------------------------------------------------------------


async def _soaks(settings: BenchSettings, services: Services) -> list[SoakResult]:
    """Each target's soak in turn, after the warm-up."""
    await _ready(settings, services)
    results = []
    for name in settings.targets:
        target = _target(services, name, settings.soak_chunks, settings.soak_gap_ms)
        _progress(f"soak: {settings.soak} streams through {name}")
        pids = (_charged_pid(services, name), services.fake.proc.pid)
        result = await soak(target, settings.soak, pids, settings.max_seconds)
        _progress(
            f"soak {name}: {result.ok} streams, {result.errors} errors"
            + (f" ({result.error_kinds})" if result.errors else "")
        )
        if result.errors:
            _progress(_log_tail(services, name))
        results.append(result)
    return results


def _client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415  (optional, as in the gateway)
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    # uvloop for the client too when available: a cheaper client steals less CPU from the
    # targets and the fake provider it shares the cores with.
    with asyncio.Runner(loop_factory=_client_loop_factory()) as runner:
        return runner.run(coro)


# --- the OTLP sink (--tracing) -------------------------------------------------------------


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


@contextlib.contextmanager
def _otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint on a free loopback port, served by a thread, until the block ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the command ---------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_bench(args: argparse.Namespace) -> int:
    """`gateway bench`: start the fake provider and the targets, run the sweep (or the soak),
    print the report. Returns 0, or 1 if any stream failed or the set-up failed, 2 on bad
    arguments (a soak needing more open files than allowed included), 130 on Ctrl-C; the
    subprocesses are stopped in every case."""
    try:
        settings = BenchSettings.from_args(args)
        check_open_files(settings, raise_open_file_limit())
    except BenchError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 2
    if not bench_config().is_file():
        print(f"gateway bench: {bench_config()} not found", file=sys.stderr)
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


def _with_services(
    settings: BenchSettings,
    directory: Path,
    work: Callable[[BenchSettings, Services], Coroutine[Any, Any, _T]],
) -> _T:
    """Start the subprocesses (and the sink with --tracing), run `work`, stop them all."""
    with contextlib.ExitStack() as stack:
        otlp_endpoint = ""
        if settings.tracing:
            otlp_endpoint = stack.enter_context(_otlp_sink())
            _progress(f"tracing on: every trace exported to {otlp_endpoint}")
        layout = Layout(directory, settings.targets, otlp_endpoint, settings.peak_streams)
        services = stack.enter_context(running_services(layout))
        _progress(f"fake provider pid {services.fake.proc.pid} at {services.fake.url}")
        for name, service in services.proxies.items():
            _progress(f"{name} pid {service.proc.pid} at {service.url}")
        return _run_async(work(settings, services))


def _report(settings: BenchSettings, directory: Path) -> tuple[str, list[str]]:
    """The report, and a line for each run with failed streams."""
    if settings.soak:
        soaks = _with_services(settings, directory, _soaks)
        failed = [
            f"soak {r.target}: {r.errors} failed streams ({r.error_kinds})"
            for r in soaks
            if r.errors
        ]
        return render_soak(settings, soaks), failed
    runs = _with_services(settings, directory, _sweep)
    failed = [f"{r.where}: {r.errors} failed streams ({r.error_kinds})" for r in runs if r.errors]
    return render(settings, runs), failed


def _run_bench(settings: BenchSettings) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        try:
            report, failed = _report(settings, Path(tmp))
        except BenchError as exc:
            print(f"gateway bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("gateway bench: interrupted", file=sys.stderr)
            return 130
    print(report)
    for line in failed:
        print(f"gateway bench: {line}", file=sys.stderr)
    return 1 if failed else 0
