"""Token lifetime through a real `gateway serve`: a token that lives longer than
`auth.jwt.max_lifetime_s` (or whose exp is absurd) is a 401 in the caller's format and never
reaches the upstream, whoever signed it; an ordinary one-hour token is served."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tests.support import JWT_TEST_SECRET, Fake, Served, base_config, deep_merge, serve_gateway

ISSUER = "https://idp.lifetime.test/"
AUDIENCE = "llm-gateway"
LIFETIME_MESSAGE = "token lifetime exceeds the allowed maximum"


@pytest.fixture
async def served(fake: Fake, tmp_path: Path) -> AsyncIterator[Served]:
    extra = {
        "auth": {
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "algorithms": ["HS256"],
                "secret": JWT_TEST_SECRET,
                "max_lifetime_s": 86400,
            }
        }
    }
    async with serve_gateway(deep_merge(base_config(fake.url), extra), tmp_path) as gw:
        yield gw


def token(lifetime_s: float, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "lifetime-caller",
        "iat": now,
        "exp": now + lifetime_s,
        **overrides,
    }
    return jwt.encode(claims, JWT_TEST_SECRET, algorithm="HS256")


def body_for(path: str) -> dict[str, Any]:
    if path == "/v1/messages":
        return {
            "model": "claude-test",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        }
    return {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}


async def post(served: Served, token: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            served.url + path,
            data=orjson.dumps(body_for(path)),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def error_message(path: str, body: Any) -> str:
    """The 401 message, after checking the error body has the caller's API format."""
    if path == "/v1/messages":
        assert body["type"] == "error", body
        assert body["error"]["type"] == "authentication_error", body
    else:
        assert set(body) == {"error"}, body
        assert body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["code"] == "invalid_api_key", body
    message: str = body["error"]["message"]
    return message


PATHS = ["/v1/chat/completions", "/v1/messages"]


@pytest.mark.parametrize("path", PATHS)
async def test_long_lived_tokens_are_401_and_never_reach_upstream(
    served: Served, fake: Fake, path: str
) -> None:
    cases = {
        token(86400 + 1): LIFETIME_MESSAGE,
        token(10 * 365 * 86400): LIFETIME_MESSAGE,
        token(0, exp=1e300): "invalid claim exp",
    }
    for bad, expected in cases.items():
        status, body = await post(served, bad, path)
        assert status == 401, body
        message = error_message(path, body)
        assert message == f"Invalid token: {expected}.", message
        for part in bad.split("."):
            assert part not in message
        signature = bad.rsplit(".", 1)[1]
        assert bad not in served.log_text() and signature not in served.log_text()
    assert fake.provider.records == []


@pytest.mark.parametrize("path", PATHS)
async def test_one_hour_token_is_served(served: Served, fake: Fake, path: str) -> None:
    status, body = await post(served, token(3600), path)
    assert status == 200, body
    assert len(fake.provider.records) == 1
