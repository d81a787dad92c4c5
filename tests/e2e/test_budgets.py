"""Spend budgets (tiers.<t>.budget) through real `gateway serve` processes: a stream is cut
the moment its caller's budget runs out (in the OpenAI and the Anthropic format), the upstream
connection is closed right after, the next request is a 429 `budget_exceeded`; the whole
charge is what was consumed (the prompt, then each content event until the upstream's usage
replaces the estimate); cost budgets work from `pricing`; and two instances on one real
redis-server share a budget exactly.

Every figure is computed here from the bytes the client got (the same rule the gateway
states: max(1, ceil(chars / 4)) tokens per content event, the prompt estimated at 4 bytes a
token) and compared with what the gateway charged (its access line and /admin/limits).
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from gateway.sse import SSEDecoder
from tests.support import (
    CALLER_KEY,
    Fake,
    RedisServer,
    Served,
    base_config,
    deep_merge,
    serve_gateway,
)

OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
AN = {
    "x-api-key": CALLER_KEY,
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
}
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"x-fake-chunks": "400", "x-fake-gap-ms": "5"}


def budget_config(fake: Fake, budget: dict[str, Any], **extra: Any) -> dict[str, Any]:
    config = deep_merge(
        base_config(fake.url),
        {"tiers": {"metered": {"budget": budget}}, "auth": {"default_tier": "metered"}},
    )
    return deep_merge(config, extra)


def seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    return (midnight - now).total_seconds()


def tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def sse_blocks(body: bytes) -> list[bytes]:
    return [b for b in body.split(b"\n\n") if b.strip()]


def chat_stream(body: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chat chunks before the last event, and the last event (parsed)."""
    blocks = [orjson.loads(b.removeprefix(b"data: ")) for b in sse_blocks(body)]
    return blocks[:-1], blocks[-1]


def chat_content(chunks: list[dict[str, Any]]) -> list[str]:
    out = []
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                out.append(text)
    return out


def anthropic_stream(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in sse_blocks(body):
        name, data = block.split(b"\n", 1)
        events.append((name.removeprefix(b"event: ").decode(), orjson.loads(data[6:])))
    return events


async def budgets_of(gw: Served, caller: str = "test-app") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.admin_url}/admin/limits/{caller}", headers=gw.admin_headers) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    budgets: dict[str, Any] = body["budgets"]
    return budgets


