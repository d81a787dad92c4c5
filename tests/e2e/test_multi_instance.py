"""Two gateway processes sharing one real redis-server: a caller's limits hold across instances
(exact counts, not "roughly"), and a Redis outage neither hangs requests nor loses the shared
limits for good.

Each test starts its own redis-server (the `redis_server` fixture) and two `python -m gateway
serve` processes on the same YAML (ports given with `--port`), both in front of the in-process
fake provider. Counts are read from three places that cannot disagree by accident: the HTTP
answers, the fake provider's records and the gateways' access-log lines (written after the
request's limits were settled, so they also say when a stream slot was released).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import pytest
import yaml
from multidict import CIMultiDictProxy

from tests.support import (
    CALLER_KEY,
    OTHER_CALLER_KEY,
    Fake,
    RedisServer,
    base_config,
    deep_merge,
    free_port,
    sha,
)

ROOT = Path(__file__).parents[2]
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.server


# -- two gateway processes ------------------------------------------------------------------


@dataclass
class Instance:
    """One `gateway serve` process and its combined stdout/stderr log."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access(self, caller: str) -> list[dict[str, Any]]:
        """The access-log lines of `caller` (one per request, written once it was settled)."""
        lines = []
        for line in self.log_text().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if (
                isinstance(entry, dict)
                and entry.get("event") == "request"
                and entry.get("caller") == caller
            ):
                lines.append(entry)
        return lines


Launch = Callable[[dict[str, Any]], Awaitable[tuple[Instance, Instance]]]


def _state(redis: RedisServer, **overrides: Any) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis_url": redis.url,
        "on_redis_error": "fail_open",
        "instances": 2,
        "socket_timeout_s": 0.25,
        "retry_redis_after_s": 1,
        **overrides,
    }


def _callers(tiers: dict[str, dict[str, int]]) -> dict[str, Any]:
    """`test-app` (CALLER_KEY) on tier `t`; `fresh-app` (OTHER_CALLER_KEY) on tier `fresh`
    when that tier is given."""
    keys = [{"id": "test-app", "sha256": sha(CALLER_KEY), "tier": "t"}]
    if "fresh" in tiers:
        keys.append({"id": "fresh-app", "sha256": sha(OTHER_CALLER_KEY), "tier": "fresh"})
    return {"tiers": tiers, "auth": {"api_keys": keys}}


