"""`gateway bench-limiter`: what a limit check adds to a request, memory vs Redis.

Times the admission a limited streamed request goes through (rpm + tpm + a concurrent-stream
slot + a concurrent-request slot in one decision, then the release of both slots and a token
reconciliation), sequentially and with concurrent callers, against the in-memory limiter and a
real redis-server on loopback (started here on a free port unless --redis-url is given).
Prints p50/p99 per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.limits.base import Limiter, LimitSpec
from gateway.limits.memory import MemoryLimiter

_SPEC = LimitSpec(
    "bench",
    requests_per_minute=10**7,
    tokens_per_minute=10**9,
    concurrent_streams=10**6,
    concurrent_requests=10**6,
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _one(limiter: Limiter, subject: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    decision = await limiter.admit(subject, _SPEC, 1200, 120)
    t1 = time.perf_counter()
    assert decision.allowed
    if decision.lease is not None:
        await limiter.release(decision.lease)
    await limiter.reconcile(subject, _SPEC, -800)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


async def _run(limiter: Limiter, n: int, concurrency: int) -> dict[str, float]:
    admit: list[float] = []
    total: list[float] = []
    for i in range(50):  # warm-up (connections, script load)
        await _one(limiter, f"warm{i % 5}")
    queue = iter(range(n))

    async def worker(w: int) -> None:
        for i in queue:
            a, t = await _one(limiter, f"caller{(w + i) % 50}")
            admit.append(a)
            total.append(t)

    started = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    elapsed = time.perf_counter() - started
    return {
        "admit_p50": _pct(admit, 50) * 1000,
        "admit_p99": _pct(admit, 99) * 1000,
        "total_p50": _pct(total, 50) * 1000,
        "total_p99": _pct(total, 99) * 1000,
        "per_s": n / elapsed,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _bench(args: argparse.Namespace) -> int:
    from gateway.limits.redis import RedisLimiter  # noqa: PLC0415

    rows: list[tuple[str, int, dict[str, float]]] = []
    proc: subprocess.Popen[bytes] | None = None
    url = args.redis_url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            if not os.access(binary, os.X_OK):
                print("bench-limiter: redis-server not found (or pass --redis-url)")
                return 2
            port = _free_port()
            proc = subprocess.Popen(  # noqa: ASYNC220, S603  (a fixed binary, started once)
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"redis://127.0.0.1:{port}/0"
            await asyncio.sleep(0.3)
        try:
            for concurrency in args.concurrency:
                memory = MemoryLimiter()
                rows.append(("memory", concurrency, await _run(memory, args.requests, concurrency)))
                redis = RedisLimiter(url, socket_timeout_s=1.0, prefix="bench")
                try:
                    rows.append(
                        ("redis", concurrency, await _run(redis, args.requests, concurrency))
                    )
                    if redis.degraded_decisions:
                        print(f"bench-limiter: {redis.degraded_decisions} decisions without Redis")
                        return 1
                finally:
                    await redis.close()
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    cpu = _cpu_model()
    print(
        f"- Machine: {cpu}, {os.cpu_count()} cores; redis-server on loopback; "
        f"{args.requests} requests per row"
    )
    print(
        "- admit = one decision (rpm + tpm + stream and request slots); request = admit + "
        "slots release + token reconciliation (what a limited stream adds in all). Times in ms."
    )
    print()
    print(
        "| backend | concurrency | admit p50 | admit p99 | request p50 | request p99 | requests/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, conc, r in rows:
        print(
            f"| {name} | {conc} | {r['admit_p50']:.3f} | {r['admit_p99']:.3f} | "
            f"{r['total_p50']:.3f} | {r['total_p99']:.3f} | {r['per_s']:.0f} |"
        )
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run_bench_limiter(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(args))
