"""Regression tests for what outside testing found (issue [5/10]), each through a real
`gateway serve` process: memory and time bounds, limits that could be sidestepped, answers
that reached the caller wrong, and the Failover Bench cases S11 and S12."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    Served,
    base_config,
    deep_merge,
    serve_gateway,
)

MiB = 1024 * 1024
OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
AN = {"x-api-key": CALLER_KEY, "anthropic-version": "2023-06-01"}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def serve(fake: Fake, tmp_path: Path) -> Any:
    """`async with serve(extra) as gw`: a real `gateway serve` on the base config + `extra`."""

    def start(extra: dict[str, Any] | None = None) -> Any:
        return serve_gateway(deep_merge(base_config(fake.url), extra or {}), tmp_path)

    return start


async def post(
    url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    payload: Any = io.BytesIO(data) if len(data) > MiB else data  # large: not one raw write
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=payload, headers=headers or OA) as resp,
    ):
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def chat(model: str = "gpt-test", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **fields}


async def access_lines(gw: Served, n: int) -> list[dict[str, Any]]:
    """The gateway's JSON log lines, once `n` access lines are written (within 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [orjson.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
        if sum(line.get("event") == "request" for line in lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"fewer than {n} access lines"
        await asyncio.sleep(0.05)


async def scrape(gw: Served) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


# --- 1. memory bounds of one body, and of all bodies being read ------------------------------


def hostile(unit: bytes, size: int = 31 * MiB) -> bytes:
    return b'{"model":"gpt-test","messages":[],"x":[' + unit * (size // len(unit)) + b"0]}"


BIG = {"server": {"max_request_bytes": 32 * MiB}}


@pytest.mark.parametrize("unit", [b"{},", b"[],", b'"a",', b"1,", b"1.5,"], ids=repr)
async def test_a_body_of_tiny_values_costs_at_most_4x_its_size(
    serve: Any, fake: Fake, unit: bytes
) -> None:
    body = hostile(unit)
    async with serve(BIG) as gw:
        await post(gw.url + "/v1/chat/completions", chat())  # warm up
        before = gw.rss_bytes("VmRSS")
        gw.reset_peak_rss()
        status, _, raw = await post(gw.url + "/v1/chat/completions", body)
        growth = gw.rss_bytes("VmHWM") - before
    assert status == 413, raw[:300]
    assert orjson.loads(raw)["error"]["code"] == "request_too_large"
    print(f"{unit!r}: body {len(body) / MiB:.1f} MiB, peak RSS growth {growth / MiB:.1f} MiB")
    assert growth <= 4 * len(body)
    assert len(fake.provider.records) == 1  # the warm-up only


async def test_a_large_real_prompt_is_served_within_4x_its_size(serve: Any, fake: Fake) -> None:
    body = orjson.dumps(
        chat(messages=[{"role": "user", "content": "lorem ipsum, " * (31 * MiB // 13)}])
    )
    async with serve(BIG) as gw:
        await post(gw.url + "/v1/chat/completions", chat())
        before = gw.rss_bytes("VmRSS")
        gw.reset_peak_rss()
        status, _, raw = await post(gw.url + "/v1/chat/completions", body)
        growth = gw.rss_bytes("VmHWM") - before
    assert status == 200, raw[:300]
    print(f"prompt: body {len(body) / MiB:.1f} MiB, peak RSS growth {growth / MiB:.1f} MiB")
    assert growth <= 4 * len(body)


async def test_bodies_being_read_at_once_share_a_bounded_budget(serve: Any) -> None:
    config = {
        "server": {
            "max_request_bytes": 2 * MiB,
            "max_body_bytes_in_flight": 4 * MiB,
            "body_timeout_s": 3,
        }
    }
    async with serve(config) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        # Two uploads that send most of a 2 MiB body, then stall: 3.8 MiB held.
        stalled = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {CALLER_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {2 * MiB}\r\n\r\n"
            )
            writer.write(head.encode() + b" " * (19 * MiB // 10))
            await writer.drain()
            stalled.append((reader, writer))
        await asyncio.sleep(0.5)
        # A third request's body does not fit: it waits for the budget until the stalled
        # uploads are cut at their body timeout (408), then goes through.
        small = orjson.dumps(chat(messages=[{"role": "user", "content": "x" * MiB}]))
        started = time.monotonic()
        status, _, raw = await post(gw.url + "/v1/chat/completions", small)
        waited = time.monotonic() - started
        assert status == 200, raw[:300]
        assert waited >= 2, waited  # held back while the budget was spent
        for reader, writer in stalled:
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            writer.close()
        # The budget is whole again: the same request goes through at once.
        started = time.monotonic()
        status, _, _ = await post(gw.url + "/v1/chat/completions", small)
        assert status == 200
        assert time.monotonic() - started < waited


# --- 2. a body that trickles; idle connections and slow headers keep their bounds ------------


async def raw_exchange(
    port: int, head: bytes, *, trickle: bytes = b"", every_s: float = 2.0, limit_s: float = 15
) -> tuple[bytes, float]:
    """Send `head`, then `trickle` one byte every `every_s`; returns what came back and when
    the connection closed (seconds after the head was sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    started = time.monotonic()

    async def dribble() -> None:
        for byte in trickle:
            await asyncio.sleep(every_s)
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return

    task = asyncio.create_task(dribble())
    try:
        answer = await asyncio.wait_for(reader.read(), limit_s)
    finally:
        task.cancel()
        writer.close()
    return answer, time.monotonic() - started


@pytest.mark.parametrize(
    ("path", "auth", "fmt"),
    [
        ("/v1/chat/completions", f"Authorization: Bearer {CALLER_KEY}", "openai"),
        ("/v1/messages", f"x-api-key: {CALLER_KEY}\r\nanthropic-version: 2023-06-01", "anthropic"),
    ],
)
async def test_a_trickling_body_gets_a_408_and_the_connection_closed(
    serve: Any, path: str, auth: str, fmt: str
) -> None:
    async with serve({"server": {"body_timeout_s": 3}}) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        ).encode()
        answer, closed_after = await raw_exchange(port, head, trickle=b'"model"' * 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"Connection: close" in answer or b"connection: close" in answer.lower()
    body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    if fmt == "openai":
        assert body["error"]["code"] == "request_timeout"
    else:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "3 s" in (body["error"]["message"])
    assert 2.5 <= closed_after <= 8


async def test_idle_keepalive_and_slow_headers_are_closed(serve: Any) -> None:
    async with serve({"server": {"keepalive_timeout_s": 2}}) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        # A connection that never sends anything.
        answer, idle_closed = await raw_exchange(port, b"")
        assert answer == b""
        # Headers one byte every second: never complete, closed at the keep-alive bound.
        answer, slow_closed = await raw_exchange(
            port, b"GET /healthz HTTP/1.1\r\n", trickle=b"Host: x\r\n" * 3, every_s=1
        )
        assert answer == b""
    assert 1.5 <= idle_closed <= 6
    assert 1.5 <= slow_closed <= 6


# --- 3. one caller's hanging requests cannot take every upstream connection ----------------


async def test_concurrent_requests_bound_every_request_of_a_caller(serve: Any, fake: Fake) -> None:
    from tests.support import OTHER_CALLER_KEY

    config = {
        "server": {"max_upstream_connections": 3},
        "tiers": {"t": {"concurrent_requests": 2, "concurrent_streams": 2}},
        "auth": {"default_tier": "t"},
    }
    hang = {**OA, "x-fake-stall-after": "0"}  # non-stream: the upstream never answers
    async with serve(config) as gw:
        url = gw.url + "/v1/chat/completions"
        hanging = [asyncio.create_task(post(url, chat(), hang)) for _ in range(2)]
        await fake.provider.wait_for_records(2, timeout=5)
        status, headers, raw = await post(url, chat(), hang)
        assert status == 429, raw
        answer = orjson.loads(raw)
        assert "concurrent requests" in answer["error"]["message"]
        assert headers["retry-after"] == "1"
        assert '"requests";q=2' in headers["RateLimit-Policy"]
        # Another caller still has the upstream connection pool to itself.
        other = {"authorization": f"Bearer {OTHER_CALLER_KEY}"}
        status, _, raw = await post(url, chat(), other)
        assert status == 200, raw
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        # The slots come back when those requests end (here: their clients went away).
        deadline = time.monotonic() + 5
        while True:
            status, _, _ = await post(url, chat())
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert status == 200


# --- 5. unknown model names never become metric label values --------------------------------


async def test_unknown_model_names_share_one_metric_label(serve: Any) -> None:
    async with serve() as gw:
        for i in range(50):
            status, _, _ = await post(gw.url + "/v1/chat/completions", chat(f"random-{i}-x"))
            assert status == 404
        await post(gw.url + "/v1/chat/completions", chat())
        families = await scrape(gw)
    models = {
        s.labels["gen_ai_request_model"]
        for family in families.values()
        for s in family.samples
        if "gen_ai_request_model" in s.labels
    }
    assert models == {"unknown", "gpt-test"}
    requests = {
        (s.labels["gen_ai_request_model"], s.labels["outcome"]): s.value
        for s in families["llm_gateway_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("unknown", "invalid_request")] == 50


# --- 6/7. output caps and choices cannot be sidestepped --------------------------------------


@pytest.mark.parametrize("value", ["5000.0", '"5000"', "5e3", "18446744073709551616", "true"])
@pytest.mark.parametrize(
    ("path", "field", "headers"),
    [
        ("/v1/chat/completions", "max_tokens", OA),
        ("/v1/chat/completions", "max_completion_tokens", OA),
        ("/v1/responses", "max_output_tokens", OA),
        ("/v1/messages", "max_tokens", {**AN, "content-type": "application/json"}),
    ],
)
async def test_non_integer_output_caps_are_a_400_in_the_callers_format(
    serve: Any, fake: Fake, value: str, path: str, field: str, headers: dict[str, str]
) -> None:
    model = "claude-test" if path == "/v1/messages" else "gpt-test"
    extra = (
        '"input":"hi"'
        if path == "/v1/responses"
        else f'"messages":{orjson.dumps(MESSAGES).decode()}'
    )
    body = f'{{"model":"{model}",{extra},"{field}":{value}}}'.encode()
    async with serve() as gw:
        status, resp_headers, raw = await post(gw.url + path, body, headers)
    assert status == 400, raw
    answer = orjson.loads(raw)
    if path == "/v1/messages":
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
        assert resp_headers["request-id"].startswith("req_")
    else:
        assert answer["error"]["param"] == field
        assert resp_headers["x-request-id"].startswith("req_")
    assert field in answer["error"]["message"]
    assert fake.provider.records == []


async def test_integer_caps_above_the_cap_are_clamped(serve: Any, fake: Fake) -> None:
    async with serve() as gw:  # max_tokens_cap: 1000
        status, _, _ = await post(gw.url + "/v1/chat/completions", chat(max_tokens=2**31 - 1))
    assert status == 200
    assert orjson.loads(fake.provider.records[0].body)["max_tokens"] == 1000


def remaining_tokens(headers: CIMultiDict[str]) -> int:
    match = re.search(r'"tpm";r=(\d+)', headers["RateLimit"])
    assert match, headers
    return int(match.group(1))


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/chat/completions", {"n": 50}),
        ("/v1/completions", {"n": 5, "best_of": 50}),
    ],
)
async def test_the_token_reservation_covers_every_choice(
    serve: Any, path: str, fields: dict[str, int]
) -> None:
    config = {"tiers": {"t": {"tokens_per_minute": 1_000_000}}, "auth": {"default_tier": "t"}}
    payload = {"model": "gpt-test", "max_tokens": 100, **fields}
    payload["messages" if path.endswith("chat/completions") else "prompt"] = (
        MESSAGES if path.endswith("chat/completions") else "hi"
    )
    body = orjson.dumps(payload)
    async with serve(config) as gw:
        status, headers, raw = await post(gw.url + path, body)
    assert status == 200, raw
    reserved = 1_000_000 - remaining_tokens(headers)
    # The prompt estimate (bytes / 4) plus the output cap for each of the 50 generations.
    expected = -(-len(body) // 4) + 50 * 100
    assert abs(reserved - expected) <= 2, (reserved, expected)


# --- 9. deep JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [255, 256, 1000, 5000])
async def test_deeply_nested_json_is_a_400_in_both_formats(
    serve: Any, fake: Fake, depth: int
) -> None:
    nested = b"[" * depth + b"]" * depth
    async with serve() as gw:
        status, _, raw = await post(
            gw.url + "/v1/chat/completions", b'{"model":"gpt-test","x":' + nested + b"}"
        )
        assert status == 400, raw
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
        status, _, raw = await post(
            gw.url + "/v1/messages",
            b'{"model":"claude-test","max_tokens":5,"x":' + nested + b"}",
            {**AN, "content-type": "application/json"},
        )
        assert status == 400, raw
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"
        log = gw.log_text()
    assert "Traceback" not in log
    assert fake.provider.records == []


# --- 12. large Authorization headers --------------------------------------------------------


async def test_oversized_headers_get_json_and_are_never_logged(serve: Any, fake: Fake) -> None:
    secret_ish = "gw-huge-header-secret-" + "z" * 20_000
    async with serve() as gw:
        status, headers, raw = await post(
            gw.url + "/v1/chat/completions",
            chat(),
            {"authorization": f"Bearer {secret_ish}", "content-type": "application/json"},
        )
        # Unparseable requests cannot tell their caller's API: one body both SDKs read.
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=secret_ish, max_retries=0
        ) as client:
            with pytest.raises(openai.APIStatusError) as oa_err:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=secret_ish, max_retries=0
        ) as aclient:
            with pytest.raises(anthropic.APIStatusError) as an_err:
                await aclient.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)
        log = gw.log_text()
    assert status == 431
    body = orjson.loads(raw)
    assert body["error"]["type"] == "invalid_request_error" and body["type"] == "error"
    assert secret_ish[:30] not in raw.decode()
    assert headers["x-request-id"] == body["request_id"]
    assert oa_err.value.status_code == 431 and oa_err.value.request_id is not None
    assert an_err.value.status_code == 431
    assert "zzzzzzzz" not in log and "Traceback" not in log
    assert "malformed request" in log
    assert fake.provider.records == []


async def test_jwts_up_to_the_configured_size_work(serve: Any, fake: Fake) -> None:
    import jwt as pyjwt

    from tests.support import JWT_TEST_SECRET

    config = {
        "auth": {
            "jwt": {
                "issuer": "https://issuer.test/",
                "audience": "llm-gateway",
                "algorithms": ["HS256"],
                "secret": JWT_TEST_SECRET,
                "max_token_bytes": 32768,
            }
        }
    }
    now = int(time.time())
    token = pyjwt.encode(
        {
            "sub": "big-claims",
            "iss": "https://issuer.test/",
            "aud": "llm-gateway",
            "iat": now,
            "exp": now + 600,
            "groups": ["g" * 40] * 400,  # ~17 KiB of claims
        },
        JWT_TEST_SECRET,
        algorithm="HS256",
    )
    assert 16_000 < len(token) < 32_768
    async with serve(config) as gw:
        status, _, raw = await post(
            gw.url + "/v1/chat/completions",
            chat(),
            {"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
    assert status == 200, raw[:300]


# --- 14. the gateway's own Responses error event ---------------------------------------------


async def test_a_truncated_responses_stream_ends_with_a_numbered_error_event(
    serve: Any,
) -> None:
    from openai.types.responses import ResponseErrorEvent

    async with serve() as gw:
        status, _, raw = await post(
            gw.url + "/v1/responses",
            {"model": "gpt-test", "input": "hi", "stream": True},
            {**OA, "x-fake-truncate-after": "3"},
        )
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
        ) as client:
            stream = await client.responses.create(
                model="gpt-test",
                input="hi",
                stream=True,
                extra_headers={"x-fake-truncate-after": "3"},
            )
            events = [event async for event in stream]
    assert status == 200
    blocks = [b for b in raw.split(b"\n\n") if b]
    numbers = [orjson.loads(b.split(b"data: ", 1)[1])["sequence_number"] for b in blocks]
    last = orjson.loads(blocks[-1].split(b"data: ", 1)[1])
    assert last["type"] == "error"
    ResponseErrorEvent.model_validate(last, strict=True)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gap, no repeat
    assert events[-1].type == "error"
    assert "ended the stream before it was complete" in events[-1].message  # type: ignore[union-attr]


# --- 15/16. model listing and retrieval per API -----------------------------------------------


async def test_models_are_listed_and_retrieved_in_each_api(serve: Any) -> None:
    async with serve() as gw:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
        ) as client:
            listed = sorted([m.id async for m in client.models.list()])
            one = await client.models.retrieve("gpt-test")
            with pytest.raises(openai.NotFoundError) as oa_missing:
                await client.models.retrieve("no-such-model")
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("claude-test")  # served by the other API
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=CALLER_KEY, max_retries=0
        ) as aclient:
            page = await aclient.models.list()
            aone = await aclient.models.retrieve("claude-test")
            with pytest.raises(anthropic.NotFoundError) as an_missing:
                await aclient.models.retrieve("gpt-test")
    assert listed == ["embed-test", "gpt-test"]
    assert one.id == "gpt-test" and one.object == "model"
    assert [m.id for m in page.data] == ["claude-test"]
    assert aone.id == "claude-test" and aone.type == "model"
    assert oa_missing.value.code == "model_not_found"
    assert an_missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert oa_missing.value.request_id is not None
    assert an_missing.value.request_id is not None


# --- 17. every answer carries a request id that the access log has too ----------------------


async def test_every_answer_has_a_request_id_the_access_log_knows(serve: Any) -> None:
    async with serve() as gw:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="wrong-key", max_retries=0
        ) as client:
            with pytest.raises(openai.AuthenticationError) as auth_err:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
        ) as client:
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="nope", messages=MESSAGES)
            ok = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=MESSAGES
            )
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key="wrong-key", max_retries=0
        ) as aclient:
            with pytest.raises(anthropic.AuthenticationError) as an_auth:
                await aclient.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/no/such/path") as resp:
                route_id = resp.headers.get("x-request-id")
        lines = await access_lines(gw, 4)
    logged = {line.get("request_id") for line in lines if line.get("event") == "request"}
    logged |= {line.get("upstream_request_id") for line in lines if line.get("event") == "request"}
    for request_id in (auth_err.value.request_id, missing.value.request_id, ok.request_id):
        assert request_id is not None
        assert request_id in logged
    assert an_auth.value.request_id is not None and an_auth.value.request_id in logged
    assert an_auth.value.body["request_id"] == an_auth.value.request_id  # type: ignore[index]
    assert route_id is not None and route_id.startswith("req_")


# --- 18. timing figures are not quantised to milliseconds ------------------------------------


async def test_timing_figures_have_sub_millisecond_resolution(serve: Any) -> None:
    figures = []
    async with serve() as gw:
        for _ in range(20):
            _, headers, _ = await post(
                gw.url + "/v1/chat/completions", chat(stream=True), {**OA, "x-fake-chunks": "2"}
            )
            figures.append(float(headers["x-gateway-overhead-ms"]))
        lines = await access_lines(gw, 20)
    ttfts = [line["ttft_ms"] for line in lines if "ttft_ms" in line]
    assert len(ttfts) == 20
    # Under uvloop the loop clock ticks in whole milliseconds; these figures must not.
    assert any(f != round(f) for f in figures), figures
    assert any(t != round(t) for t in ttfts), ttfts
    assert all(0 < f < 1000 for f in figures)


# --- S12. a prompt too long for one model moves on to another model --------------------------


def context_config(fake: Fake, models: list[str]) -> dict[str, Any]:
    return {
        "models": {
            "ctx": [{"provider": "oa", "model": m} for m in models],
            "ctx-an": [{"provider": "an", "model": m} for m in models],
        }
    }


SMALL_OA = "fake-small@status=400,error_code=context_length_exceeded"
SMALL_AN = (
    "fake-small@status=400,error_type=invalid_request_error,"
    "error_message=prompt is too long: 250000 tokens > 200000 maximum"
)


async def test_context_length_exceeded_moves_to_a_model_that_differs(
    serve: Any, fake: Fake
) -> None:
    async with serve(context_config(fake, [SMALL_OA, SMALL_OA, "fake-big"])) as gw:
        status, headers, raw = await post(gw.url + "/v1/chat/completions", chat("ctx"))
    assert status == 200, raw
    assert headers["x-gateway-attempts"] == "2"  # the same model is never tried again
    assert [orjson.loads(r.body)["model"] for r in fake.provider.records] == [SMALL_OA, "fake-big"]


async def test_context_length_exceeded_on_anthropic_moves_on_too(serve: Any, fake: Fake) -> None:
    async with serve(context_config(fake, [SMALL_AN, "fake-big"])) as gw:
        status, _, raw = await post(
            gw.url + "/v1/messages",
            {"model": "ctx-an", "max_tokens": 5, "messages": MESSAGES},
            {**AN, "content-type": "application/json"},
        )
    assert status == 200, raw
    assert len(fake.provider.records) == 2


async def test_context_length_exceeded_with_no_other_model_passes_the_400(
    serve: Any, fake: Fake
) -> None:
    async with serve(context_config(fake, [SMALL_OA, SMALL_OA])) as gw:
        status, _, raw = await post(gw.url + "/v1/chat/completions", chat("ctx"))
    assert status == 400
    assert orjson.loads(raw)["error"]["code"] == "context_length_exceeded"
    assert len(fake.provider.records) == 1


# --- a 403 the request itself causes leaves the key in rotation -------------------------------


async def test_a_permission_403_does_not_disable_the_key(serve: Any, fake: Fake) -> None:
    model = "fake-gpt@status=403,error_type=permission_error,error_message=not entitled to beta"
    config = {
        "models": {"perm": [{"provider": "oa", "model": model}]},
    }
    async with serve(config) as gw:
        status, _, raw = await post(gw.url + "/v1/chat/completions", chat("perm"))
        # Every key was tried once (the next may be entitled), then the 403 itself.
        assert status == 403, raw
        assert orjson.loads(raw)["error"]["message"] == "not entitled to beta"
        assert len(fake.provider.records) == len(UPSTREAM_KEYS)
        families = await scrape(gw)
        status, _, _ = await post(gw.url + "/v1/chat/completions", chat())
        assert status == 200
    states = {
        (s.labels["key_id"], s.labels["state"]): s.value
        for s in families["llm_gateway_upstream_key_state"].samples
        if s.labels["gen_ai_provider_name"] == "oa"
    }
    assert states[("oa-1", "ok")] == 1 and states[("oa-2", "ok")] == 1
    assert "upstream key disabled" not in gw.log_text()


# --- 4. the usage stripper holds a bounded amount ----------------------------------------------


async def test_a_huge_sse_line_under_the_usage_stripper_is_relayed_with_bounded_memory(
    serve: Any,
) -> None:
    config = {"tiers": {"t": {"tokens_per_minute": 10_000_000}}, "auth": {"default_tier": "t"}}
    size = 50 * 1000 * 1000
    async with serve(config) as gw:
        await post(gw.url + "/v1/chat/completions", chat(stream=True))  # warm up
        before = gw.rss_bytes("VmRSS")
        gw.reset_peak_rss()
        started = time.process_time()
        status, _, raw = await post(
            gw.url + "/v1/chat/completions",
            chat(stream=True),
            {**OA, "x-fake-event-bytes": str(size), "x-fake-chunks": "3"},
        )
        growth = gw.rss_bytes("VmHWM") - before
        client_cpu = time.process_time() - started
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert max(len(e) for e in events) >= size - 10  # the long event arrived whole
    assert events[-1] == b"data: [DONE]"
    assert b'"error"' not in raw
    print(f"50 MB event: gateway peak RSS growth {growth / MiB:.1f} MiB, client {client_cpu:.1f} s")
    assert growth < 48 * MiB  # never the event itself (was +100-200 MiB)


# --- 10. an upstream that compresses although asked not to --------------------------------------


async def test_compressed_non_stream_answers_are_decoded_and_scrubbed(
    serve: Any, fake: Fake
) -> None:
    async with serve() as gw:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
        ) as client:
            answer = await client.chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                extra_headers={"x-fake-content-encoding": "gzip"},
            )
            assert answer.choices[0].message.content
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="gpt-test",
                    messages=MESSAGES,
                    extra_headers={
                        "x-fake-content-encoding": "deflate",
                        "x-fake-status": "400",
                        "x-fake-echo-key": "true",
                    },
                )
        # A compressed answer inflating past max_response_bytes is refused, not inflated.
    assert fake.provider.records[0].headers.get("accept-encoding") == "identity"
    message = err.value.message
    assert "api key: [redacted]" in message
    assert not any(key in message for key in UPSTREAM_KEYS)


async def test_a_compressed_stream_is_refused_with_a_502(serve: Any, fake: Fake) -> None:
    async with serve() as gw:
        status, headers, raw = await post(
            gw.url + "/v1/chat/completions",
            chat(stream=True),
            {**OA, "x-fake-content-encoding": "gzip"},
        )
        a_status, _, a_raw = await post(
            gw.url + "/v1/messages",
            {"model": "claude-test", "max_tokens": 5, "messages": MESSAGES, "stream": True},
            {**AN, "content-type": "application/json", "x-fake-content-encoding": "gzip"},
        )
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "upstream_error"
    assert "compressed stream" in orjson.loads(raw)["error"]["message"]
    assert headers["x-gateway-attempts"] == "3"  # retried: another key or deployment may not
    assert a_status == 502 and orjson.loads(a_raw)["error"]["type"] == "api_error"


# --- 11. the upstream's key echoed anywhere before the stream is committed ----------------------


async def test_the_upstream_key_echoed_in_a_200_body_is_scrubbed(serve: Any) -> None:
    async with serve() as gw:
        status, _, raw = await post(
            gw.url + "/v1/chat/completions", chat(), {**OA, "x-fake-echo-key": "true"}
        )
        a_status, _, a_raw = await post(
            gw.url + "/v1/messages",
            {"model": "claude-test", "max_tokens": 5, "messages": MESSAGES},
            {**AN, "content-type": "application/json", "x-fake-echo-key": "true"},
        )
    assert status == 200 and a_status == 200
    for body in (raw, a_raw):
        assert b"[redacted]" in body
        assert not any(key.encode() in body for key in UPSTREAM_KEYS)
        assert b"sk-ant-test" not in body


async def test_the_upstream_key_in_a_streams_first_error_event_is_scrubbed(serve: Any) -> None:
    script = {
        "x-fake-error-after": "0",
        "x-fake-error-type": "invalid_request_error",  # not retried: relayed as it came
        "x-fake-echo-key": "true",
    }
    async with serve() as gw:
        status, _, raw = await post(
            gw.url + "/v1/chat/completions", chat(stream=True), {**OA, **script}
        )
        a_status, _, a_raw = await post(
            gw.url + "/v1/messages",
            {"model": "claude-test", "max_tokens": 5, "messages": MESSAGES, "stream": True},
            {**AN, "content-type": "application/json", **script},
        )
    assert status == 200 and a_status == 200
    for body in (raw, a_raw):
        assert b"[redacted]" in body and b'"error"' in body
        assert not any(key.encode() in body for key in UPSTREAM_KEYS)
        assert b"sk-ant-test" not in body


# --- 13. statuses that are not a final HTTP answer ----------------------------------------------


@pytest.mark.parametrize("raw_status", [101, 600, 999])
async def test_upstream_statuses_outside_200_599_are_a_502(
    serve: Any, fake: Fake, raw_status: int
) -> None:
    async with serve({"policy": {"retry": {"max_attempts": 1}}}) as gw:
        started = time.monotonic()
        status, _, raw = await post(
            gw.url + "/v1/chat/completions", chat(), {**OA, "x-fake-raw-status": str(raw_status)}
        )
        elapsed = time.monotonic() - started
        a_status, _, a_raw = await post(
            gw.url + "/v1/messages",
            {"model": "claude-test", "max_tokens": 5, "messages": MESSAGES},
            {**AN, "content-type": "application/json", "x-fake-raw-status": str(raw_status)},
        )
    assert status == 502, raw
    assert str(raw_status) in orjson.loads(raw)["error"]["message"]
    assert a_status == 502 and orjson.loads(a_raw)["error"]["type"] == "api_error"
    assert elapsed < 3  # a 101 used to hang the client 75 s


# --- S11. a stream that ends cleanly after its finish reason is complete ------------------------


async def test_a_clean_end_after_the_finish_reason_is_a_complete_stream(serve: Any) -> None:
    async with serve() as gw:
        status, _, raw = await post(
            gw.url + "/v1/chat/completions", chat(stream=True), {**OA, "x-fake-omit-done": "true"}
        )
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=CALLER_KEY, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model="gpt-test",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-omit-done": "true"},
            )
            chunks = [c async for c in stream]
        async with anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=CALLER_KEY, max_retries=0
        ) as aclient:
            async with aclient.messages.stream(
                model="claude-test",
                max_tokens=5,
                messages=MESSAGES,
                extra_headers={"x-fake-omit-done": "true"},
            ) as astream:
                text = [t async for t in astream.text_stream]
        # Without a finish reason the same clean end is still a truncated stream.
        _, _, cut = await post(
            gw.url + "/v1/chat/completions",
            chat(stream=True),
            {**OA, "x-fake-truncate-after": "2"},
        )
        lines = await access_lines(gw, 4)
    assert status == 200
    assert b"[DONE]" not in raw and b'"error"' not in raw
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text
    assert b'"error"' in cut
    outcomes = [line["outcome"] for line in lines if line.get("event") == "request"]
    assert outcomes == ["ok", "ok", "ok", "truncated"]
