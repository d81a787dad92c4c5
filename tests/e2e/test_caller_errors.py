"""Every error the gateway answers itself is in the caller's API format, and the official SDKs
raise the matching exception class for it."""

from __future__ import annotations

import io

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.support import CALLER_KEY, OTHER_CALLER_KEY, Fake, Gateway

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_unknown_model_is_404_in_both_formats(gateway: Gateway, fake: Fake) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=CALLER_KEY, max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError) as oa_err:
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert oa_err.value.code == "model_not_found"
    assert "no-such-model" in oa_err.value.message
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key=CALLER_KEY, max_retries=0
    ) as aclient:
        with pytest.raises(anthropic.NotFoundError) as an_err:
            await aclient.messages.create(model="no-such-model", max_tokens=5, messages=MESSAGES)
    assert an_err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert fake.provider.records == []


async def test_missing_and_wrong_key_are_401(gateway: Gateway, fake: Fake) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="wrong-key-123", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert "wrong-key-123" not in str(err.value.body)
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key="wrong-key-456", max_retries=0
    ) as aclient:
        with pytest.raises(anthropic.AuthenticationError):
            await aclient.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/messages", data=b"{}", headers={"anthropic-version": "2023-06-01"}
        ) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert fake.provider.records == []


async def test_model_not_allowed_for_caller_is_403(gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=OTHER_CALLER_KEY, max_retries=0
    ) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.embeddings.create(model="embed-test", input="x")


@pytest.mark.parametrize(
    ("path", "headers", "check"),
    [
        ("/v1/chat/completions", {"authorization": f"Bearer {CALLER_KEY}"}, "openai"),
        ("/v1/messages", {"x-api-key": CALLER_KEY}, "anthropic"),
    ],
)
@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (b'{"messages": []}', 400, "invalid_request_error"),
        (b'{"model": "gpt-test", "stream": "yes"}', 400, "invalid_request_error"),
        (b"", 400, "invalid_request_error"),
        (b'{"model": "x", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}', 413, None),
    ],
)
async def test_bad_requests_in_caller_format(
    gateway: Gateway,
    fake: Fake,
    path: str,
    headers: dict[str, str],
    check: str,
    body: bytes,
    status: int,
    kind: str | None,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + path, data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == status
            payload = await resp.json()
    if check == "openai":
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        if kind:
            assert payload["error"]["type"] == kind
        else:
            assert payload["error"]["code"] == "request_too_large"
    else:
        assert payload["type"] == "error"
        assert payload["error"]["type"] == (kind or "request_too_large")
    assert fake.provider.records == []


async def test_body_too_large_without_content_length(gateway: Gateway) -> None:
    async def gen():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"x" * 65536

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            data=gen(),
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        ) as resp,
    ):
        assert resp.status == 413


async def test_model_of_the_other_api_is_a_clear_400(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            data=orjson.dumps({"model": "claude-test", "messages": MESSAGES}),
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        ) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert "/v1/messages" in error["message"]


async def test_unknown_path_and_method(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/v1/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
        async with session.get(gateway.url + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with session.get(
            gateway.url + "/v1/messages", headers={"anthropic-version": "2023-06-01"}
        ) as resp:
            assert resp.status == 405
            assert (await resp.json())["type"] == "error"
        async with session.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200
