"""The fake upstream, driven over real sockets by the official SDKs and by raw aiohttp."""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import math
import struct
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway.fakeprovider import (
    FAKE_MODELS,
    FAKE_TOOL_ARGUMENTS,
    FakeProvider,
    FakeScript,
    ScriptError,
    estimate_prompt_tokens,
    fake_embedding,
    fake_tokens,
    fake_tool_fragments,
    parse_script,
    start_fake_provider,
)

RECORDINGS = Path(__file__).parent / "data" / "recorded-streams"
OPENAI_KEY = "sk-fake-openai"
ANTHROPIC_KEY = "sk-ant-fake"


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeProvider, str]]:
    provider = FakeProvider(recordings_dir=RECORDINGS)
    runner, url = await start_fake_provider(provider)
    try:
        yield provider, url
    finally:
        await runner.cleanup()


@pytest.fixture
def provider(fake: tuple[FakeProvider, str]) -> FakeProvider:
    return fake[0]


@pytest.fixture
def url(fake: tuple[FakeProvider, str]) -> str:
    return fake[1]


@pytest.fixture
async def oai(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def ant(url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=url, api_key=ANTHROPIC_KEY, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


OAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
ANT_HEADERS = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
CHAT_BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}]}


# ---- pure functions ---------------------------------------------------------------------------


def test_fake_tokens_are_deterministic() -> None:
    assert fake_tokens(0) == []
    assert fake_tokens(3) == ["Hello", " from", " the"]
    assert fake_tokens(50)[:10] == fake_tokens(10)
    assert len(fake_tokens(50)) == 50
    assert "".join(fake_tool_fragments(8)) == FAKE_TOOL_ARGUMENTS
    assert len(fake_tool_fragments(8)) == 8
    assert len(fake_tool_fragments(1000)) == len(FAKE_TOOL_ARGUMENTS)


def test_prompt_estimate_counts_text_not_roles() -> None:
    # "Hi" (2) + "be brief" (8) = 10 chars -> 3 tokens; "user"/"system" roles do not count.
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    }
    assert estimate_prompt_tokens(body) == 3
    assert estimate_prompt_tokens({}) == 1


def test_parse_script_validates_and_names_the_parameter() -> None:
    script = parse_script({"gap-ms": "20", "tool": "true", "status": 429})
    assert script == FakeScript(gap_ms=20.0, tool=True, status=429)
    assert parse_script({"status": None}, script).status is None
    with pytest.raises(ScriptError, match="'chunks'"):
        parse_script({"chunks": "many"})
    with pytest.raises(ScriptError, match="'bogus'"):
        parse_script({"bogus": "1"})
    headers = script.to_headers()
    assert headers == {"x-fake-gap-ms": "20.0", "x-fake-status": "429", "x-fake-tool": "true"}
    assert parse_script({k.removeprefix("x-fake-"): v for k, v in headers.items()}) == script


# ---- OpenAI wire ------------------------------------------------------------------------------


