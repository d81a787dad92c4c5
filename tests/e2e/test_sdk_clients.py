"""The official SDKs, pointed at the gateway, against the fake provider: everything works."""

from __future__ import annotations

import anthropic
import openai
import pytest

from gateway.fake import fake_tokens
from tests.support import (
    ANTHROPIC_KEYS,
    CALLER_KEY,
    OTHER_CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    Gateway,
)


def oa(gw: Gateway, key: str = CALLER_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def an(gw: Gateway, key: str = CALLER_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


def _upstream_saw(fake: Fake, path: str) -> dict[str, object]:
    records = [r for r in fake.provider.records if r.path == path]
    assert len(records) == 1, [r.path for r in fake.provider.records]
    rec = records[0]
    assert rec.json is not None
    return {"headers": rec.headers, "json": rec.json, "record": rec}


async def test_chat_stream(gateway: Gateway, fake: Fake) -> None:
    async with oa(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-chunks": "12"},
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-request-id"].startswith("req_")
        text, finish, usage = "", None, None
        async for chunk in raw.parse():
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    assert text == "".join(fake_tokens(12))
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 12
    seen = _upstream_saw(fake, "/v1/chat/completions")
    assert seen["json"]["model"] == "fake-gpt"  # type: ignore[index]
    auth = seen["headers"]["authorization"]  # type: ignore[index]
    assert auth in {f"Bearer {k}" for k in UPSTREAM_KEYS}
    assert CALLER_KEY not in str(seen["headers"])


async def test_chat_non_stream(gateway: Gateway, fake: Fake) -> None:
    async with oa(gateway) as client:
        completion = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-chunks": "5"},
        )
    assert completion.choices[0].message.content == "".join(fake_tokens(5))
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.model == "fake-gpt"


async def test_chat_stream_tool_calls(gateway: Gateway) -> None:
    async with oa(gateway) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "weather?"}],
            stream=True,
            extra_headers={"x-fake-tool": "1"},
        )
        args, name, finish = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    name = call.function.name or name if call.function else name
                    args += (call.function.arguments or "") if call.function else ""
                finish = choice.finish_reason or finish
    assert name
    assert finish == "tool_calls"
    import json

    assert isinstance(json.loads(args), dict)


async def test_legacy_completions(gateway: Gateway) -> None:
    async with oa(gateway) as client:
        done = await client.completions.create(
            model="gpt-test", prompt="Say", max_tokens=3, extra_headers={"x-fake-chunks": "8"}
        )
        stream = await client.completions.create(
            model="gpt-test", prompt="Say", stream=True, extra_headers={"x-fake-chunks": "4"}
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert done.choices[0].text == "".join(fake_tokens(3))
    assert done.choices[0].finish_reason == "length"
    assert text == "".join(fake_tokens(4))


async def test_responses_stream(gateway: Gateway) -> None:
    async with oa(gateway) as client:
        stream = await client.responses.create(
            model="gpt-test", input="hi", stream=True, extra_headers={"x-fake-chunks": "6"}
        )
        deltas, final = [], None
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                final = event.response
    assert "".join(deltas) == "".join(fake_tokens(6))
    assert final is not None and final.output_text == "".join(fake_tokens(6))
    assert final.usage is not None and final.usage.output_tokens == 6


async def test_embeddings(gateway: Gateway, fake: Fake) -> None:
    async with oa(gateway) as client:
        result = await client.embeddings.create(model="embed-test", input=["a", "b"])
    assert len(result.data) == 2
    assert all(len(d.embedding) > 0 for d in result.data)
    assert _upstream_saw(fake, "/v1/embeddings")["json"]["model"] == "fake-embed"  # type: ignore[index]


async def test_models_lists_what_the_caller_may_use(gateway: Gateway) -> None:
    # Each SDK is offered the models its API serves (the Anthropic SDK only /v1/messages ones).
    async with oa(gateway) as client:
        ids = sorted([m.id async for m in client.models.list()])
    assert ids == ["embed-test", "gpt-test"]
    async with oa(gateway, OTHER_CALLER_KEY) as client:
        ids = [m.id async for m in client.models.list()]
    assert ids == ["gpt-test"]
    async with an(gateway) as aclient:
        page = await aclient.models.list()
    assert sorted(m.id for m in page.data) == ["claude-test"]


async def test_anthropic_messages_stream_text(gateway: Gateway, fake: Fake) -> None:
    async with (
        an(gateway) as client,
        client.messages.stream(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-chunks": "9", "anthropic-beta": "some-beta-2025-01-01"},
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(fake_tokens(9))
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 9
    seen = _upstream_saw(fake, "/v1/messages")
    headers = seen["headers"]
    assert headers["x-api-key"] == ANTHROPIC_KEYS[0]  # type: ignore[index]
    assert headers["anthropic-beta"] == "some-beta-2025-01-01"  # type: ignore[index]
    assert "anthropic-version" in headers  # type: ignore[operator]
    assert seen["json"]["model"] == "fake-claude"  # type: ignore[index]


async def test_anthropic_messages_stream_tool_use(gateway: Gateway) -> None:
    async with (
        an(gateway) as client,
        client.messages.stream(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[
                {
                    "name": "get_weather",
                    "description": "weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            extra_headers={"x-fake-tool": "1"},
        ) as stream,
    ):
        partial = [
            e.delta.partial_json
            async for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    tool = [b for b in final.content if b.type == "tool_use"]
    assert len(tool) == 1 and isinstance(tool[0].input, dict) and tool[0].input
    assert len(partial) >= 2


async def test_anthropic_non_stream_and_count_tokens(gateway: Gateway) -> None:
    async with an(gateway) as client:
        message = await client.messages.create(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-chunks": "4"},
        )
        count = await client.messages.count_tokens(
            model="claude-test", messages=[{"role": "user", "content": "hello there"}]
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(fake_tokens(4))
    assert message.usage.output_tokens == 4
    assert count.input_tokens > 0


async def test_anthropic_fills_max_tokens_cap(gateway: Gateway, fake: Fake) -> None:
    async with an(gateway) as client:
        await client.messages.create(
            model="claude-test", max_tokens=5_000, messages=[{"role": "user", "content": "hi"}]
        )
    assert _upstream_saw(fake, "/v1/messages")["json"]["max_tokens"] == 1000  # type: ignore[index]


@pytest.mark.parametrize(
    ("sent", "field", "expected"),
    [
        ({"max_tokens": 5000}, "max_tokens", 1000),
        ({"max_completion_tokens": 20}, "max_completion_tokens", 20),
        ({}, "max_completion_tokens", 1000),
    ],
)
async def test_chat_max_tokens_cap(
    gateway: Gateway, fake: Fake, sent: dict[str, int], field: str, expected: int
) -> None:
    async with oa(gateway) as client:
        await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            extra_body=sent,
        )
    assert _upstream_saw(fake, "/v1/chat/completions")["json"][field] == expected  # type: ignore[index]
