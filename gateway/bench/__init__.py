"""The benchmarks, tools beside the product: `gateway bench` (a streaming workload, direct to
the fake provider vs through the gateway) and `gateway bench-limiter` (what a limit check
costs, memory vs Redis); and the local servers (free ports, redis-server) that they and the
tests start."""

from __future__ import annotations

from gateway.bench.limiter import run_bench_limiter
from gateway.bench.runner import run_bench
from gateway.bench.settings import BenchError, BenchSettings
from gateway.bench.workload import EventCounter, percentile

__all__ = [
    "BenchError",
    "BenchSettings",
    "EventCounter",
    "percentile",
    "run_bench",
    "run_bench_limiter",
]
