"""Support for the fake provider's own tests: an unkeyed fake on a real socket, its clients,
the requests they send and helpers that read what comes back.

The fixtures are not in a conftest: there they would reach every test, and the root
conftest's ``fake`` serves the gateway's tests a keyed fake. A test module binds the ones it
uses by name (``provider = fake_support.provider``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway.fake import FakeProvider, start_fake_provider

RECORDINGS = Path(__file__).parent / "data" / "recorded-streams"
OPENAI_KEY = "sk-fake-openai"
ANTHROPIC_KEY = "sk-ant-fake"
OAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
ANT_HEADERS = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
CHAT_BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[FakeProvider, str]]:
    provider = FakeProvider(recordings_dir=RECORDINGS)
    runner, url = await start_fake_provider(provider)
    try:
        yield provider, url
    finally:
        await runner.cleanup()


@pytest.fixture
def provider(fake_server: tuple[FakeProvider, str]) -> FakeProvider:
    return fake_server[0]


@pytest.fixture
def url(fake_server: tuple[FakeProvider, str]) -> str:
    return fake_server[1]


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


def sse_data(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a stream's ``data:`` lines (``[DONE]`` left out)."""
    return [
        json.loads(line.removeprefix(b"data: "))
        for line in data.splitlines()
        if line.startswith(b"data: {")
    ]


def expected_replay(name: str, part: int, eol: bytes = b"\n") -> bytes:
    """The bytes a replay of recording ``name`` (part ``part``) must put on the wire."""
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


def replay_target(name: str) -> tuple[str, dict[str, str]]:
    """The route and auth headers a recording was made on."""
    if name.startswith("anthropic-messages/"):
        return "/v1/messages", ANT_HEADERS
    if name.startswith("openai-responses/"):
        return "/v1/responses", OAI_HEADERS
    return "/v1/chat/completions", OAI_HEADERS
