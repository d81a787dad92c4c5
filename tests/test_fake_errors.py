"""Errors in each wire format: scripted statuses, in-band error events, bad scripts, echoed
keys."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest

from gateway.fake import FakeProvider, fake_tokens
from tests import fake_support
from tests.fake_support import (
    ANT_HEADERS,
    ANTHROPIC_KEY,
    CHAT_BODY,
    OAI_HEADERS,
    OPENAI_KEY,
    sse_data,
)

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http
oai = fake_support.oai
ant = fake_support.ant


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
        events = sse_data(await resp.read())
    assert events[-1]["error"]["message"].endswith("Sorry about that!" + echo_oai)

    messages = {"model": "fake-claude@error_after=1,echo_key=true", "stream": True}
    async with http.post(
        url + "/v1/messages", json={**messages, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        events = sse_data(await resp.read())
    assert events[-1]["error"] == {"type": "overloaded_error", "message": "Overloaded" + echo_ant}

    responses = {"model": "fake-gpt@error_after=1,echo_key=true", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        events = sse_data(await resp.read())
    error, failed = events[-2:]
    assert error["message"].endswith(echo_oai)
    assert failed["response"]["error"]["message"] == error["message"]

    replay = {**ANT_HEADERS, "x-fake-replay": "anthropic-messages/anthropic-text"}
    replay |= {"x-fake-error-after": "3", "x-fake-echo-key": "1"}
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=replay) as resp:
        assert sse_data(await resp.read())[-1]["error"]["message"] == "Overloaded" + echo_ant

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
