"""Per-caller limits through the gateway (memory backend): 429s the SDKs understand, the
headers, token reservation and reconciliation, and the usage chunk the gateway asks for on the
caller's behalf and removes again."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from gateway.appkeys import LIMITER, OUTCOME_SINKS
from gateway.limits.memory import MemoryLimiter
from gateway.report import Report
from tests.support import CALLER_KEY, FALLBACK_KEYS, Fake, Gateway, GatewayFactory

MESSAGES = [{"role": "user", "content": "hi"}]


def tiered(tier: dict[str, Any], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tiers": {"t": tier},
        "auth": {"default_tier": "t"},
    }
    config.update(extra)
    return config


def chat(**extra: Any) -> bytes:
    return orjson.dumps({"model": "gpt-test", "messages": MESSAGES, **extra})


def auth(**headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CALLER_KEY}", **headers}


def capture(gw: Gateway) -> list[Report]:
    outcomes: list[Report] = []
    gw.app[OUTCOME_SINKS].append(lambda o, _now: outcomes.append(o))
    return outcomes


async def test_rpm_429_in_openai_format_with_headers(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(tiered({"requests_per_minute": 3}))
    statuses, last = [], None
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(
                gw.url + "/v1/chat/completions", data=chat(), headers=auth()
            ) as resp:
                statuses.append(resp.status)
                last = (resp.headers.copy(), await resp.json())
                if resp.status == 200:
                    assert resp.headers["RateLimit-Policy"] == '"rpm";q=3;w=60'
                    assert resp.headers["RateLimit"].startswith('"rpm";r=')
    assert statuses == [200, 200, 200, 429]
    assert last is not None
    headers, body = last
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in body["error"]["message"]
    # GCRA, 3 per minute, all spent at once: the next one fits 20 s after the first.
    assert 19 <= int(headers["retry-after"]) <= 20
    assert 19_000 <= int(headers["retry-after-ms"]) <= 20_000
    assert headers["RateLimit"].startswith('"rpm";r=0;')


async def test_sdks_raise_rate_limit_errors(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(tiered({"requests_per_minute": 1}))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CALLER_KEY, max_retries=0) as a:
        with pytest.raises(anthropic.RateLimitError) as err:
            await a.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_denied_requests_never_reach_the_upstream(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(tiered({"requests_per_minute": 2}))
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *[
                session.post(gw.url + "/v1/chat/completions", data=chat(), headers=auth())
                for _ in range(10)
            ]
        )
        statuses = sorted(r.status for r in results)
        for r in results:
            r.release()
    assert statuses == [200, 200] + [429] * 8
    assert len(fake.provider.records) == 2


async def test_token_reservation_and_reconciliation(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(tiered({"tokens_per_minute": 5000}))
    outcomes = capture(gw)
    body = chat(max_tokens=900)
    reserve = math.ceil(len(body) / 4) + 900
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=body,
            headers=auth(**{"x-fake-chunks": "5"}),
        ) as resp:
            assert resp.status == 200
            usage = (await resp.json())["usage"]
    actual = usage["prompt_tokens"] + usage["completion_tokens"]
    assert outcomes[0].reconciled == actual - reserve
    limiter = gw.app[LIMITER]
    assert isinstance(limiter, MemoryLimiter)
    # After the refund only the real usage is charged: 5000 - actual tokens remain, so a
    # reservation of (5000 - actual) passes and one token more would not.
    decision = await limiter.admit("test-app", gw.runtime.tiers["t"].limits, 5000 - actual, 1)  # type: ignore[arg-type]
    assert decision.allowed
    denied = await limiter.admit("test-app", gw.runtime.tiers["t"].limits, 5, 1)  # type: ignore[arg-type]
    assert not denied.allowed and denied.denied_by == "tpm"


async def test_stream_that_dies_keeps_its_reservation(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(tiered({"tokens_per_minute": 5000}))
    outcomes = capture(gw)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=chat(stream=True, max_tokens=100),
            headers=auth(**{"x-fake-truncate-after": "2"}),
        ) as resp:
            await resp.read()
    assert outcomes[0].outcome == "truncated"
    assert outcomes[0].reconciled is None  # no usage seen: the reservation stands


async def test_injected_usage_is_stripped_byte_exactly(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(tiered({"tokens_per_minute": 100_000}))
    outcomes = capture(gw)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=chat(stream=True),
            headers=auth(**{"x-fake-chunks": "7", "x-fake-split-seed": "11"}),
        ) as resp:
            received = await resp.read()
    record = fake.provider.records[0]
    assert record.json is not None
    assert record.json["stream_options"] == {"include_usage": True}  # asked upstream
    sent = bytes(record.sent)
    assert b'"usage":null' in sent and b'"choices":[]' in sent
    # What the client would have got without include_usage: no usage members, no usage chunk.
    events = [e for e in sent.split(b"\n\n") if e]
    expected = b"".join(
        e.replace(b',"usage":null', b"") + b"\n\n"
        for e in events
        if not (b'"choices":[]' in e and b'"usage":{' in e)
    )
    assert received == expected
    assert b"usage" not in received
    usage = outcomes[0].facts.usage  # type: ignore[union-attr]
    assert usage is not None and usage.output_tokens == 7
    assert outcomes[0].reconciled is not None


async def test_caller_who_asked_for_usage_gets_it_untouched(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(tiered({"tokens_per_minute": 100_000}))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=chat(stream=True, stream_options={"include_usage": True}),
            headers=auth(),
        ) as resp:
            received = await resp.read()
    assert received == bytes(fake.provider.records[0].sent)


async def test_concurrency_slot_is_released_when_the_client_leaves(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(tiered({"concurrent_streams": 1}))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gw.url + "/v1/chat/completions",
            data=chat(stream=True),
            headers=auth(**{"x-fake-stall-after": "2"}),
        )
        assert resp.status == 200
        await resp.content.readany()
        async with session.post(
            gw.url + "/v1/chat/completions", data=chat(stream=True), headers=auth()
        ) as second:
            assert second.status == 429
            assert (await second.json())["error"]["code"] == "rate_limit_exceeded"
        resp.close()
        await fake.provider.wait_until(lambda: fake.provider.records[0].disconnected, 2)
        for _ in range(50):
            async with session.post(
                gw.url + "/v1/chat/completions", data=chat(stream=True), headers=auth()
            ) as third:
                if third.status == 200:
                    await third.read()
                    break
            await asyncio.sleep(0.02)
        assert third.status == 200


async def test_tier_model_list_restricts_callers(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(tiered({"models": ["claude-test"]}))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions", data=chat(), headers=auth()
        ) as resp:
            assert resp.status == 403
        # Each API lists the models it serves: claude-test in Anthropic's list only.
        anthropic = auth(**{"anthropic-version": "2023-06-01"})
        async with session.get(gw.url + "/v1/models", headers=anthropic) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["claude-test"]
        async with session.get(gw.url + "/v1/models", headers=auth()) as resp:
            assert (await resp.json())["data"] == []


async def test_unlimited_callers_carry_no_limit_headers(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.url + "/v1/chat/completions", data=chat(), headers=auth()
        ) as resp:
            assert resp.status == 200
            assert "RateLimit" not in resp.headers


async def test_provider_budget_falls_back_then_429s(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(
        {
            "providers": {
                "oa": {"limits": {"requests_per_minute": 2}},
                "oa-b": {
                    "api": "openai",
                    "base_url": f"{fake.url}/v1",
                    "keys": [{"id": "b-1", "secret": FALLBACK_KEYS[0]}],
                },
            },
            "models": {
                "with-fallback": [
                    {"provider": "oa", "model": "fake-gpt"},
                    {"provider": "oa-b", "model": "fake-gpt-b"},
                ]
            },
        }
    )
    async with aiohttp.ClientSession() as session:
        served = []
        for _ in range(3):
            async with session.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "with-fallback", "messages": MESSAGES}),
                headers=auth(),
            ) as resp:
                assert resp.status == 200
                served.append(resp.headers["x-gateway-deployment"])
                assert resp.headers["x-gateway-attempts"] == "1"
        # oa's budget (2 per minute) is spent: the third goes to the next deployment.
        assert served == ["oa/fake-gpt", "oa/fake-gpt", "oa-b/fake-gpt-b"]
        async with session.post(
            gw.url + "/v1/chat/completions", data=chat(), headers=auth()
        ) as resp:
            assert resp.status == 429  # gpt-test has only oa
            body = await resp.json()
            assert "provider limits" in body["error"]["message"]
            assert 1 <= int(resp.headers["retry-after"]) <= 30
    assert len(fake.provider.records) == 3


async def test_starts_with_redis_down_and_recovers_by_itself(
    gateway_factory: GatewayFactory, tmp_path: Any, fake: Fake
) -> None:
    from tests.support import RedisServer, require_binary

    server = RedisServer(require_binary("redis-server"), tmp_path)  # not started yet
    gw = await gateway_factory(
        tiered(
            {"requests_per_minute": 4},
            state={
                "backend": "redis",
                "redis_url": server.url,
                "on_redis_error": "fail_open",
                "instances": 2,
                "socket_timeout_s": 0.2,
                "retry_redis_after_s": 0.3,
            },
        )
    )
    outcomes = capture(gw)
    async with aiohttp.ClientSession() as session:

        async def status() -> int:
            async with session.post(
                gw.url + "/v1/chat/completions", data=chat(), headers=auth()
            ) as resp:
                return resp.status

        # Redis down: a local limiter with 4 / 2 instances = 2 per minute.
        assert [await status() for _ in range(3)] == [200, 200, 429]
        assert {o.limiter for o in outcomes} == {"degraded", "degraded_denied_rpm"}
        server.start()
        try:
            await asyncio.sleep(0.4)
            # Redis back: the shared budget of 4 (fresh: the local decisions were not shared).
            assert [await status() for _ in range(5)] == [200, 200, 200, 200, 429]
            assert [o.limiter for o in outcomes[3:]] == ["ok"] * 4 + ["denied_rpm"]
        finally:
            server.stop()


async def test_provider_tokens_are_charged_once_across_retries(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    # 3000 per minute comes back at 50 tokens/s: the checks below take a few ms (< 1 token).
    gw = await gateway_factory({"providers": {"oa": {"limits": {"tokens_per_minute": 3000}}}})
    body = chat(max_tokens=500)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=body,
            headers=auth(
                **{
                    "x-fake-plan": orjson.dumps([{"status": 500}, {"chunks": 4}]).decode(),
                    "x-fake-session": "provider-retry",
                }
            ),
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-gateway-attempts"] == "2"
            usage = (await resp.json())["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    limiter = gw.app[LIMITER]
    assert isinstance(limiter, MemoryLimiter)
    spec = gw.runtime.providers["oa"].limits
    assert spec is not None
    # Exactly `used` tokens are gone from the provider's budget: the failed attempt's
    # reservation was refunded, the served one reconciled to its real usage.
    assert (await limiter.admit("provider:oa", spec, 3000 - used, 1)).allowed
    assert not (await limiter.admit("provider:oa", spec, 5, 1)).allowed
