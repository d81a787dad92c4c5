"""Queueing for upstream capacity and hedged attempts, through a real `gateway serve`.

Queue (`policy.queue`): a request that finds every key of its model at its
`max_concurrent_per_key` waits, sending nothing, until a lease frees; higher tier `priority`
first, FIFO within a priority; after `max_wait_s` it gets today's 503; a full queue answers
503 `overloaded` at once; a queued client that goes away leaves the queue at once; the caller's
own tier limits still answer 429 at once. Hedge (`models.X.policy.hedge`): an attempt with no
first event `after_ms` after it started gets a parallel one on another key; the first to
produce a first event is committed, the other is closed at once, and the client sees only the
winner's bytes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, build_runtime, load_config_text
from gateway.fake import RequestRecord
from tests.support import (
    CALLER_KEY,
    FALLBACK_KEYS,
    OTHER_CALLER_KEY,
    Fake,
    Served,
    base_config,
    deep_merge,
    serve_gateway,
    sha,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
CAPPED = "capped"  # one key, one request at a time
HEDGED = "gpt-hedge"
BUSY_MESSAGE = "Every upstream key for the model 'capped' is at its concurrency limit."


# -- configs ---------------------------------------------------------------------------------


def queue_config(
    fake_url: str,
    *,
    max_wait_s: float | None = 10,
    max_length: int = 100,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Model `capped`: provider `solo`, one key with its own secret (no other provider's leases
    count on it), at most one request at a time; the queue on unless `max_wait_s` is None.
    Callers: test-app (no tier: priority 0) and gold-app (tier gold, priority 10)."""
    config = deep_merge(
        base_config(fake_url),
        {
            "auth": {
                "api_keys": [
                    {"id": "test-app", "sha256": sha(CALLER_KEY)},
                    {"id": "gold-app", "sha256": sha(OTHER_CALLER_KEY), "tier": "gold"},
                ]
            },
            "tiers": {"gold": {"priority": 10}},
            "providers": {
                "solo": {
                    "api": "openai",
                    "base_url": f"{fake_url}/v1",
                    "keys": [{"id": "solo-1", "secret": FALLBACK_KEYS[0]}],
                    "max_concurrent_per_key": 1,
                    "forward_headers": ["x-fake-*"],
                }
            },
            "models": {CAPPED: [{"provider": "solo", "model": "fake-gpt"}]},
        },
    )
    if max_wait_s is not None:
        config["policy"]["queue"] = {"max_wait_s": max_wait_s, "max_length": max_length}
    return deep_merge(config, extra or {})


def hedge_config(fake_url: str, after_ms: int | str = 200) -> dict[str, Any]:
    """Model `gpt-hedge`: provider oa (two keys, no cap), hedged after `after_ms`."""
    return deep_merge(
        base_config(fake_url),
        {
            "models": {
                HEDGED: {
                    "deployments": [{"provider": "oa", "model": "fake-gpt"}],
                    "policy": {"hedge": {"after_ms": after_ms, "max_hedges": 1}},
                }
            }
        },
    )


# -- client side -----------------------------------------------------------------------------


@dataclass
class Result:
    """One request as the client saw it; times are the test loop's (as the fake's records)."""

    status: int
    body: bytes
    sent_at: float
    first_at: float | None  # the first body byte
    done_at: float

    def error(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)["error"]
        return data


async def chat(
    session: aiohttp.ClientSession,
    gw: Served,
    *,
    model: str = CAPPED,
    key: str = CALLER_KEY,
    tag: str | None = None,
    chunks: int = 3,
    gap_ms: int = 0,
    plan: list[dict[str, Any]] | None = None,
) -> Result:
    """A streamed chat completion read to its end. `tag` becomes the fake's `x-fake-session`
    (so the fake's record of it can be found); `plan` its per-attempt script."""
    headers = {
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "x-fake-chunks": str(chunks),
        "x-fake-gap-ms": str(gap_ms),
    }
    if tag is not None:
        headers["x-fake-session"] = tag
    if plan is not None:
        headers["x-fake-plan"] = orjson.dumps(plan).decode()
    body = {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        # Asked by the caller: the gateway passes the stream through untouched.
        "stream_options": {"include_usage": True},
    }
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    async with asyncio.timeout(30):
        async with session.post(gw.url + CHAT, data=orjson.dumps(body), headers=headers) as resp:
            first = await resp.content.readany()
            first_at = loop.time() if first else None
            rest = await resp.content.read()
            return Result(resp.status, first + rest, sent_at, first_at, loop.time())