async def _wait_healthy(inst: Instance) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(inst.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert inst.proc.poll() is None, f"gateway {inst.name} exited:\n{inst.log_text()}"
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway {inst.name} never answered /healthz:\n{inst.log_text()}")


@pytest.fixture
async def two_gateways(
    fake: Fake, redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Launch]:
    """Start two gateway processes on one YAML (base config + `extra`, Redis state unless
    `extra` says otherwise); kill them at the end and print their logs if the test failed."""
    started: list[Instance] = []

    async def launch(extra: dict[str, Any]) -> tuple[Instance, Instance]:
        config = deep_merge(base_config(fake.url), {"state": _state(redis_server)})
        config = deep_merge(config, extra)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        pair = []
        for name in ("a", "b"):
            port = free_port()
            log_path = tmp_path / f"gateway-{name}.log"
            log_file = log_path.open("wb")
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
            proc = subprocess.Popen(
                [*argv, "--port", str(port)],
                cwd=ROOT,
                stdout=log_file,
                stderr=log_file,
            )
            inst = Instance(name, f"http://127.0.0.1:{port}", proc, log_path, log_file)
            started.append(inst)
            pair.append(inst)
        await asyncio.gather(*(_wait_healthy(inst) for inst in pair))
        return pair[0], pair[1]

    failed_before = request.session.testsfailed
    try:
        yield launch
    finally:
        for inst in started:
            if inst.proc.poll() is None:
                inst.proc.kill()
            inst.proc.wait()
            inst.log_file.close()
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            for inst in started:
                text = inst.log_text()[-20_000:]
                if reporter is not None:
                    reporter.write_sep("-", f"gateway {inst.name} log ({request.node.name})")
                    reporter.write_line(text)
                else:
                    print(f"--- gateway {inst.name} log ---\n{text}", file=sys.__stderr__)


async def wait_access_lines(instances: Sequence[Instance], caller: str, count: int) -> None:
    """Until `count` requests of `caller` were logged (i.e. settled) across `instances`."""
    deadline = time.monotonic() + 10
    while sum(len(i.access(caller)) for i in instances) < count:
        assert time.monotonic() < deadline, "the gateways did not log every request"
        await asyncio.sleep(0.02)


# -- the client side ------------------------------------------------------------------------


@dataclass
class Reply:
    instance: str
    status: int  # 0: no answer (connection error or the client's own timeout)
    headers: CIMultiDictProxy[str] | None
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:  # short enough for an assertion message
        return (
            f"Reply({self.instance}, {self.status}, {self.elapsed * 1000:.0f} ms, "
            f"{self.body[:300]!r})"
        )


def chat_body(**extra: Any) -> bytes:
    return orjson.dumps({"model": "gpt-test", "messages": MESSAGES, **extra})


async def post(
    session: aiohttp.ClientSession,
    inst: Instance,
    body: bytes,
    *,
    key: str = CALLER_KEY,
    headers: dict[str, str] | None = None,
    timeout: float = 10,  # the client's own bound: a hang shows up as status 0
) -> Reply:
    started = time.monotonic()
    try:
        async with session.post(
            inst.url + CHAT,
            data=body,
            headers={
                "authorization": f"Bearer {key}",
                "content-type": "application/json",
                **(headers or {}),
            },
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            data = await resp.read()
            return Reply(inst.name, resp.status, resp.headers, data, time.monotonic() - started)
    except (aiohttp.ClientError, TimeoutError):
        return Reply(inst.name, 0, None, b"", time.monotonic() - started)


async def warm(session: aiohttp.ClientSession, instances: Sequence[Instance], n: int) -> None:
    """Open `n` keep-alive connections to each instance, so a burst does not pay for connects."""

    async def ping(inst: Instance) -> None:
        async with session.get(inst.url + "/healthz") as resp:
            await resp.read()

    await asyncio.gather(*(ping(inst) for inst in instances for _ in range(n)))


def assert_rate_limited(reply: Reply, denied_by: str) -> None:
    """A 429 in the OpenAI error format with consistent retry-after / retry-after-ms."""
    assert reply.status == 429, reply
    assert reply.headers is not None
    error = reply.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_exceeded"
    expected = {
        "rpm": "requests per minute",
        "tpm": "tokens per minute",
        "concurrency": "concurrent streams",
    }
    assert expected[denied_by] in error["message"]
    seconds = int(reply.headers["retry-after"])
    millis = int(reply.headers["retry-after-ms"])
    assert 1 <= seconds <= 60
    assert millis > 0
    assert seconds == max(1, math.ceil(millis / 1000))
    assert f'"{denied_by}";q=' in reply.headers["RateLimit-Policy"]
    assert "RateLimit" in reply.headers


def remaining(reply: Reply, name: str) -> int:
    """`r` of the `name` item of the RateLimit header."""
    assert reply.headers is not None
    match = re.search(rf'"{name}";r=(\d+);t=(\d+)', reply.headers.get("RateLimit", ""))
    assert match is not None, reply.headers
    return int(match.group(1))


# -- 1. requests per minute -----------------------------------------------------------------


async def test_rpm_is_exact_across_two_instances(two_gateways: Launch, fake: Fake) -> None:
    a, b = await two_gateways(_callers({"t": {"requests_per_minute": 60}}))
    # GCRA at 60 rpm: a burst of 60, then one more per second after the first admission. A
    # burst decided within one second therefore admits exactly 60, whichever instance decides.
    # Two memory limiters would admit 120; a racy read-modify-write more than 60.
    total, concurrency = 150, 30
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=2 * concurrency)
    ) as session:
        await warm(session, (a, b), concurrency // 2)

        async def one(i: int) -> Reply:
            async with gate:
                return await post(session, (a, b)[i % 2], chat_body())

        started = time.monotonic()
        replies = await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.monotonic() - started
    print(f"\nrpm burst: {total} requests, {concurrency} at a time, in {elapsed:.3f} s")
    # The exact count below presumes every decision fell within 1 s of the first admission.
    assert elapsed < 1.0, f"burst took {elapsed:.3f} s: too slow for an exact GCRA count"

    ok = [r for r in replies if r.status == 200]
    denied = [r for r in replies if r.status != 200]
    assert len(ok) == 60, f"{len(ok)} admitted in {elapsed:.3f} s"
    assert {r.instance for r in ok} == {"a", "b"}
    assert len(fake.provider.records) == 60
    # Each admission saw its own remaining budget: 59, 58, ..., 0, each exactly once (the
    # Lua script is atomic; no two instances spent the same unit).
    assert sorted(remaining(r, "rpm") for r in ok) == list(range(60))
    for r in ok:
        assert r.headers is not None
        assert r.headers["RateLimit-Policy"] == '"rpm";q=60;w=60'
    for r in denied:
        assert_rate_limited(r, "rpm")
        assert r.headers is not None
        # The next unit comes back one interval (1 s) after the first admission.
        assert int(r.headers["retry-after-ms"]) <= 1000
        assert r.headers["RateLimit"].startswith('"rpm";r=0;')
    assert {r.instance for r in denied} == {"a", "b"}


# -- 2. concurrent streams ------------------------------------------------------------------


async def test_concurrent_streams_are_shared_and_released(two_gateways: Launch, fake: Fake) -> None:
    a, b = await two_gateways(_callers({"t": {"concurrent_streams": 5}}))
    slow = {"x-fake-chunks": "10", "x-fake-gap-ms": "100"}  # about 1.1 s per stream
    body = chat_body(stream=True)
    async with aiohttp.ClientSession() as session:
        await warm(session, (a, b), 6)
        replies = await asyncio.gather(
            *(post(session, (a, b)[i % 2], body, headers=slow) for i in range(12))
        )
        ok = [r for r in replies if r.status == 200]
        assert len(ok) == 5, [r.status for r in replies]  # two memory limiters would allow 10
        for r in ok:
            assert r.body.endswith(b"data: [DONE]\n\n")
            assert r.body.count(b"\n\n") == 1 + 10 + 1 + 1  # role, content, finish, [DONE]
            assert remaining(r, "concurrency") in range(5)
        for r in replies:
            if r.status != 200:
                assert_rate_limited(r, "concurrency")
        assert fake.provider.max_open_streams == 5
        assert len(fake.provider.records) == 5

        # A slot is released before the request's access-log line is written: once all 12 are
        # logged, every slot is free again, on whichever instance held it.
        await wait_access_lines((a, b), "test-app", 12)
        fake.provider.reset()
        again = await asyncio.gather(
            *(
                post(
                    session,
                    (a, b)[i % 2],
                    body,
                    headers={"x-fake-chunks": "3", "x-fake-gap-ms": "100"},
                )
                for i in range(5)
            )
        )
    assert [r.status for r in again] == [200] * 5
    assert all(r.body.endswith(b"data: [DONE]\n\n") for r in again)
    assert fake.provider.max_open_streams == 5  # they really were open at the same time


# -- 3. tokens per minute -------------------------------------------------------------------


async def test_token_budget_is_shared_and_reconciled(two_gateways: Launch, fake: Fake) -> None:
    tpm = 2500
    a, b = await two_gateways(_callers({"t": {"tokens_per_minute": tpm}}))
    chunks = 5
    body = chat_body(max_tokens=1000)
    # The gateway reserves ceil(len(body) / 4) + min(max_tokens, max_tokens_cap=1000).
    reserve = math.ceil(len(body) / 4) + 1000
    # The fake reports prompt ceil(len("hi") / 4) = 1 plus one output token per chunk.
    actual = 1 + chunks
    # Two reservations fit, a third does not: 2 * R <= 2500 < 3 * R.
    assert 2 * reserve <= tpm < 3 * reserve, reserve
    interval_ms = 60_000 / tpm  # one token comes back every 24 ms
    async with aiohttp.ClientSession() as session:
        await warm(session, (a, b), 3)
        # Phase 1: six at once across both instances; the fake holds each answer 300 ms, so
        # all six are decided while the first two reservations are still outstanding.
        held = {"x-fake-chunks": str(chunks), "x-fake-headers-delay-ms": "300"}
        burst = await asyncio.gather(
            *(post(session, (a, b)[i % 2], body, headers=held) for i in range(6))
        )
        ok = [r for r in burst if r.status == 200]
        assert len(ok) == 2, [r.status for r in burst]  # one budget: not 2 per instance
        # The first admission leaves 2500 - R; the second 2500 - 2R (plus what came back in
        # the few ms between them, at one token per 24 ms).
        left = sorted((remaining(r, "tpm") for r in ok), reverse=True)
        assert left[0] == tpm - reserve
        assert tpm - 2 * reserve <= left[1] <= tpm - 2 * reserve + 2
        for r in ok:
            assert r.json()["usage"]["total_tokens"] == actual
        for r in burst:
            if r.status != 200:
                assert_rate_limited(r, "tpm")
                assert r.headers is not None
                # A third R fits once 3R - 2500 tokens came back, less the time since the
                # first admission (well under a second here).
                wait_ms = (3 * reserve - tpm) * interval_ms
                assert wait_ms - 1000 <= int(r.headers["retry-after-ms"]) <= wait_ms + 1

        # Phase 2: each of the two used `actual` tokens and was refunded R - actual. Without the
        # refunds the budget would hold no third reservation for (3R - 2500) * 24 ms ~ 13 s;
        # with them, ten more in a row (alternating instances) all fit, each seeing the budget
        # nearly whole: remaining = 2500 - R - (tokens still charged), and tokens still
        # charged are at most `actual` for each request that finished before it.
        for k in range(10):
            r = await post(session, (a, b)[k % 2], body, headers={"x-fake-chunks": str(chunks)})
            assert r.status == 200, (k, r)
            assert r.json()["usage"]["total_tokens"] == actual
            charged = (2 + k) * actual
            assert tpm - reserve - charged - 1 <= remaining(r, "tpm") <= tpm - reserve, k
    # 12 upstream requests within a few seconds; the reservations alone would allow 2.
    assert len(fake.provider.records) == 12
    logged = a.access("test-app") + b.access("test-app")
    refunds = [e["reconciled_tokens"] for e in logged if "reconciled_tokens" in e]
    assert refunds == [actual - reserve] * 12


# -- 4. Redis outage ------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_redis_outage_fails_open_then_limits_are_shared_again(
    two_gateways: Launch, fake: Fake, redis_server: RedisServer
) -> None:
    a, b = await two_gateways(
        _callers({"t": {"requests_per_minute": 40}, "fresh": {"requests_per_minute": 10}})
    )
    total, pace_s, kill_at = 200, 0.01, 70
    results: list[Reply] = []
    async with aiohttp.ClientSession() as session:
        await warm(session, (a, b), 4)

        async def one(i: int) -> None:
            results.append(await post(session, (a, b)[i % 2], chat_body(), timeout=5))

        # Open loop: one request every 10 ms for 2 s, alternating instances; redis-server is
        # killed (SIGKILL) after the 70th was sent, about 0.7 s in.
        start = time.monotonic()
        tasks = []
        killed_after = 0.0
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i * pace_s - time.monotonic()))
            if i == kill_at:
                await asyncio.to_thread(redis_server.stop)
                killed_after = time.monotonic() - start
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        load_end = time.monotonic()
        slowest = max(r.elapsed for r in results)
        print(
            f"\noutage load: {total} requests in {load_end - start:.2f} s, redis killed at "
            f"{killed_after:.2f} s, slowest answer {slowest * 1000:.0f} ms"
        )

        # Every request was answered, none waited on the dead Redis.
        assert sorted({r.status for r in results}) == [200, 429]
        assert slowest < 1.0
        for r in results:
            if r.status == 429:
                assert_rate_limited(r, "rpm")
        for inst in (a, b):
            assert "redis unavailable" in inst.log_text(), inst.name
        await wait_access_lines((a, b), "test-app", total)
        shared = sum(1 for i in (a, b) for e in i.access("test-app") if e.get("limiter") == "ok")
        # Before the kill (< 1.5 s, one rpm-40 interval, after the first admission) Redis
        # admitted the whole burst of 40 and not one more.
        assert killed_after < 1.5
        assert shared == 40
        # During the outage each instance enforced its share, 40 / 2 instances = 20, locally:
        # a burst of 20 and then one per 3 s (the outage lasted about 1.3 s).
        for inst in (a, b):
            degraded = [e for e in inst.access("test-app") if e.get("limiter") == "degraded"]
            assert len(degraded) == 20, inst.name
            assert all(e["status"] == 200 for e in degraded)
        assert len(fake.provider.records) == 40 + 2 * 20

        # Redis comes back (empty, and without the Lua scripts loaded). Once
        # retry_redis_after_s passed since the last failure, both instances use it again.
        await asyncio.to_thread(redis_server.start)
        await asyncio.sleep(max(0.0, load_end + 1.2 - time.monotonic()))
        # A fresh caller with 10 rpm: instance a alone admits all 10 (a local limiter would
        # stop at 10 / 2 = 5), and then instance b admits none of the same caller's requests.
        on_a = [await post(session, a, chat_body(), key=OTHER_CALLER_KEY) for _ in range(15)]
        on_b = [await post(session, b, chat_body(), key=OTHER_CALLER_KEY) for _ in range(15)]
    assert [r.status for r in on_a] == [200] * 10 + [429] * 5
    assert [r.status for r in on_b] == [429] * 15
    for r in on_a + on_b:
        if r.status == 429:
            assert_rate_limited(r, "rpm")
    await wait_access_lines((a, b), "fresh-app", 30)
    limiter_states = {e.get("limiter") for i in (a, b) for e in i.access("fresh-app")}
    assert limiter_states == {"ok", "denied_rpm"}  # decided by Redis: nothing degraded


