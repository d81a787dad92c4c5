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
import contextlib
import http.server
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from gateway.bench.processes import (
    READY_TIMEOUT_S,
    CostMeter,
    Service,
    bench_config,
    running_services,
    wait_ready,
)
from gateway.bench.report import RunResult, render
from gateway.bench.settings import (
    WARMUP_CONCURRENCY,
    WARMUP_STREAMS,
    BenchError,
    BenchSettings,
)
from gateway.bench.workload import Target, make_target, run_closed_loop

CALLER_KEY = "demo-key-not-secret"  # its sha256 is in bench.yaml
DIRECT_KEY = "sk-bench-direct"  # the fake provider accepts any key


def _progress(message: str) -> None:
    # Progress goes to stderr so stdout holds only the report (it is pasted into the README).
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the sweep -----------------------------------------------------------------------------


async def _measure(
    target: Target, settings: BenchSettings, concurrency: int, gateway_pid: int | None
) -> RunResult:
    """One run; `gateway_pid` is the process whose cost it charges (None for direct runs)."""
    meter = CostMeter.start(gateway_pid)
    stats = await run_closed_loop(
        target,
        concurrency=concurrency,
        streams=settings.streams_for(concurrency),
        max_seconds=settings.max_seconds,
    )
    result = RunResult.build(target, concurrency, stats, meter.stop())
    _progress(
        f"{result.where}: {result.streams} streams, "
        f"{result.errors} errors" + (f" ({result.error_kinds})" if result.errors else "")
    )
    return result


def _targets(
    settings: BenchSettings, fake: Service, gateway: Service, gap_ms: int
) -> tuple[Target, Target]:
    return (
        make_target("direct", fake.url, DIRECT_KEY, settings.chunks, gap_ms),
        make_target("gateway", gateway.url, CALLER_KEY, settings.chunks, gap_ms),
    )


async def _warm_up(settings: BenchSettings, fake: Service, gateway: Service) -> None:
    """A few streams on each path first. Raises BenchError if any fails."""
    for target, service in zip(_targets(settings, fake, gateway, 0), (fake, gateway), strict=True):
        stats = await run_closed_loop(
            target,
            concurrency=WARMUP_CONCURRENCY,
            streams=WARMUP_STREAMS,
            max_seconds=settings.max_seconds,
        )
        if stats.errors:
            raise BenchError(
                f"warm-up against {target.name} failed: {stats.error_kinds()}\n{service.log_tail()}"
            )
    _progress(f"warm-up done ({WARMUP_STREAMS} streams at concurrency {WARMUP_CONCURRENCY} each)")


async def _bench(settings: BenchSettings, fake: Service, gateway: Service) -> list[RunResult]:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + READY_TIMEOUT_S
        await wait_ready(session, fake, "/v1/models", deadline)
        await wait_ready(session, gateway, "/healthz", deadline)
    await _warm_up(settings, fake, gateway)
    results: list[RunResult] = []
    for gap_ms in settings.gaps_ms:
        direct, through = _targets(settings, fake, gateway, gap_ms)
        for concurrency in settings.concurrency:
            results.append(await _measure(direct, settings, concurrency, None))
            results.append(await _measure(through, settings, concurrency, gateway.proc.pid))
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
    """`gateway bench`: start the fake provider and the gateway, run the sweep, print the
    report. Returns 0, or 1 if any stream failed or the set-up failed, 2 on bad arguments,
    130 on Ctrl-C; the subprocesses are stopped in every case."""
    try:
        settings = BenchSettings.from_args(args)
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


def _sweep(settings: BenchSettings, directory: Path) -> list[RunResult]:
    """Start the subprocesses (and the sink with --tracing), run the sweep, stop them all."""
    with contextlib.ExitStack() as stack:
        otlp_endpoint = ""
        if settings.tracing:
            otlp_endpoint = stack.enter_context(_otlp_sink())
            _progress(f"tracing on: every trace exported to {otlp_endpoint}")
        fake, gateway = stack.enter_context(running_services(directory, otlp_endpoint))
        _progress(f"fake provider pid {fake.proc.pid} at {fake.url}")
        _progress(f"gateway pid {gateway.proc.pid} at {gateway.url}")
        return _run_async(_bench(settings, fake, gateway))


def _run_bench(settings: BenchSettings) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        try:
            results = _sweep(settings, Path(tmp))
        except BenchError as exc:
            print(f"gateway bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("gateway bench: interrupted", file=sys.stderr)
            return 130
    print(render(settings, results))
    failed = [r for r in results if r.errors]
    for r in failed:
        print(
            f"gateway bench: {r.where}: {r.errors} failed streams ({r.error_kinds})",
            file=sys.stderr,
        )
    return 1 if failed else 0