async def metric(gw: Served, name: str, **labels: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.admin_url + "/metrics", headers=gw.admin_headers) as resp,
    ):
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = line[len(name) + 1 : line.index("}")]
            if ",".join(sorted(found.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, Any, bytes, int]:
    """Status, headers, body and the request body's size (the prompt estimate's input)."""
    data = orjson.dumps(body)
    async with session.post(url, data=data, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read(), len(data)


async def expect_429(
    session: aiohttp.ClientSession, gw: Served, fake: Fake, anthropic: bool = False
) -> None:
    if anthropic:
        url, headers = gw.url + "/v1/messages", AN
        body: dict[str, Any] = {"model": "claude-test", "max_tokens": 50, "messages": MESSAGES}
    else:
        url, headers = gw.url + "/v1/chat/completions", OA
        body = {"model": "gpt-test", "messages": MESSAGES}
    before = len(fake.provider.records)
    status, resp_headers, raw, _ = await post(session, url, body, headers)
    assert status == 429, raw
    error = orjson.loads(raw)
    if anthropic:
        assert error["type"] == "error" and error["error"]["type"] == "budget_exceeded"
    else:
        assert error["error"]["code"] == "budget_exceeded"
        assert error["error"]["type"] == "budget_exceeded"
    assert "budget" in (error["error"]["message"]).lower()
    # Until the UTC day is over (the spent budget is a per-day one here).
    wait = int(resp_headers["retry-after"])
    assert abs(wait - seconds_to_midnight()) < 5, wait
    assert len(fake.provider.records) == before  # nothing reached the upstream


@pytest.fixture
def serve(tmp_path: Path) -> Any:
    """`serve(config)`: a `gateway serve` process (each in its own directory)."""
    count = 0

    def start(config: dict[str, Any]) -> Any:
        nonlocal count
        count += 1
        directory = tmp_path / f"gw{count}"
        directory.mkdir()
        return serve_gateway(config, directory)

    return start


@pytest.mark.parametrize("gap_ms", [5, 0], ids=["paced", "coalesced"])
async def test_an_openai_stream_is_cut_when_its_token_budget_runs_out(
    fake: Fake, serve: Any, gap_ms: int
) -> None:
    """Paced: one event per read, and the upstream is closed right after the cut. Coalesced
    (no gap): reads carry many events each, and the cut still falls right after the event
    that spent the budget, inside a read."""
    budget = 150
    async with serve(budget_config(fake, {"tokens_per_day": budget})) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            data = orjson.dumps(body)
            url = gw.url + "/v1/chat/completions"
            script = {**LONG, "x-fake-gap-ms": str(gap_ms)}
            async with session.post(url, data=data, headers={**OA, **script}) as resp:
                assert resp.status == 200
                assert resp.headers["x-gateway-budget-remaining"] == str(budget)
                assert "x-gateway-budget-remaining-cost" not in resp.headers
                raw = await resp.read()
                received_at = asyncio.get_running_loop().time()
            chunks, last = chat_stream(raw)
            # The terminal event in the OpenAI format, and nothing after the cut.
            assert last["error"]["code"] == "budget_exceeded"
            assert last["error"]["type"] == "budget_exceeded"
            assert b"[DONE]" not in raw
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            content = chat_content(chunks)
            counted = [tokens(t) for t in content]
            prompt = math.ceil(len(data) / 4)
            charged = prompt + sum(counted)
            # Cut right after the event that spent the budget: at most that one overshoots.
            assert charged >= budget
            assert charged - counted[-1] < budget
            assert 10 < len(content) < 390  # cut mid-way

            if gap_ms:
                # The upstream connection was closed at once, long before the stream's end.
                (record,) = fake.provider.records
                await fake.provider.wait_until(lambda: record.disconnected, timeout=5)
                assert not record.completed
                assert record.disconnected_at is not None
                assert record.disconnected_at - received_at < 0.5

            await expect_429(session, gw, fake)
            await expect_429(session, gw, fake, anthropic=True)  # the caller's budget, any API

        first, *refused = await gw.access_lines(3)
        assert first["outcome"] == "budget_exceeded" and first["status"] == 200
        assert first["budget_tokens"] == charged
        assert [r["outcome"] for r in refused] == ["budget_exceeded", "budget_exceeded"]
        assert [r["status"] for r in refused] == [429, 429]
        day = (await budgets_of(gw))["tokens_per_day"]
        assert day["used"] == charged and day["limit"] == budget
        assert day["remaining"] == 0 and day["spent"] is True
        assert abs(day["whole_again_in_s"] - seconds_to_midnight()) < 5
        assert (
            await metric(gw, "llm_gateway_budget_exceeded_total", tier="metered", at="stream") == 1
        )
        assert (
            await metric(gw, "llm_gateway_budget_exceeded_total", tier="metered", at="admission")
            == 2
        )


async def test_an_anthropic_stream_is_cut_with_an_anthropic_error_event(
    fake: Fake, serve: Any
) -> None:
    budget = 120
    async with serve(budget_config(fake, {"tokens_per_day": budget})) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "claude-test", "max_tokens": 900, "messages": MESSAGES, "stream": True}
            status, headers, raw, _ = await post(
                session, gw.url + "/v1/messages", body, {**AN, **LONG}
            )
            assert status == 200
            assert headers["x-gateway-budget-remaining"] == str(budget)
            events = anthropic_stream(raw)
            name, error = events[-1]
            assert name == "error"
            assert error == {
                "type": "error",
                "error": {"type": "budget_exceeded", "message": error["error"]["message"]},
            }
            assert "budget_exceeded" in error["error"]["message"]
            names = [n for n, _ in events]
            assert "message_stop" not in names and "message_delta" not in names
            # The prompt as the upstream counted it (message_start), then each text delta.
            prompt = events[0][1]["message"]["usage"]["input_tokens"]
            counted = [tokens(e["delta"]["text"]) for n, e in events if n == "content_block_delta"]
            charged = prompt + sum(counted)
            assert charged >= budget and charged - counted[-1] < budget
            (record,) = fake.provider.records
            await fake.provider.wait_until(lambda: record.disconnected, timeout=5)
            assert not record.completed
            await expect_429(session, gw, fake, anthropic=True)
            # Counting tokens is free at the provider: no budget refuses or charges it.
            count = {"model": "claude-test", "messages": MESSAGES}
            status, _, raw, _ = await post(session, gw.url + "/v1/messages/count_tokens", count, AN)
            assert status == 200 and orjson.loads(raw)["input_tokens"] > 0
        first, _, counted_tokens = await gw.access_lines(3)
        assert first["outcome"] == "budget_exceeded" and first["budget_tokens"] == charged
        assert counted_tokens["status"] == 200 and "budget_tokens" not in counted_tokens
        assert (await budgets_of(gw))["tokens_per_day"]["used"] == charged


async def test_the_upstream_usage_replaces_the_estimate_of_a_whole_stream(
    fake: Fake, serve: Any
) -> None:
    """A stream that ends as it should is charged the upstream's own usage; a plain answer
    its usage; the headers count down what is left."""
    budget = 100_000
    async with serve(
        budget_config(fake, {"tokens_per_day": budget, "tokens_per_month": 10**7})
    ) as gw:
        async with aiohttp.ClientSession() as session:
            url = gw.url + "/v1/chat/completions"
            body = {
                "model": "gpt-test",
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            status, _, raw, _ = await post(session, url, body, {**OA, "x-fake-chunks": "30"})
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
            usage = orjson.loads(sse_blocks(raw)[-2].removeprefix(b"data: "))["usage"]
            streamed = usage["prompt_tokens"] + usage["completion_tokens"]
            # Usage the caller did not ask for is still read (and stripped again).
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            status, _, raw2, _ = await post(session, url, body, {**OA, "x-fake-chunks": "30"})
            assert status == 200 and b'"usage"' not in raw2
            await gw.access_lines(2)  # both streams settled (after their last byte)
            status, headers3, raw3, _ = await post(
                session, url, {"model": "gpt-test", "messages": MESSAGES}, OA
            )
            assert status == 200
            answer = orjson.loads(raw3)["usage"]
            plain = answer["prompt_tokens"] + answer["completion_tokens"]
        lines = await gw.access_lines(3)
        hidden = lines[1]["input_tokens"] + lines[1]["output_tokens"]
        assert [line["budget_tokens"] for line in lines] == [streamed, hidden, plain]
        assert int(headers3["x-gateway-budget-remaining"]) == budget - streamed - hidden
        budgets = await budgets_of(gw)
        assert budgets["tokens_per_day"]["used"] == streamed + hidden + plain
        assert budgets["tokens_per_month"]["used"] == streamed + hidden + plain
        assert budgets["tokens_per_day"]["spent"] is False


async def test_a_cost_budget_from_pricing_cuts_a_stream_and_refuses_the_next(
    fake: Fake, serve: Any
) -> None:
    # 1 per million prompt tokens, 1,000 per million output tokens: 0.001 per output token.
    pricing = {"input_per_mtok": 1.0, "output_per_mtok": 1000.0}
    config = budget_config(
        fake,
        {"cost_per_day": 0.05},
        models={"gpt-test": [{"provider": "oa", "model": "fake-gpt", "pricing": pricing}]},
    )
    config["tiers"]["metered"]["models"] = ["gpt-test"]  # the priced model only
    async with serve(config) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            data = orjson.dumps(body)
            url = gw.url + "/v1/chat/completions"
            async with session.post(url, data=data, headers={**OA, **LONG}) as resp:
                assert resp.status == 200
                assert resp.headers["x-gateway-budget-remaining-cost"] == "0.05"
                assert "x-gateway-budget-remaining" not in resp.headers
                raw = await resp.read()
            chunks, last = chat_stream(raw)
            assert last["error"]["code"] == "budget_exceeded"
            assert "cost" in last["error"]["message"]
            counted = [tokens(t) for t in chat_content(chunks)]
            prompt = math.ceil(len(data) / 4)

            def nano(output: int) -> int:  # the gateway's sum, rounded up (never under)
                return -(-(prompt * 1_000_000_000 + output * 1_000_000_000_000) // 1_000_000)

            charged = nano(sum(counted))
            assert charged >= 50_000_000 > nano(sum(counted[:-1]))
            status, headers, raw, _ = await post(session, url, body, OA)
            assert status == 429 and orjson.loads(raw)["error"]["code"] == "budget_exceeded"
            assert headers["x-gateway-budget-remaining-cost"] == "0"
        first, _ = await gw.access_lines(2)
        assert first["budget_cost"] == pytest.approx(charged / 1e9, abs=1e-9)
        cost = (await budgets_of(gw))["cost_per_day"]
        assert cost["used"] == pytest.approx(charged / 1e9, abs=1e-9)
        assert cost["spent"] is True


@pytest.mark.server
async def test_two_instances_on_one_redis_share_a_budget_exactly(
    fake: Fake, serve: Any, redis_server: RedisServer
) -> None:
    budget = 600
    # A generous Redis timeout: a charge that timed out on a loaded machine would go to the
    # local fallback (fail_open) and be missing from the shared totals this test compares.
    state = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "instances": 2,
        "socket_timeout_s": 3,
    }
    config = budget_config(fake, {"tokens_per_day": budget}, state=state)
    async with serve(config) as a, serve(config) as b, aiohttp.ClientSession() as session:
        # Exact shared totals: a plain answer on A and a whole stream on B.
        status, _, raw, _ = await post(
            session, a.url + "/v1/chat/completions", {"model": "gpt-test", "messages": MESSAGES}, OA
        )
        assert status == 200
        usage = orjson.loads(raw)["usage"]
        used = usage["prompt_tokens"] + usage["completion_tokens"]
        body = {"model": "claude-test", "max_tokens": 40, "messages": MESSAGES, "stream": True}
        status, headers, raw, _ = await post(session, b.url + "/v1/messages", body, AN)
        assert status == 200
        assert headers["x-gateway-budget-remaining"] == str(budget - used)  # A's charge, on B
        events = anthropic_stream(raw)
        delta = next(e for n, e in events if n == "message_delta")
        used += events[0][1]["message"]["usage"]["input_tokens"] + delta["usage"]["output_tokens"]
        await b.access_lines(1)  # a stream is settled after its last byte: wait for that
        for gw in (a, b):
            assert (await budgets_of(gw))["tokens_per_day"]["used"] == used
            assert (await budgets_of(gw))["backend"] == "redis"

        # Two long streams at once, one per instance, spend what is left: both are cut, and
        # together they overshoot by no more than an event each (plus one charge in flight).
        async def long_stream(gw: Served) -> tuple[int, bytes]:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            data = orjson.dumps(body)
            async with session.post(
                gw.url + "/v1/chat/completions", data=data, headers={**OA, **LONG}
            ) as resp:
                assert resp.status == 200
                return len(data), await resp.read()

        results = await asyncio.gather(long_stream(a), long_stream(b))
        for gw in (a, b):
            lines = await gw.access_lines(2)
            assert "degraded" not in str(lines[-1].get("limiter"))
        charged = 0
        for size, raw in results:
            chunks, last = chat_stream(raw)
            assert last["error"]["code"] == "budget_exceeded"
            charged += math.ceil(size / 4) + sum(tokens(t) for t in chat_content(chunks))
        total = (await budgets_of(a))["tokens_per_day"]["used"]
        assert total == used + charged  # exactly what the two clients got, no more
        assert total >= budget
        assert total - budget <= 12, total  # a few events at most, across both streams
        assert (await budgets_of(b))["tokens_per_day"]["used"] == total
        for gw in (a, b):
            await expect_429(session, gw, fake)


def decoded(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event, whatever the framing (the gateway's own decoder is
    the reference SSE parser here; what is checked is what the events say)."""
    events = SSEDecoder().feed(raw + b"\n\n")
    return [(e.event, orjson.loads(e.data)) for e in events if e.data != b"[DONE]"]


def output_texts(api: str, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    if api == "chat":
        return chat_content([data for _, data in events])
    if api == "responses":
        return [d["delta"] for n, d in events if n == "response.output_text.delta"]
    return [d["delta"]["text"] for n, d in events if n == "content_block_delta"]


@pytest.mark.parametrize(
    ("api", "line_ending", "extra"),
    [
        ("chat", "crlf", {}),
        ("chat", "cr", {}),
        ("responses", "lf", {}),
        ("anthropic", "crlf", {}),
        # Resume with ids injected: the injector holds what follows a split line end.
        ("chat", "crlf", {"resume": {"enabled": True, "inject_ids": True}}),
        # No gap: the first read (held until its first event is whole) carries many events,
        # and the cut falls inside it; the terminal event is numbered after the last kept.
        ("responses", "lf", {"gap": True, "budget": 30}),
    ],
    ids=["chat-crlf", "chat-cr", "responses", "anthropic-crlf", "chat-ids", "responses-held"],
)
async def test_a_cut_is_whole_for_every_api_and_framing_and_any_chunking(
    fake: Fake, serve: Any, api: str, line_ending: str, extra: dict[str, Any]
) -> None:
    """Reads split anywhere (inside events, inside line ends) and CR / CRLF framing: the
    stream still ends right after the event that spent the budget, with one whole terminal
    event in the caller's format (Responses: numbered after the last event)."""
    budget = extra.pop("budget", 90)
    script = {**LONG, "x-fake-line-ending": line_ending, "x-fake-split-seed": "7"}
    if extra.pop("gap", None):
        script = {**LONG, "x-fake-gap-ms": "0"}
    async with serve(budget_config(fake, {"tokens_per_day": budget}, **extra)) as gw:
        async with aiohttp.ClientSession() as session:
            if api == "anthropic":
                url, headers = gw.url + "/v1/messages", {**AN, **script}
                body: dict[str, Any] = {
                    "model": "claude-test",
                    "max_tokens": 900,
                    "messages": MESSAGES,
                    "stream": True,
                }
            else:
                path = "/v1/chat/completions" if api == "chat" else "/v1/responses"
                url, headers = gw.url + path, {**OA, **script}
                body = {"model": "gpt-test", "stream": True}
                body["messages" if api == "chat" else "input"] = MESSAGES
            status, _, raw, size = await post(session, url, body, headers)
            assert status == 200
        if extra.get("resume"):
            raw = b"".join(line + b"\n" for line in raw.split(b"\n") if not line.startswith(b"id:"))
        events = decoded(raw)
        name, last = events[-1]
        if api == "chat":
            assert last["error"]["code"] == "budget_exceeded"
        elif api == "responses":
            assert name == "error" and last["code"] == "budget_exceeded"
            assert last["sequence_number"] == events[-2][1]["sequence_number"] + 1
        else:
            assert name == "error" and last["error"]["type"] == "budget_exceeded"
        assert raw.endswith(b"\r\n\r\n" if line_ending == "crlf" else b"\n\n") or raw.endswith(
            b"\n\n"
        )
        counted = [tokens(t) for t in output_texts(api, events[:-1])]
        if api == "anthropic":
            prompt = events[0][1]["message"]["usage"]["input_tokens"]
        else:
            prompt = math.ceil(size / 4)
        charged = prompt + sum(counted)
        assert charged >= budget and charged - counted[-1] < budget, (prompt, counted)
        (line,) = await gw.access_lines(1)
        assert line["outcome"] == "budget_exceeded" and line.get("budget_tokens") == charged, line


async def test_many_short_streams_of_one_caller_see_each_other_at_once(
    fake: Fake, serve: Any
) -> None:
    """Ten concurrent streams of one caller, shorter than a charge interval: on one
    instance they share one tally, so together they stop at the budget (each overshooting by
    at most its last event), not at ten times it."""
    budget = 1000
    async with serve(budget_config(fake, {"tokens_per_day": budget})) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            headers = {**OA, "x-fake-chunks": "120", "x-fake-gap-ms": "1"}

            async def one() -> tuple[int, bytes]:
                status, _, raw, size = await post(
                    session, gw.url + "/v1/chat/completions", body, headers
                )
                assert status == 200
                return size, raw

            results = await asyncio.gather(*(one() for _ in range(10)))
        lines = await gw.access_lines(10)
        charged = sum(line["budget_tokens"] for line in lines)
        got = 0
        for size, raw in results:
            chunks, last = chat_stream(raw)
            assert "error" in last or raw.endswith(b"[DONE]\n\n")
            got += math.ceil(size / 4) + sum(tokens(t) for t in chat_content(chunks))
        assert charged == got  # each charged what its client got
        assert budget <= charged <= budget + 10 * 3, charged  # one event (<= 3 tokens) each
        assert (await budgets_of(gw))["tokens_per_day"]["used"] == charged


async def test_a_drained_stream_is_charged_the_upstream_usage(fake: Fake, serve: Any) -> None:
    """Resume on: the client goes away mid-stream, the gateway reads the upstream to its end
    (as if the client had stayed) and charges the usage the upstream reported."""
    config = budget_config(fake, {"tokens_per_day": 100_000}, resume={"enabled": True})
    async with serve(config) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
            headers = {**OA, "x-fake-chunks": "60", "x-fake-gap-ms": "10"}
            async with session.post(
                gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
            ) as resp:
                assert resp.status == 200
                await resp.content.readany()  # a little, then the client is gone
        (line,) = await gw.access_lines(1, timeout_s=15)
        assert line["drained"] is True and line["drain_outcome"] == "ok"
        usage = line["input_tokens"] + line["output_tokens"]
        assert line["budget_tokens"] == usage
        assert (await budgets_of(gw))["tokens_per_day"]["used"] == usage


async def test_the_sdks_with_their_default_retries_raise_at_once_on_a_spent_budget(
    fake: Fake, serve: Any
) -> None:
    """retry-after says "midnight": the SDKs must not sleep until then (the Anthropic SDK
    honours retry-after without a cap). The 429 says x-should-retry: false, and both SDKs
    raise RateLimitError at once, with the budget named."""
    async with serve(budget_config(fake, {"tokens_per_day": 1})) as gw:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-test", "messages": MESSAGES}
            status, _, _, _ = await post(session, gw.url + "/v1/chat/completions", body, OA)
            assert status == 200  # this one spends the budget
        started = time.monotonic()
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CALLER_KEY) as client:
            with pytest.raises(openai.RateLimitError) as oa_err:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert oa_err.value.code == "budget_exceeded"
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CALLER_KEY) as aclient:
            with pytest.raises(anthropic.RateLimitError) as an_err:
                await aclient.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)
        assert "budget" in an_err.value.message.lower()
        assert time.monotonic() - started < 5  # no retry slept through retry-after
        assert len(fake.provider.records) == 1