@pytest.mark.timeout(120)
async def test_redis_outage_fails_closed_quickly(
    two_gateways: Launch, fake: Fake, redis_server: RedisServer
) -> None:
    a, b = await two_gateways(
        {
            **_callers({"t": {"requests_per_minute": 1000}}),
            "state": _state(redis_server, on_redis_error="fail_closed"),
        }
    )
    assert redis_server.proc is not None

    async def round_of(session: aiohttp.ClientSession, n: int) -> list[Reply]:
        return await asyncio.gather(
            *(post(session, (a, b)[i % 2], chat_body(), timeout=5) for i in range(n))
        )

    def assert_refused(replies: list[Reply]) -> None:
        for r in replies:
            assert r.status == 503, r
            assert r.headers is not None
            assert r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert error["type"] == "server_error"
            assert error["code"] == "rate_limiter_unavailable"
            assert "Rate limiting is unavailable" in error["message"]
            assert r.elapsed < 1.0  # bounded by the socket timeout (0.25 s), not a hang

    async with aiohttp.ClientSession() as session:
        assert [r.status for r in await round_of(session, 4)] == [200] * 4

        # Killed: the connection is refused at once.
        await asyncio.to_thread(redis_server.stop)
        killed = await round_of(session, 10)
        assert_refused(killed)
        assert len(fake.provider.records) == 4  # nothing went upstream unlimited

        await asyncio.to_thread(redis_server.start)
        await asyncio.sleep(1.2)  # retry_redis_after_s
        # One at a time (see test_a_redis_restart_costs_no_request for concurrent ones).
        assert [(await post(session, i, chat_body())).status for i in (a, b, a, b)] == [200] * 4

        # Frozen (SIGSTOP): connections are accepted but never answered, so only the socket
        # timeout bounds the wait.
        pid = redis_server.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen = await round_of(session, 6)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert_refused(frozen)
        print(
            f"\nfail_closed: killed -> 503 in at most {max(r.elapsed for r in killed) * 1000:.0f}"
            f" ms, frozen -> 503 in at most {max(r.elapsed for r in frozen) * 1000:.0f} ms"
        )

        await asyncio.sleep(1.2)
        assert [r.status for r in await round_of(session, 4)] == [200] * 4
    assert len(fake.provider.records) == 12
    for inst in (a, b):
        assert "redis unavailable" in inst.log_text(), inst.name


async def test_a_redis_restart_costs_no_request(
    two_gateways: Launch, fake: Fake, redis_server: RedisServer
) -> None:
    a, b = await two_gateways(
        {
            **_callers({"t": {"requests_per_minute": 1000}}),
            "state": _state(redis_server, on_redis_error="fail_closed"),
        }
    )
    async with aiohttp.ClientSession() as session:
        first = await asyncio.gather(*(post(session, (a, b)[i % 2], chat_body()) for i in range(4)))
        assert [r.status for r in first] == [200] * 4
        # Redis restarts (a deploy, a failover) while no request needs it: no failure is seen,
        # so nothing is marked down, and the next requests should simply use the new server.
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)
        after = [await post(session, inst, chat_body()) for inst in (a, b)]
    assert [r.status for r in after] == [200, 200], [r.body for r in after]
