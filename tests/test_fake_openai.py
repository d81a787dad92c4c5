"""OpenAI answers (Chat, legacy Completions, Embeddings, Models), read by the official SDK
and by raw aiohttp."""

from __future__ import annotations

import base64
import struct

import aiohttp
import openai

from gateway.fake import FAKE_MODELS, FAKE_TOOL_ARGUMENTS, FakeProvider, fake_embedding, fake_tokens
from tests import fake_support
from tests.fake_support import OAI_HEADERS, OPENAI_KEY

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http
oai = fake_support.oai


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