def records(fake: Fake, tag: str) -> list[RequestRecord]:
    """The fake's records of the requests tagged `tag`, in attempt order."""
    found = [r for r in fake.provider.records if r.session == tag]
    return sorted(found, key=lambda r: r.attempt)


def whole_stream(body: bytes) -> None:
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events and events[-1] == b"data: [DONE]", body[-200:]


async def hold_key(
    session: aiohttp.ClientSession, gw: Served, fake: Fake, *, seconds: float, tag: str = "hold"
) -> asyncio.Task[Result]:
    """A stream on `capped` that holds its only key for about `seconds`; returns once the fake
    has it open."""
    gap_ms = 100
    task = asyncio.create_task(
        chat(session, gw, tag=tag, chunks=max(2, round(seconds * 1000 / gap_ms)), gap_ms=gap_ms)
    )
    await fake.provider.wait_until(lambda: bool(records(fake, tag)), 10)
    return task


# -- the gateway's outputs -------------------------------------------------------------------


async def metric_samples(session: aiohttp.ClientSession, gw: Served, name: str) -> list[Any]:
    """The samples named `name` (family name plus suffix) on the admin listener's /metrics."""
    async with session.get(gw.admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


async def queue_depth(session: aiohttp.ClientSession, gw: Served) -> float:
    found = await metric_samples(session, gw, "llm_gateway_queue_depth")
    return float(sum(s.value for s in found))


async def wait_depth(
    session: aiohttp.ClientSession, gw: Served, depth: int, timeout_s: float = 10
) -> float:
    """Poll /metrics until the queue depth (over every provider) is `depth`; returns how long
    that took."""
    start = time.monotonic()
    last = -1.0
    for _ in range(int(timeout_s / 0.02) + 1):
        last = await queue_depth(session, gw)
        if last == depth:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue depth never reached {depth} in {timeout_s} s (last: {last})")


async def keys_in_flight(session: aiohttp.ClientSession, gw: Served, provider: str) -> int:
    async with session.get(gw.admin_url + "/admin/keys", headers=gw.admin_headers) as resp:
        keys = (await resp.json())["providers"][provider]["keys"]
    return sum(int(k["in_flight"]) for k in keys)


async def wait_in_flight_zero(session: aiohttp.ClientSession, gw: Served, provider: str) -> None:
    for _ in range(100):
        if await keys_in_flight(session, gw, provider) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{provider}: a key lease was never released")


# -- config ----------------------------------------------------------------------------------


def _validate(config: dict[str, Any]) -> None:
    build_runtime(load_config_text(yaml.safe_dump(config), env={}))


def test_queue_and_hedge_settings_validate() -> None:
    url = "http://127.0.0.1:1"
    _validate(queue_config(url))
    _validate(queue_config(url, max_wait_s=0))  # no queue: today's behaviour
    _validate(hedge_config(url))
    _validate(hedge_config(url, after_ms="p95"))  # the route's observed TTFB
    bad: list[dict[str, Any]] = [
        queue_config(url, max_wait_s=-1),
        queue_config(url, max_length=0),
        hedge_config(url, after_ms="fast"),
        hedge_config(url, after_ms=-5),
        deep_merge(base_config(url), {"tiers": {"gold": {"priority": "high"}}}),
    ]
    for config in bad:
        with pytest.raises(ConfigError):
            _validate(config)


# -- queue -----------------------------------------------------------------------------------


async def test_streams_at_the_key_cap_queue_and_run_one_after_another(
    fake: Fake, tmp_path: Any
) -> None:
    async with (
        serve_gateway(queue_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        first = await hold_key(session, gw, fake, seconds=0.5, tag="q0")
        queued = [
            asyncio.create_task(chat(session, gw, tag=f"q{i}", chunks=5, gap_ms=100))
            for i in (1, 2)
        ]
        await wait_depth(session, gw, 2)
        results = [await first, *await asyncio.gather(*queued)]
        for r in results:
            assert r.status == 200, r.body
            whole_stream(r.body)
        assert fake.provider.max_open_streams == 1
        recs = sorted(
            (rec for i in range(3) for rec in records(fake, f"q{i}")), key=lambda r: r.started_at
        )
        assert len(recs) == 3  # each sent once, none failed over or retried
        assert recs[0].session == "q0"
        for before, after in itertools.pairwise(recs):
            assert before.ended_at is not None and before.completed
            # The next starts once the one before has ended (the lease is its stream's).
            assert after.started_at >= before.ended_at - 0.05, (before, after)
        assert await wait_depth(session, gw, 0, 1) < 1
        wait = await metric_samples(session, gw, "llm_gateway_queue_wait_seconds_count")
        assert {s.labels.get("gen_ai_provider_name") for s in wait} == {"solo"}
        assert sum(s.value for s in wait) >= 2  # the two that waited

    access = [x for x in await gw.access_lines(3) if x["model"] == CAPPED]
    assert [x["status"] for x in access] == [200, 200, 200]
    waited = sorted(x["queued_ms"] for x in access if "queued_ms" in x)
    assert len(waited) == 2, access  # present when the request waited: the two queued ones
    assert all(isinstance(ms, float) for ms in waited)
    # The first waited for one stream (~0.5 s), the second for two.
    assert waited[0] >= 300 and waited[1] >= waited[0] + 300, waited


async def test_a_higher_priority_caller_is_served_first(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(queue_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        hold = await hold_key(session, gw, fake, seconds=2)
        standard = asyncio.create_task(chat(session, gw, tag="standard", chunks=3, gap_ms=100))
        await wait_depth(session, gw, 1)
        gold = asyncio.create_task(
            chat(session, gw, key=OTHER_CALLER_KEY, tag="gold", chunks=3, gap_ms=100)
        )
        await wait_depth(session, gw, 2)
        assert not hold.done(), "the held stream ended before both were queued"
        results = await asyncio.gather(hold, standard, gold)
        assert [r.status for r in results] == [200, 200, 200]
        (s,) = records(fake, "standard")
        (g,) = records(fake, "gold")
        (h,) = records(fake, "hold")
        # Queued second, served first: gold started when the held key freed, standard after it.
        assert h.ended_at is not None and g.started_at >= h.ended_at - 0.05
        assert g.started_at < s.started_at, (g.started_at, s.started_at)
        assert g.ended_at is not None and s.started_at >= g.ended_at - 0.05
        assert results[2].done_at < results[1].done_at


async def test_fifo_within_one_priority(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(queue_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        hold = await hold_key(session, gw, fake, seconds=2)
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(chat(session, gw, tag=f"f{i}", chunks=2, gap_ms=50)))
            await wait_depth(session, gw, i + 1)
        assert not hold.done()
        results = await asyncio.gather(hold, *tasks)
        assert [r.status for r in results] == [200] * 4
        starts = [records(fake, f"f{i}")[0].started_at for i in range(3)]
        assert starts == sorted(starts), starts


async def test_the_wait_ends_after_max_wait_s_with_todays_503(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(queue_config(fake.url, max_wait_s=0.5), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        hold = await hold_key(session, gw, fake, seconds=3)
        late = await chat(session, gw, tag="late")
        assert late.status == 503, late.body
        assert 0.4 <= late.done_at - late.sent_at < 2.0, late.done_at - late.sent_at
        error = late.error()
        assert error["code"] == "upstream_unavailable"
        assert error["message"] == BUSY_MESSAGE
        assert records(fake, "late") == []  # never sent upstream
        assert await queue_depth(session, gw) == 0
        assert not hold.done()
        held = await hold
        assert held.status == 200
        whole_stream(held.body)

    (line,) = [x for x in await gw.access_lines(2) if x["status"] == 503]
    assert line["outcome"] == "upstream_unavailable"
    assert isinstance(line["queued_ms"], float) and line["queued_ms"] >= 400, line


async def test_without_a_queue_the_cap_answers_503_at_once(fake: Fake, tmp_path: Any) -> None:
    """max_wait_s 0 (the default): today's behaviour."""
    for config in (queue_config(fake.url, max_wait_s=None), queue_config(fake.url, max_wait_s=0)):
        fake.provider.reset()
        async with serve_gateway(config, tmp_path) as gw, aiohttp.ClientSession() as session:
            hold = await hold_key(session, gw, fake, seconds=1)
            busy = await chat(session, gw, tag="busy")
            assert busy.status == 503 and busy.done_at - busy.sent_at < 0.4
            assert busy.error()["code"] == "upstream_unavailable"
            assert busy.error()["message"] == BUSY_MESSAGE
            assert (await hold).status == 200
        lines = [x for x in await gw.access_lines(2) if x["status"] == 503]
        assert lines and "queued_ms" not in lines[0]


async def test_a_queued_client_that_goes_away_leaves_the_queue(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(queue_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        hold = await hold_key(session, gw, fake, seconds=2)
        # Its own session: closing it closes the connection the request is queued on.
        leaving = aiohttp.ClientSession()
        try:
            gone = asyncio.create_task(chat(leaving, gw, tag="gone"))
            await wait_depth(session, gw, 1)
            await asyncio.sleep(0.3)
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        finally:
            await leaving.close()
        assert await wait_depth(session, gw, 0, 2) < 1.0  # at once, not when the key frees
        assert not hold.done(), "the held stream ended before the check"
        held = await hold
        assert held.status == 200
        # The key freed: nothing queued takes it, and the gone request was never sent.
        await asyncio.sleep(0.3)
        assert records(fake, "gone") == []
        after = await chat(session, gw, tag="after")
        assert after.status == 200 and after.done_at - after.sent_at < 1.0
        assert await keys_in_flight(session, gw, "solo") == 0
        assert await queue_depth(session, gw) == 0


async def test_a_full_queue_answers_503_overloaded_at_once(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(queue_config(fake.url, max_length=1), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        hold = await hold_key(session, gw, fake, seconds=1.5)
        waiting = asyncio.create_task(chat(session, gw, tag="waiting"))
        await wait_depth(session, gw, 1)
        over = await chat(session, gw, tag="over")
        assert over.status == 503, over.body
        assert over.done_at - over.sent_at < 0.5
        assert over.error()["code"] == "overloaded"
        assert await queue_depth(session, gw) == 1  # the one waiting is still queued
        assert not hold.done()
        assert (await hold).status == 200
        result = await waiting
        assert result.status == 200
        whole_stream(result.body)
        assert records(fake, "over") == []

    by_status = {x["status"]: x for x in await gw.access_lines(3)}
    assert by_status[503]["outcome"] == "overloaded"
    assert "queued_ms" not in by_status[503], str(by_status[503])  # turned away at once


async def test_a_spent_provider_budget_queues_until_it_refills(fake: Fake, tmp_path: Any) -> None:
    """providers.X.limits: 60 a minute is a burst of 60, then one a second. The requests past
    the burst wait for the budget instead of getting today's 429."""
    burst, extra = 60, 2
    config = queue_config(
        fake.url,
        extra={
            "providers": {
                "solo": {"max_concurrent_per_key": 1000, "limits": {"requests_per_minute": burst}}
            }
        },
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        serve_gateway(config, tmp_path) as gw,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        results = await asyncio.gather(
            *(chat(session, gw, tag=f"b{i}", chunks=1) for i in range(burst + extra))
        )
        assert [r.status for r in results] == [200] * (burst + extra), [
            r.body for r in results if r.status != 200
        ][:1]
        assert len(fake.provider.records) == burst + extra
        slowest = max(r.done_at - r.sent_at for r in results)
        assert 0.3 <= slowest < 5, slowest

    access = await gw.access_lines(burst + extra)
    waited = [x["queued_ms"] for x in access if "queued_ms" in x]
    assert 1 <= len(waited) <= extra and max(waited) >= 300, waited


async def test_the_callers_own_limit_answers_429_at_once(fake: Fake, tmp_path: Any) -> None:
    config = queue_config(
        fake.url,
        extra={
            "tiers": {"one": {"concurrent_streams": 1}},
            "auth": {
                "api_keys": [
                    {"id": "test-app", "sha256": sha(CALLER_KEY), "tier": "one"},
                    {"id": "gold-app", "sha256": sha(OTHER_CALLER_KEY), "tier": "gold"},
                ]
            },
        },
    )
    async with serve_gateway(config, tmp_path) as gw, aiohttp.ClientSession() as session:
        hold = await hold_key(session, gw, fake, seconds=1.5)  # test-app's one stream
        mine = await chat(session, gw, tag="mine")
        assert mine.status == 429, mine.body
        assert mine.done_at - mine.sent_at < 0.4
        assert mine.error()["code"] == "rate_limit_exceeded"
        assert records(fake, "mine") == []
        # The queue is on: another caller at the same key cap waits instead.
        other = asyncio.create_task(chat(session, gw, key=OTHER_CALLER_KEY, tag="other"))
        await wait_depth(session, gw, 1)
        assert not hold.done()
        assert (await hold).status == 200
        assert (await other).status == 200


# -- hedge -----------------------------------------------------------------------------------


async def hedges(session: aiohttp.ClientSession, gw: Served) -> dict[str, float]:
    found = await metric_samples(session, gw, "llm_gateway_hedges_total")
    out: dict[str, float] = {}
    for s in found:
        out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


async def test_a_stalled_first_attempt_is_hedged_and_the_hedge_wins(
    fake: Fake, tmp_path: Any
) -> None:
    async with (
        serve_gateway(hedge_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        plan = [{"first_delay_ms": 3000}, {}]
        result = await chat(session, gw, model=HEDGED, tag="h", chunks=5, plan=plan)
        assert result.status == 200, result.body
        assert result.first_at is not None and result.first_at - result.sent_at < 1.0
        await fake.provider.wait_until(lambda: len(records(fake, "h")) == 2, 2)
        stalled, hedge = records(fake, "h")
        await fake.provider.wait_until(lambda: stalled.ended_at is not None, 3)
        # The hedge started after_ms after the first, on the other key.
        assert 0.15 <= hedge.started_at - stalled.started_at < 0.8
        assert stalled.api_key != hedge.api_key
        # The loser was closed as soon as the hedge committed, before it sent anything.
        assert stalled.disconnected and not stalled.completed
        assert hedge.first_byte_at is not None and stalled.disconnected_at is not None
        assert 0 <= stalled.disconnected_at - hedge.first_byte_at < 0.5
        assert bytes(stalled.sent) == b""
        # The client got the winner's bytes, exactly.
        assert hedge.completed
        assert result.body == bytes(hedge.sent)
        whole_stream(result.body)
        await wait_in_flight_zero(session, gw, "oa")
        counts = await hedges(session, gw)
        assert counts.get("hedge_won") == 1.0
        assert counts.get("first_won", 0.0) == 0.0 and counts.get("all_failed", 0.0) == 0.0

    (line,) = await gw.access_lines(1)
    assert line["status"] == 200 and line["outcome"] == "ok"
    assert line["hedged"] is True and line["hedge_won"] == "hedge"


async def test_the_first_attempt_can_still_win_the_race(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(hedge_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        plan = [{"first_delay_ms": 500}, {"first_delay_ms": 3000}]
        result = await chat(session, gw, model=HEDGED, tag="w", chunks=5, plan=plan)
        assert result.status == 200, result.body
        await fake.provider.wait_until(lambda: len(records(fake, "w")) == 2, 2)
        first, hedge = records(fake, "w")
        await fake.provider.wait_until(lambda: hedge.ended_at is not None, 3)
        assert 0.15 <= hedge.started_at - first.started_at < 0.45
        assert hedge.disconnected and bytes(hedge.sent) == b""
        assert first.first_byte_at is not None and hedge.disconnected_at is not None
        assert 0 <= hedge.disconnected_at - first.first_byte_at < 0.5
        assert first.completed and result.body == bytes(first.sent)
        await wait_in_flight_zero(session, gw, "oa")
        counts = await hedges(session, gw)
        assert counts.get("first_won") == 1.0
        assert counts.get("hedge_won", 0.0) == 0.0 and counts.get("all_failed", 0.0) == 0.0

    (line,) = await gw.access_lines(1)
    assert line["hedged"] is True and line["hedge_won"] == "first"


async def test_a_fast_first_attempt_starts_no_hedge(fake: Fake, tmp_path: Any) -> None:
    async with (
        serve_gateway(hedge_config(fake.url), tmp_path) as gw,
        aiohttp.ClientSession() as session,
    ):
        # Its first event comes at once; the stream itself lasts longer than after_ms.
        result = await chat(session, gw, model=HEDGED, tag="n", chunks=5, gap_ms=100)
        assert result.status == 200
        assert result.done_at - result.sent_at >= 0.3
        await asyncio.sleep(0.5)
        (only,) = records(fake, "n")
        assert only.completed and result.body == bytes(only.sent)
        assert len(fake.provider.records) == 1
        assert sum((await hedges(session, gw)).values()) == 0

    (line,) = await gw.access_lines(1)
    assert line.get("hedged", False) is False
    assert "hedge_won" not in line
