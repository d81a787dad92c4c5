"""JWT callers through the gateway: a valid token is served under its tier; every attack is a
401 in the caller's format, and none of them reaches the upstream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support import Fake, Gateway, GatewayFactory

ISSUER = "https://idp.test/"
AUDIENCE = "llm-gateway"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def jwks_url(signing_key: rsa.RSAPrivateKey) -> AsyncIterator[str]:
    jwk = {**RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True), "kid": "k1"}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/jwks.json"))
    await server.close()


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, jwks_url: str) -> Gateway:
    return await gateway_factory(
        {
            "auth": {
                "jwt": {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "algorithms": ["RS256"],
                    "jwks_url": jwks_url,
                    "max_token_bytes": 4096,
                },
                "default_tier": "free",
            },
            "tiers": {
                "free": {"requests_per_minute": 2},
                "gold": {"requests_per_minute": 100, "models": ["gpt-test"]},
            },
        }
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "svc-42",
        "tier": "gold",
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any, alg: str = "RS256", kid: str = "k1", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    mac = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def post(gw: Gateway, token: str, path: str = "/v1/chat/completions") -> tuple[int, Any]:
    if path == "/v1/messages":
        body = {
            "model": "claude-test",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        }
    else:
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + path, data=orjson.dumps(body), headers={"authorization": f"Bearer {token}"}
        ) as resp:
            return resp.status, await resp.json()


async def test_valid_token_is_served_under_its_tier(
    gw: Gateway, fake: Fake, signing_key: rsa.RSAPrivateKey
) -> None:
    status, body = await post(gw, mint(signing_key))
    assert status == 200, body
    assert fake.provider.records[0].json is not None
    # The tier's model list applies: gold may not use claude-test.
    status, body = await post(gw, mint(signing_key), "/v1/messages")
    assert status == 403
    assert body["error"]["type"] == "permission_error"


async def test_token_without_tier_gets_the_default_tier(
    gw: Gateway, signing_key: rsa.RSAPrivateKey
) -> None:
    token = mint(signing_key, tier=None, sub="plain")
    statuses = [(await post(gw, token))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]  # free: 2 requests per minute


def _attacks(key: rsa.RSAPrivateKey) -> dict[str, str]:
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    good = mint(key)
    head, payload, sig = good.split(".")
    tampered_claims = {**json.loads(base64.urlsafe_b64decode(payload + "==")), "tier": "admin"}
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg_none": handmade({"alg": "none", "typ": "JWT", "kid": "k1"}, claims(), None),
        "key_confusion": handmade(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims(), public_pem
        ),
        "expired": mint(key, exp=now - 120, iat=now - 600),
        "not_yet_valid": mint(key, nbf=now + 600),
        "issued_in_future": mint(key, iat=now + 600, exp=now + 900),
        "wrong_aud": mint(key, aud="someone-else"),
        "wrong_iss": mint(key, iss="https://evil.test/"),
        "missing_exp": mint(key, exp=None),
        "unknown_kid": mint(other_key, kid="k-unknown"),
        "wrong_key_same_kid": mint(other_key),
        "tampered_payload": f"{head}.{b64(json.dumps(tampered_claims).encode())}.{sig}",
        "oversized": mint(
            key, pad="x" * 3500
        ),  # over max_token_bytes (4096), under aiohttp's 8 KiB header cap
        "rs512_not_allowed": mint(key, alg="RS512"),
    }


ATTACKS = [
    "alg_none",
    "key_confusion",
    "expired",
    "not_yet_valid",
    "issued_in_future",
    "wrong_aud",
    "wrong_iss",
    "missing_exp",
    "unknown_kid",
    "wrong_key_same_kid",
    "tampered_payload",
    "oversized",
    "rs512_not_allowed",
]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_attacks_are_401_and_never_reach_upstream(
    gw: Gateway, fake: Fake, signing_key: rsa.RSAPrivateKey, attack: str, path: str
) -> None:
    token = _attacks(signing_key)[attack]
    status, body = await post(gw, token, path)
    assert status == 401
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        message = body["error"]["message"]
    else:
        assert body["error"]["code"] == "invalid_api_key"
        message = body["error"]["message"]
    assert message.startswith("Invalid token")
    assert token not in message
    assert fake.provider.records == []
