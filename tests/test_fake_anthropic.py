"""Anthropic answers (Messages, count_tokens), read by the official SDK and compared with
a live recording."""

from __future__ import annotations

import json

import aiohttp
import anthropic

from gateway.fake import FAKE_TOOL_ARGUMENTS, FakeProvider, fake_tokens
from tests import fake_support
from tests.fake_support import ANT_HEADERS, ANTHROPIC_KEY, expected_replay, sse_data

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http
ant = fake_support.ant


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


async def test_anthropic_usage_has_the_shape_of_the_real_api(
    http: aiohttp.ClientSession, url: str
) -> None:
    recorded = sse_data(
        expected_replay("anthropic-messages/anthropic-text", 0)  # a live recording
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
        events = sse_data(await resp.read())
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
