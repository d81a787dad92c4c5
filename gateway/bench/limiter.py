"""`gateway bench-limiter`: what a limit check adds to a request, memory vs Redis.

Times the admission a limited streamed request goes through (rpm + tpm + a concurrent-stream
slot + a concurrent-request slot in one decision, then one settle: both slots released and the
tokens reconciled), sequentially and with concurrent callers, against the in-memory limiter and
a real redis-server on loopback (started here on a free port unless --redis-url is given).
Prints p50/p99 per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.bench.report import cpu_model
from gateway.bench.servers import RedisServer, ServerStartError, find_binary
from gateway.bench.workload import percentile
from gateway.limits.base import Limiter, LimitSpec
from gateway.limits.memory import MemoryLimiter

_SPEC = LimitSpec(
    "bench",
    requests_per_minute=10**7,
    tokens_per_minute=10**9,
    concurrent_streams=10**6,
    concurrent_requests=10**6,
)
# Per concurrent caller, before timing: the connections the measured concurrency needs are
# open and the scripts loaded, as in a server that has been up for a while.
_WARMUP_REQUESTS = 20


@dataclass(frozen=True, slots=True)
class _Row:
    """One backend at one concurrency; times in milliseconds."""

    backend: str
    concurrency: int
    admit_p50: float
    admit_p99: float
    total_p50: float
    total_p99: float
    per_s: float


async def _one(limiter: Limiter, subject: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    decision = await limiter.admit(subject, _SPEC, 1200, 120)
    t1 = time.perf_counter()
    assert decision.allowed
    await limiter.settle(decision.lease, subject, _SPEC, -800)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


async def _run(backend: str, limiter: Limiter, n: int, concurrency: int) -> _Row:
    admit: list[float] = []
    total: list[float] = []

    async def worker(w: int, queue: Iterator[int], record: bool) -> None:
        for i in queue:
            a, t = await _one(limiter, f"caller{(w + i) % 50}")
            if record:
                admit.append(a)
                total.append(t)

    warmup = iter(range(_WARMUP_REQUESTS * concurrency))
    await asyncio.gather(*[worker(w, warmup, False) for w in range(concurrency)])
    queue = iter(range(n))
    started = time.perf_counter()
    await asyncio.gather(*[worker(w, queue, True) for w in range(concurrency)])
    elapsed = time.perf_counter() - started
    admit.sort()
    total.sort()
    return _Row(
        backend,
        concurrency,
        admit_p50=percentile(admit, 50) * 1000,
        admit_p99=percentile(admit, 99) * 1000,
        total_p50=percentile(total, 50) * 1000,
        total_p99=percentile(total, 99) * 1000,
        per_s=n / elapsed,
    )


async def _bench(args: argparse.Namespace, url: str) -> int:
    """Both backends at each concurrency, then the report. 1 if Redis failed to decide."""
    from gateway.limits.redis import RedisLimiter  # noqa: PLC0415

    rows: list[_Row] = []
    for concurrency in args.concurrency:
        rows.append(await _run("memory", MemoryLimiter(), args.requests, concurrency))
        redis = RedisLimiter(url, socket_timeout_s=1.0, prefix="bench")
        try:
            rows.append(await _run("redis", redis, args.requests, concurrency))
            if redis.degraded_decisions:
                print(f"bench-limiter: {redis.degraded_decisions} decisions without Redis")
                return 1
        finally:
            await redis.close()
    _print_report(args.requests, rows)
    return 0


def _print_report(requests: int, rows: Sequence[_Row]) -> None:
    print(
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores; redis-server on loopback; "
        f"{requests} requests per row"
    )
    print(
        "- admit = one decision (rpm + tpm + stream and request slots); request = admit + "
        "settle (slots released and tokens reconciled in one call; what a limited stream adds "
        "in all). Times in ms."
    )
    print()
    print(
        "| backend | concurrency | admit p50 | admit p99 | request p50 | request p99 | requests/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.backend} | {r.concurrency} | {r.admit_p50:.3f} | {r.admit_p99:.3f} | "
            f"{r.total_p50:.3f} | {r.total_p99:.3f} | {r.per_s:.0f} |"
        )


def run_bench_limiter(args: argparse.Namespace) -> int:
    """`gateway bench-limiter`: 0, 1 if Redis failed (to start, or to decide), 2 without a
    redis-server binary (and no --redis-url). A redis-server started here is always stopped."""
    if args.redis_url is not None:
        return asyncio.run(_bench(args, args.redis_url))
    binary = find_binary("redis-server")
    if binary is None:
        print("bench-limiter: redis-server not found (or pass --redis-url)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(binary, Path(tmp))
        try:
            server.start()
            return asyncio.run(_bench(args, server.url))
        except ServerStartError as exc:
            print(f"bench-limiter: {exc}")
            return 1
        finally:
            server.stop()