async def test_chat_stream_with_usage(oai: openai.AsyncOpenAI, provider: FakeProvider) -> None:
    stream = await oai.chat.completions.create(
        model="fake-gpt@chunks=5",
        messages=[{"role": "user", "content": "Hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(fake_tokens(5))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"fake-gpt"}
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 5, 8)

    (record,) = provider.records
    assert record.completed
    assert not record.disconnected
    assert record.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert record.api_key == OPENAI_KEY
    assert record.sent.endswith(b"data: [DONE]\n\n")
    assert record.sent.count(b'"usage":null') == 7  # role + 5 content + finish
    assert record.json["model"] == "fake-gpt@chunks=5"


async def test_chat_non_stream_and_max_tokens(
    oai: openai.AsyncOpenAI, provider: FakeProvider
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="fake-gpt", messages=[{"role": "user", "content": "Hi"}]
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["content-type"].startswith("application/json")
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(fake_tokens(8))
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8

    capped = await oai.chat.completions.create(
        model="fake-gpt",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
    )
    assert capped.choices[0].message.content == "".join(fake_tokens(3))
    assert capped.choices[0].finish_reason == "length"

    stream = await oai.chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == "length"
    assert len(finishes) == 4  # role, 2 content, finish
    assert provider.records[-1].sent.count(b'"content"') == 3


async def test_chat_tool_call_stream(oai: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    stream = await oai.chat.completions.create(
        model="fake-gpt",
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        stream=True,
    )
    chunks = [c async for c in stream]
    first = chunks[0].choices[0].delta.tool_calls
    assert first is not None
    assert first[0].id is not None
    assert first[0].function is not None
    assert first[0].function.name == "lookup"
    arguments = "".join(
        (c.choices[0].delta.tool_calls or [])[0].function.arguments or ""  # type: ignore[union-attr]
        for c in chunks[1:-1]
    )
    assert arguments == FAKE_TOOL_ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_legacy_completions(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.completions.create(model="fake-gpt", prompt="Say hi", max_tokens=4)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "".join(fake_tokens(4))
    assert completion.choices[0].finish_reason == "length"

    stream = await oai.completions.create(
        model="fake-gpt@chunks=3",
        prompt="Say hi",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(fake_tokens(3))
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_responses_stream_and_non_stream(
    oai: openai.AsyncOpenAI, provider: FakeProvider
) -> None:
    stream = await oai.responses.create(model="fake-gpt@chunks=4", input="Hi there", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "".join(fake_tokens(4))
    usage = completed.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (2, 4, 6)
    assert b"data: [DONE]" not in provider.records[0].sent
    assert provider.records[0].sent.startswith(b"event: response.created\ndata: {")

    response = await oai.responses.create(model="fake-gpt", input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.output_text == "".join(fake_tokens(2))

    tool_stream = await oai.responses.create(
        model="fake-gpt@tool=1", input="Hi", stream=True, tools=[]
    )
    tool_events = [e async for e in tool_stream]
    deltas = [e.delta for e in tool_events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == FAKE_TOOL_ARGUMENTS


async def test_embeddings_float_and_base64(oai: openai.AsyncOpenAI, provider: FakeProvider) -> None:
    floats = await oai.embeddings.create(
        model="fake-embedding", input=["alpha", "beta"], encoding_format="float"
    )
    assert [d.embedding for d in floats.data] == [
        fake_embedding("alpha", 8),
        fake_embedding("beta", 8),
    ]
    # The SDK asks for base64 by default and decodes it back to floats.
    decoded = await oai.embeddings.create(model="fake-embedding", input="alpha", dimensions=16)
    assert provider.records[-1].json["encoding_format"] == "base64"
    assert decoded.data[0].embedding == fake_embedding("alpha", 16)
    assert decoded.usage.prompt_tokens == 2
    tokens = await oai.embeddings.create(
        model="fake-embedding", input=[[1, 2, 3]], encoding_format="float"
    )
    assert tokens.data[0].embedding == fake_embedding("tokens:1,2,3", 8)
    assert tokens.usage.prompt_tokens == 3


async def test_embeddings_base64_is_little_endian_float32(
    http: aiohttp.ClientSession, url: str
) -> None:
    async with http.post(
        url + "/v1/embeddings",
        headers=OAI_HEADERS,
        json={"model": "e", "input": "x", "encoding_format": "base64"},
    ) as resp:
        data = await resp.json()
    packed = base64.b64decode(data["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == fake_embedding("x", 8)


async def test_models(oai: openai.AsyncOpenAI) -> None:
    models = [m async for m in oai.models.list()]
    assert [m.id for m in models] == list(FAKE_MODELS)
    assert {m.owned_by for m in models} == {"fake"}


# ---- Anthropic wire ---------------------------------------------------------------------------


async def test_anthropic_text_stream(ant: anthropic.AsyncAnthropic, provider: FakeProvider) -> None:
    async with ant.messages.stream(
        model="fake-claude@chunks=6",
        max_tokens=100,
        messages=[{"role": "user", "content": "Hello, Claude"}],
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(fake_tokens(6))
    assert final.model == "fake-claude"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 6)
    (record,) = provider.records
    # anthropic-sdk-python 2.x sends the key as a Bearer token; the fake takes either header.
    assert record.api_key == ANTHROPIC_KEY
    assert "anthropic-version" in record.headers
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in record.sent
    assert record.sent.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')

    capped = await ant.messages.create(
        model="fake-claude", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    assert capped.stop_reason == "max_tokens"
    assert capped.content[0].type == "text"
    assert capped.content[0].text == "".join(fake_tokens(3))


async def test_anthropic_tool_use_stream(
    ant: anthropic.AsyncAnthropic, provider: FakeProvider
) -> None:
    async with ant.messages.stream(
        model="fake-claude",
        max_tokens=100,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert block.input == json.loads(FAKE_TOOL_ARGUMENTS)
    sent = bytes(provider.records[0].sent)
    first_delta = sent.index(b"input_json_delta")
    assert sent[first_delta:].startswith(b'input_json_delta","partial_json":""}')


async def test_count_tokens(ant: anthropic.AsyncAnthropic) -> None:
    counted = await ant.messages.count_tokens(
        model="fake-claude", messages=[{"role": "user", "content": "x" * 41}]
    )
    assert counted.input_tokens == 11


# ---- auth and errors --------------------------------------------------------------------------


async def test_keys_are_checked_in_each_provider_format(
    http: aiohttp.ClientSession,
) -> None:
    provider = FakeProvider(keys={"good"})
    runner, url = await start_fake_provider(provider)
    try:
        bad_oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bad", max_retries=0)
        bad_ant = anthropic.AsyncAnthropic(base_url=url, api_key="bad", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError) as oai_err:
                await bad_oai.chat.completions.create(model="m", messages=[])
            with pytest.raises(anthropic.AuthenticationError) as ant_err:
                await bad_ant.messages.create(model="m", max_tokens=1, messages=[])
        finally:
            await bad_oai.close()
            await bad_ant.close()
        assert oai_err.value.body == {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        ant_body = ant_err.value.body
        assert isinstance(ant_body, dict)
        assert ant_body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
        assert ant_body["request_id"] == ant_err.value.response.headers["request-id"]

        async with http.post(url + "/v1/chat/completions", json=CHAT_BODY) as resp:
            assert resp.status == 401
        async with http.post(
            url + "/v1/chat/completions",
            json=CHAT_BODY,
            headers={"Authorization": "Bearer good"},
        ) as resp:
            assert resp.status == 200
        messages = {"model": "m", "max_tokens": 5, "messages": []}
        for key, status in (("good", 200), ("bad", 401)):
            async with http.post(
                url + "/v1/messages", json=messages, headers={"x-api-key": key}
            ) as resp:
                assert resp.status == status
                assert resp.headers["request-id"].startswith("req_")
        assert [r.status for r in provider.records] == [401, 401, 401, 200, 200, 401]
        assert provider.records[4].headers["x-api-key"] == "good"
    finally:
        await runner.cleanup()


async def test_scripted_429_surfaces_as_rate_limit_error(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.RateLimitError) as oai_err:
        await oai.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-fake-status": "429", "x-fake-retry-after": "7"},
        )
    assert oai_err.value.response.headers["retry-after"] == "7"
    assert oai_err.value.code == "rate_limit_exceeded"

    with pytest.raises(anthropic.RateLimitError) as ant_err:
        await ant.messages.create(
            model="fake-claude@status=429,retry_after_ms=1500",
            max_tokens=10,
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert ant_err.value.response.headers["retry-after-ms"] == "1500"
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        await ant.messages.create(
            model="fake-claude@status=529",
            max_tokens=10,
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert overloaded.value.status_code == 529
    assert isinstance(overloaded.value.body, dict)
    assert overloaded.value.body["error"]["type"] == "overloaded_error"


async def test_in_band_errors_raise_in_the_sdks(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, provider: FakeProvider
) -> None:
    stream = await oai.chat.completions.create(
        model="fake-gpt@error_after=2",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
    )
    got: list[str] = []

    async def read_chat() -> None:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="Sorry about that"):
        await read_chat()
    assert "".join(got) == "".join(fake_tokens(2))
    assert provider.records[-1].outcome == "error_event"
    assert b"[DONE]" not in provider.records[-1].sent

    async def read_messages() -> None:
        async with ant.messages.stream(
            model="fake-claude@error_after=1",
            max_tokens=10,
            messages=[{"role": "user", "content": "Hi"}],
        ) as ant_stream:
            async for _ in ant_stream:
                pass

    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        await read_messages()
    assert provider.records[-1].sent.endswith(
        b'event: error\ndata: {"type":"error","error":'
        b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )

    responses = await oai.responses.create(model="fake-gpt@error_after=0", input="Hi", stream=True)
    kinds = [e.type async for e in responses]
    assert kinds == ["error", "response.failed"]


async def test_bad_script_and_bad_replay_are_400(http: aiohttp.ClientSession, url: str) -> None:
    async with http.post(
        url + "/v1/chat/completions",
        json=CHAT_BODY,
        headers={**OAI_HEADERS, "x-fake-gap-ms": "soon"},
    ) as resp:
        assert resp.status == 400
        assert "'gap_ms'" in (await resp.json())["error"]["message"]
    for name in ("../README", "/etc/passwd", "openai-chat/missing"):
        async with http.post(
            url + "/v1/messages",
            json={"model": "m", "messages": []},
            headers={**ANT_HEADERS, "x-fake-replay": name},
        ) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["type"] == "error"
            assert "'replay'" in body["error"]["message"]


# ---- truncation, stalls, disconnects ----------------------------------------------------------


async def test_truncate_reset_is_a_payload_error(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-truncate-after": "3", "x-fake-truncate-mode": "reset"}
    body = {**CHAT_BODY, "stream": True}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert provider.records[0].outcome == "reset"
    assert provider.records[0].sent.count(b"data: ") == 4

    clean = {**OAI_HEADERS, "x-fake-truncate-after": "3"}
    async with http.post(url + "/v1/chat/completions", json=body, headers=clean) as resp:
        data = await resp.read()
    assert data == provider.records[1].sent
    assert data.count(b"data: ") == 4
    assert not data.endswith(b"[DONE]\n\n")


async def test_stall_then_client_disconnect_is_recorded(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@stall_after=2", "stream": True}
    resp = await http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS)
    try:
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        for _ in range(3):  # role chunk and two content chunks, then the stall
            await resp.content.readuntil(b"\n\n")
        (record,) = provider.records
        assert provider.open_streams == 1
        assert not record.disconnected
    finally:
        resp.close()
    await provider.wait_until(lambda: record.disconnected, timeout=1.0)
    assert record.outcome == "disconnected"
    assert record.disconnected_at is not None
    assert not record.completed
    assert provider.open_streams == 0
    assert provider.stats()["disconnects"] == 1


async def test_disconnect_during_headers_delay_is_recorded(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-headers-delay-ms": "5000"}
    request = asyncio.ensure_future(
        http.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers)
    )
    (record,) = await provider.wait_for_records(1, timeout=1.0)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await provider.wait_until(lambda: record.disconnected, timeout=1.0)
    assert record.status == 0
    assert record.sent == b""


async def test_cr_line_endings_on_a_generated_stream(http: aiohttp.ClientSession, url: str) -> None:
    body = {"model": "fake-claude@chunks=2,line_ending=cr", "stream": True, "messages": []}
    async with http.post(url + "/v1/messages", json=body, headers=ANT_HEADERS) as resp:
        data = await resp.read()
    assert b"\n" not in data
    assert data.count(b"\r\r") == 8  # message_start, ping, block start, 2 deltas, stop, delta, stop
    assert data.startswith(b"event: message_start\rdata: {")


# ---- replays ----------------------------------------------------------------------------------


def _replay_cases() -> list[tuple[str, int]]:
    cases: list[tuple[str, int]] = []
    for path in sorted(RECORDINGS.glob("*/*.chunks.jsonl")):
        name = str(path.relative_to(RECORDINGS)).removesuffix(".chunks.jsonl")
        created = path.read_bytes().count(b'"type":"response.created"')
        cases.extend((name, part) for part in range(max(created, 1)))
    return cases


def _expected_replay(name: str, part: int, eol: bytes = b"\n") -> bytes:
    lines = [
        line
        for line in (RECORDINGS / f"{name}.chunks.jsonl").read_bytes().split(b"\n")
        if line.strip()
    ]
    if name.startswith("openai-chat/"):
        return b"".join(b"data: " + line + eol + eol for line in lines) + b"data: [DONE]" + eol * 2
    parts: list[list[bytes]] = []
    for line in lines:
        kind = json.loads(line)["type"]
        if kind == "response.created" or not parts:
            parts.append([])
        parts[-1].append(b"event: " + kind.encode() + eol + b"data: " + line + eol + eol)
    return b"".join(parts[part])


def _replay_target(name: str) -> tuple[str, dict[str, str]]:
    if name.startswith("anthropic-messages/"):
        return "/v1/messages", ANT_HEADERS
    if name.startswith("openai-responses/"):
        return "/v1/responses", OAI_HEADERS
    return "/v1/chat/completions", OAI_HEADERS


def test_replay_cases_cover_every_recording() -> None:
    names = {name for name, _ in _replay_cases()}
    assert len(names) == 26
    assert sum(1 for _, part in _replay_cases() if part) == 3  # four responses in one file


async def test_every_recording_replays_exactly(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    cases = _replay_cases()
    for name, part in cases:
        path, headers = _replay_target(name)
        script = {"x-fake-replay": name, "x-fake-replay-part": str(part)}
        async with http.post(
            url + path, json={"model": "m", "stream": True}, headers={**headers, **script}
        ) as resp:
            assert resp.status == 200, name
            data = await resp.read()
        expected = _expected_replay(name, part)
        record = provider.records[-1]
        assert record.sent == expected, (name, part)
        assert data == expected, (name, part)
        assert record.completed
    assert len(provider.records) == len(cases)


async def test_replay_honours_line_ending_and_split_writes(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    name = "anthropic-messages/anthropic-web-fetch-tool.1"  # long non-ASCII text
    headers = {
        **ANT_HEADERS,
        "x-fake-replay": name,
        "x-fake-line-ending": "crlf",
        "x-fake-split-seed": "42",
    }
    pieces: list[bytes] = []
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=headers) as resp:
        async for piece in resp.content.iter_any():
            pieces.append(piece)
    expected = _expected_replay(name, 0, b"\r\n")
    record = provider.records[0]
    assert b"".join(pieces) == expected
    assert record.sent == expected
    # 1..64-byte pieces: on average ~32 bytes, far more writes than the 64 events.
    assert record.writes >= len(expected) // 48
    assert record.writes > 5 * 64
    assert len(pieces) > 64


async def test_replay_counts_events_for_truncation(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    name = "anthropic-messages/anthropic-text"
    headers = {**ANT_HEADERS, "x-fake-replay": name, "x-fake-truncate-after": "5"}
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=headers) as resp:
        data = await resp.read()
    expected = _expected_replay(name, 0)
    assert data == b"".join(expected.split(b"\n\n")[i] + b"\n\n" for i in range(5))
    assert provider.records[0].outcome == "truncated"


# ---- per-attempt plans, control routes --------------------------------------------------------


async def test_plan_per_session_first_500_then_ok(url: str, provider: FakeProvider) -> None:
    plan = [{"status": 500, "retry_after_ms": "1"}, {"chunks": 2}]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=OPENAI_KEY, max_retries=1)
    try:
        completion = await client.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-fake-session": "s-1", "x-fake-plan": json.dumps(plan)},
        )
    finally:
        await client.close()
    assert completion.choices[0].message.content == "".join(fake_tokens(2))
    assert [(r.attempt, r.status) for r in provider.records] == [(0, 500), (1, 200)]
    assert provider.records[0].script.status == 500
    assert provider.records[1].script == FakeScript(chunks=2)


async def test_stats_and_reset(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    async with http.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=OAI_HEADERS):
        pass
    await provider.wait_for_records(1, timeout=1.0)
    async with http.get(url + "/_fake/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 1
    assert stats["by_path"] == {"/v1/chat/completions": 1}
    assert stats["by_key"] == {OPENAI_KEY: 1}
    assert stats["disconnects"] == 0
    async with http.post(url + "/_fake/reset") as resp:
        assert resp.status == 200
    assert provider.records == []
    async with http.get(url + "/_fake/stats") as resp:
        assert (await resp.json())["requests"] == 0


async def test_gap_keeps_events_apart(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@chunks=3,gap_ms=30,first_delay_ms=30", "stream": True}
    arrivals: list[bytes] = []
    async with http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS) as resp:
        async for piece in resp.content.iter_any():
            arrivals.append(piece)
    # Six events 30 ms apart arrive in separate reads, not batched; a margin of two merges
    # keeps a loaded machine from flaking. Timing figures belong in the benchmarks.
    assert b"".join(arrivals) == provider.records[0].sent
    assert len(arrivals) >= 4
    record = provider.records[0]
    assert record.first_byte_at is not None
    assert record.first_byte_at > record.started_at


# ---- new script parameters: round trip ----------------------------------------------------


def test_new_parameters_round_trip_and_validate() -> None:
    script = FakeScript(
        raw_status=101, content_encoding="gzip", echo_key=True, omit_done=True, event_bytes=4096
    )
    headers = script.to_headers()
    assert headers == {
        "x-fake-raw-status": "101",
        "x-fake-content-encoding": "gzip",
        "x-fake-echo-key": "true",
        "x-fake-omit-done": "true",
        "x-fake-event-bytes": "4096",
    }
    assert parse_script({k.removeprefix("x-fake-"): v for k, v in headers.items()}) == script
    assert parse_script({"content_encoding": "DEFLATE"}).content_encoding == "deflate"
    assert parse_script({"content-encoding": "none"}, script).content_encoding is None
    assert parse_script({"raw_status": 999, "event_bytes": 64 * 1024 * 1024}).raw_status == 999
    bad = (
        ("raw_status", "99"),
        ("raw_status", 1000),
        ("content_encoding", "br"),
        ("echo_key", "maybe"),
        ("omit_done", 2),
        ("event_bytes", -1),
        ("event_bytes", 64 * 1024 * 1024 + 1),
    )
    for name, value in bad:
        with pytest.raises(ScriptError, match=f"'{name}'"):
            parse_script({name: value})


# ---- Anthropic usage shape --------------------------------------------------------------------


def _sse_data(data: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix(b"data: "))
        for line in data.splitlines()
        if line.startswith(b"data: {")
    ]


async def test_anthropic_usage_has_the_shape_of_the_real_api(
    http: aiohttp.ClientSession, url: str
) -> None:
    recorded = _sse_data(
        _expected_replay("anthropic-messages/anthropic-text", 0)  # a live recording
    )
    real_message = recorded[0]["message"]
    real_delta = next(e for e in recorded if e["type"] == "message_delta")
    body = {
        "model": "fake-claude@chunks=4",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "Hello, Claude"}],
    }
    async with http.post(url + "/v1/messages", json=body, headers=ANT_HEADERS) as resp:
        events = _sse_data(await resp.read())
    message = events[0]["message"]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert set(message) == set(real_message)
    assert list(message["usage"]) == list(real_message["usage"])
    assert list(message["usage"]["cache_creation"]) == list(real_message["usage"]["cache_creation"])
    assert list(delta) == list(real_delta)
    assert list(delta["usage"]) == list(real_delta["usage"])
    assert delta["usage"] == {
        "input_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 4,
    }

    async with http.post(
        url + "/v1/messages", json={**body, "stream": False}, headers=ANT_HEADERS
    ) as resp:
        answer = await resp.json()
    assert set(answer) == set(real_message)
    assert list(answer["usage"]) == list(real_message["usage"])
    assert (answer["usage"]["input_tokens"], answer["usage"]["output_tokens"]) == (4, 4)


# ---- raw_status -------------------------------------------------------------------------------


async def _raw_request(
    url: str, path: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one HTTP/1.1 request on a plain socket, to see exactly what comes back."""
    target = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(target.hostname, target.port)
    payload = json.dumps(body).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    return reader, writer


def _split_response(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines)
    return status, fields, body


async def test_raw_101_holds_the_connection_until_the_client_goes_away(
    url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-raw-status": "101"}
    reader, writer = await _raw_request(
        url, "/v1/chat/completions", headers, {**CHAT_BODY, "stream": True}
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head == (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        (record,) = provider.records
        assert (record.status, record.outcome, record.completed) == (101, "pending", False)
        # Nothing else comes: no final response and no close.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        assert provider.open_streams == 1
    finally:
        writer.close()
        await writer.wait_closed()
    await provider.wait_until(lambda: record.disconnected, timeout=2.0)
    assert record.outcome == "disconnected"
    assert record.sent == b""
    assert provider.open_streams == 0
    assert provider.stats()["by_status"] == {"101": 1}


async def test_raw_other_1xx_is_sent_alone_then_held(url: str, provider: FakeProvider) -> None:
    for status, line in ((103, b"HTTP/1.1 103 Early Hints"), (100, b"HTTP/1.1 100 Continue")):
        body = {"model": f"fake-claude@raw_status={status}", "max_tokens": 5, "messages": []}
        reader, writer = await _raw_request(url, "/v1/messages", ANT_HEADERS, body)
        try:
            assert await reader.readuntil(b"\r\n\r\n") == line + b"\r\n\r\n"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
            record = provider.records[-1]
            assert record.status == status
            assert not record.completed
        finally:
            writer.close()
            await writer.wait_closed()
        await provider.wait_until(lambda rec=record: rec.disconnected, timeout=2.0)
        assert record.outcome == "disconnected"


async def test_raw_final_status_sends_an_error_body_and_closes(
    url: str, provider: FakeProvider
) -> None:
    reader, writer = await _raw_request(
        url, "/v1/chat/completions", OAI_HEADERS, {**CHAT_BODY, "model": "fake-gpt@raw_status=600"}
    )
    try:
        data = await reader.read()  # up to the end of the stream: the fake closes
    finally:
        writer.close()
        await writer.wait_closed()
    status, fields, body = _split_response(data)
    assert status == b"HTTP/1.1 600 Unknown Status"
    assert fields[b"content-type"] == b"application/json"
    assert int(fields[b"content-length"]) == len(body)
    assert fields[b"connection"] == b"close"
    assert fields[b"x-request-id"].startswith(b"req_")
    assert json.loads(body) == {
        "error": {"message": "Error.", "type": "server_error", "param": None, "code": None}
    }
    record = provider.records[0]
    assert (record.status, record.outcome, record.completed) == (600, "error_status", True)
    assert record.sent == body

    headers = {**ANT_HEADERS, "x-fake-retry-after": "3", "x-fake-echo-key": "1"}
    body_in = {"model": "fake-claude@raw_status=999", "max_tokens": 5, "messages": []}
    reader, writer = await _raw_request(url, "/v1/messages", headers, body_in)
    try:
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status, fields, body = _split_response(data)
    assert status == b"HTTP/1.1 999 Unknown Status"
    assert fields[b"retry-after"] == b"3"
    answer = json.loads(body)
    assert answer["error"] == {
        "type": "api_error",
        "message": f"Error. (api key: {ANTHROPIC_KEY})",
    }
    assert answer["request_id"] == fields[b"request-id"].decode()
    assert provider.records[1].outcome == "error_status"


async def test_raw_final_statuses_parse_in_a_strict_client(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    for status in (200, 503, 600):
        headers = {**OAI_HEADERS, "x-fake-raw-status": str(status), "x-fake-status": "429"}
        body = {**CHAT_BODY, "stream": True}
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == status  # raw_status wins over status
            assert resp.headers["Content-Type"] == "application/json"
            error = (await resp.json())["error"]
        assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
        assert provider.records[-1].status == status
    async with http.post(
        url + "/v1/chat/completions",
        json=CHAT_BODY,
        headers={**OAI_HEADERS, "x-fake-raw-status": "99"},
    ) as resp:
        assert resp.status == 400
        assert "'raw_status'" in (await resp.json())["error"]["message"]


# ---- content_encoding -------------------------------------------------------------------------


async def test_gzip_non_stream_body_and_deflate_error_status(
    oai: openai.AsyncOpenAI, url: str, provider: FakeProvider
) -> None:
    completion = await oai.chat.completions.create(
        model="fake-gpt@content_encoding=gzip", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "".join(fake_tokens(8))
    sent = bytes(provider.records[0].sent)
    assert sent.startswith(b"\x1f\x8b")
    assert json.loads(gzip.decompress(sent))["choices"][0]["message"]["content"] == "".join(
        fake_tokens(8)
    )

    headers = {
        **OAI_HEADERS,
        "Accept-Encoding": "identity",
        "x-fake-content-encoding": "deflate",
        "x-fake-status": "429",
    }
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Content-Encoding"] == "deflate"
        data = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(data)
    assert provider.records[1].headers["accept-encoding"] == "identity"
    assert data == provider.records[1].sent
    assert json.loads(zlib.decompress(data))["error"]["code"] == "rate_limit_exceeded"


async def test_compressed_stream_is_flushed_event_by_event(
    url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@chunks=3,gap_ms=30,content_encoding=gzip"}
    arrivals: list[bytes] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(
            url + "/v1/chat/completions",
            json={**body, "stream": True},
            headers={**OAI_HEADERS, "Accept-Encoding": "identity"},
        ) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        async for piece in resp.content.iter_any():
            arrivals.append(piece)
    assert b"".join(arrivals) == provider.records[0].sent
    decoder = zlib.decompressobj(wbits=31)
    decoded = [decoder.decompress(piece) for piece in arrivals]
    # Every read decodes on its own into whole events (or is the gzip trailer alone).
    assert all(d == b"" or d.endswith(b"\n\n") for d in decoded)
    assert decoded[0].startswith(b"data: {")
    assert sum(1 for d in decoded if d) >= 4  # six events 30 ms apart; margin for merges
    assert decoder.eof  # the encoding was finished
    text = b"".join(decoded)
    assert text.count(b"\n\n") == 6  # role, 3 content, finish, [DONE]
    assert text.endswith(b"data: [DONE]\n\n")


async def test_compressed_stream_endings_finish_the_encoding(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {"model": "fake-claude@chunks=3", "max_tokens": 10, "stream": True, "messages": []}
    cases = (
        ({"x-fake-content-encoding": "deflate", "x-fake-error-after": "1"}, "error_event"),
        ({"x-fake-content-encoding": "gzip", "x-fake-truncate-after": "2"}, "truncated"),
    )
    for script, outcome in cases:
        async with http.post(
            url + "/v1/messages", json=body, headers={**ANT_HEADERS, **script}
        ) as resp:
            assert resp.headers["Content-Encoding"] == script["x-fake-content-encoding"]
            plain = await resp.read()  # aiohttp decodes it by default
        record = provider.records[-1]
        assert record.outcome == outcome
        decoder = zlib.decompressobj(wbits=47)  # zlib or gzip, by header
        assert decoder.decompress(bytes(record.sent)) == plain
        assert decoder.eof
    assert plain.count(b"event: content_block_delta") == 2


# ---- echo_key ---------------------------------------------------------------------------------


async def test_echo_key_in_error_bodies_and_events(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    echo_oai = f" (api key: {OPENAI_KEY})"
    echo_ant = f" (api key: {ANTHROPIC_KEY})"
    headers = {**OAI_HEADERS, "x-fake-status": "401", "x-fake-echo-key": "true"}
    async with http.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as resp:
        assert (await resp.json())["error"]["message"] == "Incorrect API key provided." + echo_oai
    body = {"model": "fake-claude@status=529,echo_key=1,error_message=busy", "messages": []}
    async with http.post(url + "/v1/messages", json=body, headers=ANT_HEADERS) as resp:
        assert (await resp.json())["error"]["message"] == "busy" + echo_ant

    chat = {**CHAT_BODY, "model": "fake-gpt@error_after=1,echo_key=true", "stream": True}
    async with http.post(url + "/v1/chat/completions", json=chat, headers=OAI_HEADERS) as resp:
        events = _sse_data(await resp.read())
    assert events[-1]["error"]["message"].endswith("Sorry about that!" + echo_oai)

    messages = {"model": "fake-claude@error_after=1,echo_key=true", "stream": True}
    async with http.post(
        url + "/v1/messages", json={**messages, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        events = _sse_data(await resp.read())
    assert events[-1]["error"] == {"type": "overloaded_error", "message": "Overloaded" + echo_ant}

    responses = {"model": "fake-gpt@error_after=1,echo_key=true", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        events = _sse_data(await resp.read())
    error, failed = events[-2:]
    assert error["message"].endswith(echo_oai)
    assert failed["response"]["error"]["message"] == error["message"]

    replay = {**ANT_HEADERS, "x-fake-replay": "anthropic-messages/anthropic-text"}
    replay |= {"x-fake-error-after": "3", "x-fake-echo-key": "1"}
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=replay) as resp:
        assert _sse_data(await resp.read())[-1]["error"]["message"] == "Overloaded" + echo_ant

    # Off by default: no answer carries the key.
    async with http.post(
        url + "/v1/chat/completions",
        json={**CHAT_BODY, "model": "fake-gpt@status=401"},
        headers=OAI_HEADERS,
    ) as resp:
        assert resp.status == 401
    assert OPENAI_KEY.encode() not in provider.records[-1].sent


async def test_echo_key_in_non_stream_answer_text(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    text = "".join(fake_tokens(3))
    model = "fake-gpt@chunks=3,echo_key=1"
    echo_oai = f" (api key: {OPENAI_KEY})"
    async with http.post(
        url + "/v1/chat/completions", json={**CHAT_BODY, "model": model}, headers=OAI_HEADERS
    ) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == text + echo_oai
    async with http.post(
        url + "/v1/completions", json={"model": model, "prompt": "Hi"}, headers=OAI_HEADERS
    ) as resp:
        assert (await resp.json())["choices"][0]["text"] == text + echo_oai
    async with http.post(
        url + "/v1/responses", json={"model": model, "input": "Hi"}, headers=OAI_HEADERS
    ) as resp:
        output = (await resp.json())["output"][0]["content"][0]
    assert output["text"] == text + echo_oai
    body = {"model": "fake-claude@chunks=3,echo_key=1", "max_tokens": 9, "messages": []}
    async with http.post(url + "/v1/messages", json=body, headers=ANT_HEADERS) as resp:
        answer = await resp.json()
    assert answer["content"][0]["text"] == f"{text} (api key: {ANTHROPIC_KEY})"
    assert answer["usage"]["output_tokens"] == 3

    # Streamed content and tool-call answers do not carry it.
    async with http.post(
        url + "/v1/chat/completions",
        json={**CHAT_BODY, "model": model, "stream": True},
        headers=OAI_HEADERS,
    ) as resp:
        await resp.read()
    async with http.post(
        url + "/v1/chat/completions",
        json={**CHAT_BODY, "model": model + ",tool=1"},
        headers=OAI_HEADERS,
    ) as resp:
        await resp.read()
    assert all(OPENAI_KEY.encode() not in r.sent for r in provider.records[-2:])


# ---- omit_done --------------------------------------------------------------------------------


async def test_omit_done_ends_cleanly_without_the_end_marker(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    chat = {
        **CHAT_BODY,
        "model": "fake-gpt@chunks=2,omit_done=1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(url + "/v1/chat/completions", json=chat, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert b"[DONE]" not in data
    events = _sse_data(data)
    assert len(events) == 5  # role, 2 content, finish, usage
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 2
    assert provider.records[-1].outcome == "complete"

    completions = {"model": "fake-gpt@chunks=2,omit_done=1", "prompt": "Hi", "stream": True}
    async with http.post(url + "/v1/completions", json=completions, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert b"[DONE]" not in data
    assert _sse_data(data)[-1]["choices"][0]["finish_reason"] == "stop"

    messages = {"model": "fake-claude@chunks=2,omit_done=1", "max_tokens": 9, "stream": True}
    async with http.post(
        url + "/v1/messages", json={**messages, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        data = await resp.read()
    assert b"message_stop" not in data
    assert data.endswith(b"\n\n")
    assert _sse_data(data)[-1]["type"] == "message_delta"

    responses = {"model": "fake-gpt@chunks=2,omit_done=1", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    kinds = [e["type"] for e in _sse_data(data)]
    assert kinds[-1] == "response.output_item.done"
    assert "response.completed" not in kinds
    assert provider.records[-1].outcome == "complete"

    for name, marker in (
        ("openai-chat/openai-text", b"data: [DONE]\n\n"),
        ("anthropic-messages/anthropic-text", b"event: message_stop\n"),
    ):
        path, headers = _replay_target(name)
        script = {"x-fake-replay": name, "x-fake-omit-done": "true"}
        async with http.post(url + path, json={"model": "m"}, headers={**headers, **script}) as r:
            data = await r.read()
        expected = _expected_replay(name, 0)
        cut = expected.rindex(marker)
        assert data == expected[:cut], name


# ---- event_bytes ------------------------------------------------------------------------------


async def test_event_bytes_pads_the_first_content_event(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    size = 1_000_000
    body = {**CHAT_BODY, "model": f"fake-gpt@chunks=3,event_bytes={size}", "stream": True}
    reads: list[bytes] = []
    async with http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS) as resp:
        async for piece in resp.content.iter_any():
            reads.append(piece)
    data = b"".join(reads)
    events = [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    big = events[1]
    assert len(big) == size
    assert big.count(b"\n") == 2  # one data: line and the blank line
    content = json.loads(big.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
    assert content == fake_tokens(1)[0] + "x" * (len(content) - len(fake_tokens(1)[0]))
    assert [len(e) < 1000 for e in events] == [True, False, True, True, True, True]
    # Written in pieces of at most 64 KiB, and read in many reads.
    record = provider.records[0]
    assert record.writes >= math.ceil(size / 65536) + 5
    start = len(events[0])
    offsets = list(itertools.accumulate(len(r) for r in reads))
    reads_in_event = sum(
        1
        for end, r in zip(offsets, reads, strict=True)
        if end > start and end - len(r) < start + size
    )
    assert reads_in_event >= 2


async def test_event_bytes_per_api_and_below_the_natural_size(
    http: aiohttp.ClientSession, url: str
) -> None:
    size = 100_000
    body = {"model": f"fake-claude@line_ending=crlf,event_bytes={size}", "stream": True}
    async with http.post(
        url + "/v1/messages", json={**body, "max_tokens": 5, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        data = await resp.read()
    events = [e + b"\r\n\r\n" for e in data.split(b"\r\n\r\n")[:-1]]
    deltas = [e for e in events if e.startswith(b"event: content_block_delta")]
    assert [len(e) for e in deltas][:1] == [size]
    assert all(len(e) < 1000 for e in deltas[1:])

    responses = {"model": f"fake-gpt@event_bytes={size}", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    events = [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    delta = next(e for e in events if e.startswith(b"event: response.output_text.delta"))
    assert len(delta) == size
    final = _sse_data(events[-1])[0]
    assert final["type"] == "response.completed"
    assert len(final["response"]["output"][0]["content"][0]["text"]) > size - 1000

    tool = {**CHAT_BODY, "model": f"fake-gpt@tool=1,event_bytes={size}", "stream": True}
    async with http.post(url + "/v1/chat/completions", json=tool, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert len(data.split(b"\n\n")[1]) + 2 == size

    small = {**CHAT_BODY, "model": "fake-gpt@chunks=2,event_bytes=10", "stream": True}
    async with http.post(url + "/v1/chat/completions", json=small, headers=OAI_HEADERS) as resp:
        events_small = _sse_data(await resp.read())
    assert [e["choices"][0]["delta"].get("content") for e in events_small[1:3]] == fake_tokens(2)
