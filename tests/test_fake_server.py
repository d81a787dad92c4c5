"""The server: key checks per wire format, per-session plans, the control routes."""

from __future__ import annotations

import json

import aiohttp
import anthropic
import openai
import pytest

from gateway.fake import FakeProvider, FakeScript, fake_tokens, start_fake_provider
from tests import fake_support
from tests.fake_support import CHAT_BODY, OAI_HEADERS, OPENAI_KEY

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http


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
