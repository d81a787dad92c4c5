"""The edge: bounded body reading, the parse-cost bound, and the fields the gateway acts on."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.edge import (
    BodyBudget,
    BodyLimits,
    parse_cost_error,
    parse_request,
    too_deep,
)
from gateway.errors import GatewayError, Kind
from gateway.providers.anthropic import ENDPOINTS as ANTHROPIC_ENDPOINTS
from gateway.providers.openai import ENDPOINTS as OPENAI_ENDPOINTS

CHAT, COMPLETIONS, RESPONSES, _EMBEDDINGS = OPENAI_ENDPOINTS
MESSAGES = ANTHROPIC_ENDPOINTS[0]
LIMITS = BodyLimits(
    max_bytes=32 * 1024 * 1024,
    timeout_s=30,
    max_containers=100_000,
    max_depth=128,
    in_flight_bytes=64 * 1024 * 1024,
)
MiB = 1024 * 1024


def hostile(unit: bytes, size: int = 31 * MiB) -> bytes:
    return b'{"model":"gpt-test","x":[' + unit * (size // len(unit)) + b"0]}"


# --- the parse-cost bound ----------------------------------------------------------------------


@pytest.mark.parametrize("unit", [b"{},", b"[],", b'"a",', b"1,", b"1.5,", b"null,", b'{"a":1},'])
def test_bodies_of_tiny_values_are_refused_before_parsing(unit: bytes) -> None:
    problem = parse_cost_error(hostile(unit), 100_000)
    assert problem is not None
    assert "JSON" in problem


def test_container_bound_is_configurable() -> None:
    body = b'{"model":"m","x":[' + b"{}," * 999 + b"{}]}"
    assert parse_cost_error(body, 2000) is None
    problem = parse_cost_error(body, 500)
    assert problem is not None and "more than 500 JSON objects and arrays" in problem


def test_large_prompts_and_conversations_pass() -> None:
    big = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "word, " * (5 * MiB)}]}
    )
    assert len(big) > 30 * MiB
    assert parse_cost_error(big, 100_000) is None  # commas inside the string do not count
    chat = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": f"message {i}: " + "lorem ipsum " * 20}
                for i in range(20_000)
            ],
        }
    )
    assert parse_cost_error(chat, 100_000) is None


def test_code_with_braces_inside_strings_is_counted_exactly() -> None:
    code = "function f(a, b) { return [a, {b}]; }\n" * 800_000  # ~30 MiB, 5M brackets+commas
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": code}]})
    assert parse_cost_error(body, 100_000) is None


def test_token_id_arrays_for_embeddings_pass() -> None:
    # OpenAI allows 300k tokens in one embeddings request; callers like LangChain send ids.
    body = orjson.dumps({"model": "m", "input": [list(range(10_000, 18_192))] * 36})
    assert parse_cost_error(body, 100_000) is None


def test_many_short_strings_are_refused_without_a_per_string_scan() -> None:
    body = hostile(b'"a",')
    problem = parse_cost_error(body, 100_000)
    assert problem is not None and "tiny values" in problem


# --- depth ----------------------------------------------------------------------------------


def test_depth_is_measured_without_recursion() -> None:
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    assert too_deep(deep, 128)
    shallow: object = 1
    for _ in range(128):  # 128 containers deep: at the bound
        shallow = {"a": shallow}
    assert not too_deep(shallow, 128)
    assert too_deep({"a": shallow}, 128)


@pytest.mark.parametrize("depth", [129, 255, 256, 600, 1000])
def test_deep_bodies_are_a_400_not_a_500(depth: int) -> None:
    raw = b'{"model":"m","x":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(GatewayError) as err:
        parse_request(CHAT, raw, {}, LIMITS)
    assert err.value.status == 400
    assert err.value.kind is Kind.INVALID_REQUEST


def test_depth_at_the_bound_passes() -> None:
    raw = b'{"model":"m","x":' + b"[" * 127 + b"]" * 127 + b"}"  # 128 with the body itself
    assert parse_request(CHAT, raw, {}, LIMITS).model == "m"
    # ... which the serializer of the upstream request handles (its own limit is 254).
    assert orjson.dumps(orjson.loads(raw))


# --- fields the gateway acts on --------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        (CHAT, "max_tokens"),
        (CHAT, "max_completion_tokens"),
        (COMPLETIONS, "max_tokens"),
        (RESPONSES, "max_output_tokens"),
        (MESSAGES, "max_tokens"),
        (CHAT, "n"),
        (COMPLETIONS, "n"),
        (COMPLETIONS, "best_of"),
    ],
)
@pytest.mark.parametrize(
    "value", [b"5000.0", b'"5000"', b"5e3", b"18446744073709551616", b"true", b"-1", b"0"]
)
def test_caps_and_choice_counts_must_be_integers_in_range(
    endpoint: object, field: str, value: bytes
) -> None:
    raw = b'{"model":"m","' + field.encode() + b'":' + value + b"}"
    with pytest.raises(GatewayError) as err:
        parse_request(endpoint, raw, {}, LIMITS)  # type: ignore[arg-type]
    assert err.value.status == 400
    assert err.value.param == field


def test_valid_integers_and_null_pass() -> None:
    raw = b'{"model":"m","max_tokens":5000,"n":3,"max_completion_tokens":null}'
    parsed = parse_request(CHAT, raw, {}, LIMITS)
    assert parsed.body["max_tokens"] == 5000 and parsed.body["n"] == 3


# --- the shared body budget ---------------------------------------------------------------------


async def test_budget_makes_readers_wait_in_order_and_lets_them_go() -> None:
    budget = BodyBudget(100)
    await budget.acquire(80)
    order: list[str] = []

    async def reader(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    first = asyncio.create_task(reader("first", 50))
    second = asyncio.create_task(reader("second", 10))  # fits, but waits its turn
    await asyncio.sleep(0.01)
    assert order == [] and budget.used == 80
    budget.release(80)
    await asyncio.gather(first, second)
    assert order == ["first", "second"] and budget.used == 60


async def test_a_cancelled_waiter_takes_nothing_and_blocks_nobody() -> None:
    budget = BodyBudget(100)
    await budget.acquire(100)
    waiter = asyncio.create_task(budget.acquire(60))
    behind = asyncio.create_task(budget.acquire(30))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    budget.release(50)
    await asyncio.wait_for(behind, 1)
    assert budget.used == 80


async def test_capacity_follows_the_configuration() -> None:
    budget = BodyBudget(10)
    budget.capacity = 1000  # a reload raised it: readers see it at once
    await asyncio.wait_for(budget.acquire(500), 1)
    assert budget.used == 500


async def test_a_reader_that_cannot_get_budget_in_time_is_told_503() -> None:
    from aiohttp import ClientSession, web

    from gateway.edge import read_body

    budget = BodyBudget(1024 * 1024)
    limits = BodyLimits(
        max_bytes=1024 * 1024,
        timeout_s=0.5,
        max_containers=100,
        max_depth=8,
        in_flight_bytes=1024 * 1024,
    )

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, limits, budget)
        except GatewayError as err:
            return web.Response(status=err.status, text=err.message)
        body.release()
        return web.Response(text=str(len(body.data)))

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://{}:{}/".format(*runner.addresses[0][:2])
    try:
        await budget.acquire(1024 * 1024)  # every byte held by "other readers"
        async with ClientSession() as session:
            async with session.post(url, data=b"x" * 1000) as resp:
                assert resp.status == 503
                assert "too many request bodies" in await resp.text()
            assert budget.used == 1024 * 1024  # the refused reader holds nothing
            budget.release(1024 * 1024)
            async with session.post(url, data=b"x" * 1000) as resp:
                assert resp.status == 200 and await resp.text() == "1000"
        assert budget.used == 0
    finally:
        await runner.cleanup()
