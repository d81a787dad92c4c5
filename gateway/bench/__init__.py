"""The benchmarks, tools beside the product: `gateway bench` (a streaming workload sent to the
fake provider directly and through nginx and the gateway, interleaved and repeated; or, with
`--soak N`, N slow streams held at once) and `gateway bench-limiter` (what a limit check
costs, memory vs Redis); and the local servers (free ports, redis-server) that they and the
tests start. They run the gateway as a subprocess and import nothing of its request path."""

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
