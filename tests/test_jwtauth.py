"""JWT verification: real keys, real signatures, a real JWKS endpoint on a loopback socket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import SecretStr

from gateway.config.schema import JwtConfig
from gateway.jwtauth import JwtError, JwtIdentity, JwtVerifier, looks_like_jwt
from tests.support import free_port

ServerFactory = Callable[..., Awaitable[TestServer]]

ISSUER = "https://idp.example.test/"
AUDIENCE = "llm-gateway"
NOW = 1_700_000_000.0
SECRET = "an-hs256-shared-secret-of-40-bytes-xxxxx"


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Idp:
    """A JWKS endpoint whose key set the test changes and whose hits it counts."""

    keys: list[Any] = field(default_factory=list)
    hits: int = 0
    status: int = 200
    delay_s: float = 0.0
    raw_body: bytes | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        body = self.raw_body if self.raw_body is not None else json.dumps({"keys": self.keys})
        return web.Response(status=self.status, body=body, content_type="application/json")


# Aliases: in the class body below, the fields `rsa` and `ec` would shadow the modules.
RsaKey = rsa.RSAPrivateKey
EcKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Keys:
    rsa: RsaKey
    rsa2: RsaKey
    ec: EcKey
    weak_rsa: RsaKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        weak_rsa=rsa.generate_private_key(public_exponent=65537, key_size=1024),
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, **extra}


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "caller-1",
        "tier": "gold",
        "iat": int(NOW),
        "exp": int(NOW) + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any, alg: str = "RS256", kid: str | None = "rsa-1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built without PyJWT (which refuses to sign the attacks)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    mac = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def jwks_config(idp: Idp, **overrides: Any) -> JwtConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ("RS256",),
        "jwks_url": idp.url,
        "jwks_min_refresh_s": 1.0,
        "jwks_timeout_s": 2.0,
    }
    values.update(overrides)
    return JwtConfig(**values)


async def rejected(verifier: JwtVerifier, token: str, message: str) -> None:
    with pytest.raises(JwtError) as info:
        await verifier.verify(token)
    assert str(info.value) == message
    assert token not in str(info.value)


@pytest.fixture
async def idp(aiohttp_server: ServerFactory, keys: Keys) -> Idp:
    state = Idp(keys=[rsa_jwk(keys.rsa, "rsa-1"), ec_jwk(keys.ec, "ec-1")])
    app = web.Application()
    app.router.add_get("/jwks.json", state.handle)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/jwks.json"))
    return state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


VerifierFactory = Callable[[JwtConfig], Awaitable[JwtVerifier]]


@pytest.fixture
async def make_verifier(
    session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[VerifierFactory]:
    started: list[JwtVerifier] = []

    async def factory(config: JwtConfig) -> JwtVerifier:
        verifier = JwtVerifier(config, clock=clock)
        started.append(verifier)
        await verifier.start(session)
        return verifier

    yield factory
    for verifier in started:
        await verifier.close()


# -- valid tokens -----------------------------------------------------------------------------


async def test_rs256_via_jwks(idp: Idp, keys: Keys, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(jwks_config(idp))
    identity = await verifier.verify(mint(keys.rsa))
    assert identity == JwtIdentity(caller_id="caller-1", tier="gold")
    assert idp.hits == 1


async def test_es256_via_jwks(idp: Idp, keys: Keys, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(jwks_config(idp, algorithms=("ES256",)))
    identity = await verifier.verify(mint(keys.ec, "ES256", kid="ec-1", sub="ec-caller"))
    assert identity == JwtIdentity(caller_id="ec-caller", tier="gold")


async def test_rs256_via_pem_file(
    tmp_path: Path, keys: Keys, make_verifier: VerifierFactory
) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(keys.rsa))
    config = JwtConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256",), public_key_file=str(pem)
    )
    verifier = await make_verifier(config)
    assert await verifier.verify(mint(keys.rsa, kid=None)) == JwtIdentity("caller-1", "gold")
    # A kid is irrelevant with one configured key.
    assert (await verifier.verify(mint(keys.rsa, kid="whatever"))).caller_id == "caller-1"
    await rejected(verifier, mint(keys.rsa2, kid=None), "invalid signature")


async def test_hs256_with_secret(make_verifier: VerifierFactory) -> None:
    config = JwtConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",), secret=SecretStr(SECRET)
    )
    verifier = await make_verifier(config)
    identity = await verifier.verify(mint(SECRET, "HS256", kid=None, tier=None))
    assert identity == JwtIdentity(caller_id="caller-1", tier=None)
    other = "another-shared-secret-of-40-bytes-xxxxxx"
    await rejected(verifier, mint(other, "HS256", kid=None), "invalid signature")


async def test_hs512_with_short_secret_does_not_warn(make_verifier: VerifierFactory) -> None:
    # 40 bytes is below PyJWT's 64-byte recommendation for HS512: it must not warn per request.
    config = JwtConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=("HS512",), secret=SecretStr(SECRET)
    )
    verifier = await make_verifier(config)
    with pytest.warns(InsecureKeyLengthWarning):
        token = mint(SECRET, "HS512", kid=None)
    assert (await verifier.verify(token)).caller_id == "caller-1"


async def test_tier_absent_or_unconfigured(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    assert (await verifier.verify(mint(keys.rsa, tier=None))).tier is None

    custom = await make_verifier(jwks_config(idp, caller_claim="client_id", tier_claim=None))
    identity = await custom.verify(mint(keys.rsa, client_id="svc-7", sub=None))
    assert identity == JwtIdentity(caller_id="svc-7", tier=None)


async def test_caller_and_tier_claims_are_validated(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    await rejected(verifier, mint(keys.rsa, sub=None), "missing claim sub")
    await rejected(verifier, mint(keys.rsa, sub=123), "invalid claim sub")
    await rejected(verifier, mint(keys.rsa, sub=""), "invalid claim sub")
    await rejected(verifier, mint(keys.rsa, sub="x" * 257), "invalid claim sub")
    await rejected(verifier, mint(keys.rsa, sub="bad\nid"), "invalid claim sub")
    await rejected(verifier, mint(keys.rsa, tier=["gold"]), "invalid claim tier")
    await rejected(verifier, mint(keys.rsa, tier="t" * 129), "invalid claim tier")
    assert (await verifier.verify(mint(keys.rsa, sub="x" * 256))).caller_id == "x" * 256

    custom = await make_verifier(jwks_config(idp, caller_claim="client_id"))
    await rejected(custom, mint(keys.rsa), "missing claim client_id")
    await rejected(custom, mint(keys.rsa, client_id=42), "invalid claim client_id")
    await rejected(custom, mint(keys.rsa, client_id=True), "invalid claim client_id")


# -- attacks ----------------------------------------------------------------------------------


async def test_alg_none_is_rejected(idp: Idp, keys: Keys, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(jwks_config(idp))
    for alg in ("none", "None", "NONE", ""):
        token = handmade({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims(), None)
        await rejected(verifier, token, "algorithm not allowed")
    await rejected(verifier, handmade({"typ": "JWT"}, claims(), None), "algorithm not allowed")


async def test_key_confusion_hs256_signed_with_the_rsa_public_key(
    idp: Idp, tmp_path: Path, keys: Keys, make_verifier: VerifierFactory
) -> None:
    pem_bytes = public_pem(keys.rsa)
    pem = tmp_path / "idp.pem"
    pem.write_bytes(pem_bytes)
    by_pem = await make_verifier(
        JwtConfig(issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256",), public_key_file=str(pem))
    )
    by_jwks = await make_verifier(jwks_config(idp))
    forged = handmade({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), pem_bytes)
    await rejected(by_pem, forged, "algorithm not allowed")
    await rejected(by_jwks, forged, "algorithm not allowed")
    # The same HMAC under a header that claims RS256 is just a bad signature.
    relabelled = handmade({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}, claims(), pem_bytes)
    await rejected(by_pem, relabelled, "invalid signature")
    await rejected(by_jwks, relabelled, "invalid signature")


async def test_time_claims(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp, leeway_s=30))
    now = int(NOW)
    await rejected(verifier, mint(keys.rsa, iat=now - 600, exp=now - 31), "token expired")
    await rejected(verifier, mint(keys.rsa, nbf=now + 120), "token not yet valid")
    await rejected(verifier, mint(keys.rsa, iat=now + 120), "token issued in the future")
    await rejected(verifier, mint(keys.rsa, exp=None), "missing claim exp")
    await rejected(verifier, mint(keys.rsa, iat=None), "missing claim iat")
    await rejected(verifier, mint(keys.rsa, exp="9999999999"), "invalid claim exp")
    await rejected(verifier, mint(keys.rsa, nbf=True), "invalid claim nbf")
    # PyJWT's json accepts Infinity: a token that never expires must not pass.
    inf = mint(keys.rsa, exp=float("inf"))
    await rejected(verifier, inf, "invalid claim exp")
    # Within the leeway everything passes.
    edge = mint(keys.rsa, iat=now + 20, nbf=now + 20, exp=now - 20)
    assert (await verifier.verify(edge)).caller_id == "caller-1"
    # The injected clock is the one consulted: later, the same valid token has expired.
    token = mint(keys.rsa)
    assert (await verifier.verify(token)).caller_id == "caller-1"
    clock.advance(331)
    await rejected(verifier, token, "token expired")


async def test_wrong_audience_and_issuer(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    await rejected(verifier, mint(keys.rsa, aud="someone-else"), "invalid audience")
    await rejected(verifier, mint(keys.rsa, aud=["a", "b"]), "invalid audience")
    await rejected(verifier, mint(keys.rsa, aud=None), "missing claim aud")
    await rejected(verifier, mint(keys.rsa, iss="https://evil.test/"), "invalid issuer")
    await rejected(verifier, mint(keys.rsa, iss=None), "missing claim iss")
    assert (await verifier.verify(mint(keys.rsa, aud=["x", AUDIENCE]))).caller_id == "caller-1"


async def test_tampered_payload(idp: Idp, keys: Keys, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(jwks_config(idp))
    header, _, signature = mint(keys.rsa).split(".")
    evil = b64(json.dumps(claims(sub="admin", tier="unlimited")).encode())
    await rejected(verifier, f"{header}.{evil}.{signature}", "invalid signature")
    # Flipping one signature byte fails too.
    good = mint(keys.rsa)
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    await rejected(verifier, flipped, "invalid signature")


async def test_header_alg_outside_the_allow_list_even_if_correctly_signed(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    # The JWK states no alg: only the configured allow-list stands between RS512 and a pass.
    verifier = await make_verifier(jwks_config(idp))
    await rejected(verifier, mint(keys.rsa, "RS512"), "algorithm not allowed")
    await rejected(verifier, mint(keys.rsa, "PS256"), "algorithm not allowed")
    await rejected(verifier, mint(keys.ec, "ES256", kid="ec-1"), "algorithm not allowed")


async def test_jwk_stated_alg_binds_the_key(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    idp.keys = [rsa_jwk(keys.rsa, "rsa-1", alg="RS256")]
    verifier = await make_verifier(jwks_config(idp, algorithms=("RS256", "RS512")))
    assert (await verifier.verify(mint(keys.rsa, "RS256"))).caller_id == "caller-1"
    await rejected(verifier, mint(keys.rsa, "RS512"), "algorithm does not match the signing key")


async def test_oversized_token_is_rejected_before_parsing(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp, max_token_bytes=1024))
    clock.advance(10)  # a refresh would be allowed, so a zero hit count means none was tried
    big = mint(keys.rsa, kid="unknown-kid", pad="p" * 1200)
    assert len(big) > 1024
    await rejected(verifier, big, "token too large")
    await rejected(verifier, "x" * 100_000, "token too large")
    assert idp.hits == 1
    await rejected(verifier, "é" * 10, "malformed token")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "sk-abc",
        "a.b",
        "a.b.c",
        "...",
        "eyJ.eyJ.",
        "eyJhbGciOiJSUzI1NiJ9",
        "eyJhbGciOiJSUzI1NiJ9.!!!!.abc",
        b64(b'["RS256"]') + ".e30.",
        b64(b"{not json") + ".e30.",
        b64(b'{"alg":"RS256","kid":7}') + ".e30.sig",
        b64(b'{"alg":"RS256","kid":"rsa-1"}') + ".bm90IGpzb24.c2ln",
        b64(b'{"alg":"RS256","kid":"rsa-1"}') + "." + b64(b"[1,2]") + ".c2ln",
    ],
)
async def test_garbage(idp: Idp, make_verifier: VerifierFactory, garbage: str) -> None:
    verifier = await make_verifier(jwks_config(idp))
    with pytest.raises(JwtError) as info:
        await verifier.verify(garbage)
    message = str(info.value)
    assert message in {"malformed token", "algorithm not allowed", "invalid signature"}


# -- JWKS: unknown kid, rate limit, rotation, outages -----------------------------------------


async def test_unknown_kid_refresh_is_rate_limited_and_shared(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    assert idp.hits == 1
    forged = [mint(keys.rsa2, kid=f"forged-{i}") for i in range(20)]
    # Within jwks_min_refresh_s of the start-up fetch: no fetch at all.
    for token in forged:
        await rejected(verifier, token, "unknown signing key")
    assert idp.hits == 1
    # Past it: twenty concurrent unknown kids share one fetch...
    clock.advance(1.5)
    results = await asyncio.gather(*(verifier.verify(t) for t in forged), return_exceptions=True)
    assert all(isinstance(r, JwtError) and str(r) == "unknown signing key" for r in results)
    assert idp.hits == 2
    # ...and the next twenty, still within the window, cause none.
    for token in forged:
        await rejected(verifier, token, "unknown signing key")
    assert idp.hits == 2


async def test_key_rotation(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    old_token = mint(keys.rsa, kid="rsa-1")
    assert (await verifier.verify(old_token)).caller_id == "caller-1"

    idp.keys = [rsa_jwk(keys.rsa2, "rsa-2")]
    new_token = mint(keys.rsa2, kid="rsa-2", sub="rotated")
    await rejected(verifier, new_token, "unknown signing key")  # refresh still rate-limited
    assert idp.hits == 1
    clock.advance(1.1)
    idp.delay_s = 0.05  # the fetch is in flight while the others arrive
    # Twenty concurrent requests with the new kid all wait for one shared fetch.
    identities = await asyncio.gather(*(verifier.verify(new_token) for _ in range(20)))
    assert {i.caller_id for i in identities} == {"rotated"}
    assert idp.hits == 2
    # The retired key is gone with the old set.
    await rejected(verifier, old_token, "unknown signing key")
    # A key under a known kid that does not match it: bad signature, no refresh.
    await rejected(verifier, mint(keys.rsa, kid="rsa-2"), "invalid signature")
    assert idp.hits == 2


async def test_token_without_kid(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    idp.keys = [rsa_jwk(keys.rsa, "rsa-1"), rsa_jwk(keys.rsa2, "rsa-2")]
    verifier = await make_verifier(jwks_config(idp))
    await rejected(verifier, mint(keys.rsa, kid=None), "token has no key id")

    idp.keys = [rsa_jwk(keys.rsa, "rsa-1")]
    clock.advance(1.1)
    await rejected(verifier, mint(keys.rsa2, kid="unknown"), "unknown signing key")
    assert (await verifier.verify(mint(keys.rsa, kid=None))).caller_id == "caller-1"


async def test_unusable_keys_are_skipped_not_fatal(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    idp.keys = [
        "not-a-dict",
        {"kty": "oct", "k": b64(SECRET.encode()), "kid": "hmac"},
        {"kty": "XYZ", "kid": "weird"},
        {"kty": "RSA", "kid": "broken", "n": 123, "e": "AQAB"},
        rsa_jwk(keys.rsa2, "enc-only", use="enc"),
        rsa_jwk(keys.rsa2, "rs512-only", alg="RS512"),
        rsa_jwk(keys.weak_rsa, "weak"),
        {**rsa_jwk(keys.rsa2, "kid-not-str"), "kid": 5},
        rsa_jwk(keys.rsa, "rsa-1"),
    ]
    verifier = await make_verifier(jwks_config(idp))
    assert (await verifier.verify(mint(keys.rsa, kid="rsa-1"))).caller_id == "caller-1"
    await rejected(verifier, mint(keys.rsa2, kid="enc-only"), "unknown signing key")
    await rejected(verifier, mint(keys.rsa2, kid="rs512-only"), "unknown signing key")
    with pytest.warns(InsecureKeyLengthWarning):
        weak_token = mint(keys.weak_rsa, kid="weak")
    await rejected(verifier, weak_token, "unknown signing key")
    forged = handmade({"alg": "HS256", "kid": "hmac"}, claims(), SECRET.encode())
    await rejected(verifier, forged, "algorithm not allowed")


async def test_bad_refresh_keeps_the_previous_set(
    idp: Idp, keys: Keys, clock: FakeClock, make_verifier: VerifierFactory
) -> None:
    verifier = await make_verifier(jwks_config(idp))
    token = mint(keys.rsa)
    for breakage in ({"status": 500}, {"raw_body": b"{not json"}, {"raw_body": b'{"keys": []}'}):
        for name, value in breakage.items():
            setattr(idp, name, value)
        clock.advance(1.1)
        await rejected(verifier, mint(keys.rsa, kid="new"), "unknown signing key")
        assert (await verifier.verify(token)).caller_id == "caller-1"
        idp.status, idp.raw_body = 200, None
    assert idp.hits == 4


async def test_oversized_jwks_document_is_refused(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    idp.raw_body = json.dumps(
        {"keys": [rsa_jwk(keys.rsa, "rsa-1")], "pad": "x" * (1024 * 1024)}
    ).encode()
    verifier = await make_verifier(jwks_config(idp))
    await rejected(verifier, mint(keys.rsa), "unknown signing key")


async def test_slow_idp_does_not_hold_start(
    idp: Idp, keys: Keys, make_verifier: VerifierFactory
) -> None:
    idp.delay_s = 1.0
    loop = asyncio.get_running_loop()
    began = loop.time()
    verifier = await make_verifier(jwks_config(idp, jwks_timeout_s=0.2))
    assert loop.time() - began < 0.9
    await rejected(verifier, mint(keys.rsa), "unknown signing key")


async def test_idp_down_at_start(
    aiohttp_server: ServerFactory,
    keys: Keys,
    clock: FakeClock,
    make_verifier: VerifierFactory,
) -> None:
    port = free_port()
    state = Idp(keys=[rsa_jwk(keys.rsa, "rsa-1")], url=f"http://127.0.0.1:{port}/jwks.json")
    verifier = await make_verifier(jwks_config(state))  # connection refused: logged only
    token = mint(keys.rsa)
    await rejected(verifier, token, "unknown signing key")

    app = web.Application()
    app.router.add_get("/jwks.json", state.handle)
    await aiohttp_server(app, port=port)
    clock.advance(1.1)
    assert (await verifier.verify(token)).caller_id == "caller-1"
    assert state.hits == 1


async def test_verify_before_start_and_after_close(
    idp: Idp, keys: Keys, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    verifier = JwtVerifier(jwks_config(idp), clock=clock)
    await rejected(verifier, mint(keys.rsa), "unknown signing key")
    await verifier.start(session)
    assert (await verifier.verify(mint(keys.rsa))).caller_id == "caller-1"
    with pytest.raises(RuntimeError):
        await verifier.start(session)
    await verifier.close()
    await verifier.close()
    clock.advance(10)
    await rejected(verifier, mint(keys.rsa, kid="new"), "unknown signing key")
    assert idp.hits == 1


# -- background refresh -----------------------------------------------------------------------


def tasks_named(name: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name]


async def test_background_refresh_runs_and_close_cancels_it(
    idp: Idp, keys: Keys, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    # The schema's minimum period is 10 s; an unvalidated copy makes the loop fast enough.
    config = jwks_config(idp).model_copy(update={"jwks_refresh_s": 0.05})
    verifier = JwtVerifier(config, clock=clock)
    await verifier.start(session)
    (refresh,) = tasks_named("jwtauth.jwks-refresh")

    idp.keys = [rsa_jwk(keys.rsa2, "rsa-2")]
    async with asyncio.timeout(5):
        while idp.hits < 3:
            await asyncio.sleep(0.02)
    # Rotation picked up by the periodic refresh alone (the clock never moved).
    assert (await verifier.verify(mint(keys.rsa2, kid="rsa-2"))).caller_id == "caller-1"

    await verifier.close()
    assert refresh.cancelled()
    assert tasks_named("jwtauth.jwks-refresh") == []
    assert tasks_named("jwtauth.jwks-fetch") == []
    hits = idp.hits
    await asyncio.sleep(0.15)
    assert idp.hits == hits


async def test_close_cancels_an_in_flight_fetch(
    idp: Idp, keys: Keys, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    verifier = JwtVerifier(jwks_config(idp), clock=clock)
    await verifier.start(session)
    idp.delay_s = 1.0
    clock.advance(1.1)
    pending = asyncio.ensure_future(verifier.verify(mint(keys.rsa, kid="new")))
    async with asyncio.timeout(5):
        while idp.hits < 2:
            await asyncio.sleep(0.01)
    assert len(tasks_named("jwtauth.jwks-fetch")) == 1
    await verifier.close()
    assert tasks_named("jwtauth.jwks-fetch") == []
    # The request was not cancelled: it fails like any unknown kid.
    with pytest.raises(JwtError, match=r"^unknown signing key$"):
        await pending


async def test_no_background_task_without_jwks(
    tmp_path: Path, keys: Keys, session: aiohttp.ClientSession
) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(keys.ec))
    config = JwtConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=("ES256",), public_key_file=str(pem)
    )
    verifier = JwtVerifier(config)
    await verifier.start(session)
    assert tasks_named("jwtauth.jwks-refresh") == []
    await verifier.close()


# -- PEM loading ------------------------------------------------------------------------------


def pem_config(path: Path, algorithms: tuple[str, ...] = ("RS256",)) -> JwtConfig:
    return JwtConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=algorithms, public_key_file=str(path)
    )


def test_bad_pem_files_fail_at_construction(tmp_path: Path, keys: Keys) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="cannot read it"):
        JwtVerifier(pem_config(missing))

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(ValueError, match="is not a PEM public key"):
        JwtVerifier(pem_config(garbage))

    private = tmp_path / "private.pem"
    private.write_bytes(
        keys.rsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="is not a PEM public key"):
        JwtVerifier(pem_config(private))

    weak = tmp_path / "weak.pem"
    weak.write_bytes(public_pem(keys.weak_rsa))
    with pytest.raises(ValueError, match="1024-bit RSA key"):
        JwtVerifier(pem_config(weak))

    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(public_pem(keys.ec))
    with pytest.raises(ValueError, match="none of the configured algorithms"):
        JwtVerifier(pem_config(ec_pem, ("RS256",)))
    JwtVerifier(pem_config(ec_pem, ("ES256",)))


# -- routing ----------------------------------------------------------------------------------


def test_looks_like_jwt(keys: Keys) -> None:
    for key in ("sk-abc", "gw-test-caller-key-0001", "", "eyJ", "a.b.c", "eyJ.a", "eyJ a.b.c"):
        assert not looks_like_jwt(key)
    assert not looks_like_jwt(mint(keys.rsa) + "\n")
    assert looks_like_jwt(mint(keys.rsa))
    assert looks_like_jwt(mint(keys.ec, "ES256"))
    assert looks_like_jwt(mint(SECRET, "HS256", kid=None))
    assert looks_like_jwt(handmade({"alg": "none"}, claims(), None))


# -- lifetime and absurd time claims ----------------------------------------------------------


def hs256_config(**overrides: Any) -> JwtConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ("HS256",),
        "secret": SecretStr(SECRET),
    }
    values.update(overrides)
    return JwtConfig(**values)


def hs256(**overrides: Any) -> str:
    return mint(SECRET, "HS256", kid=None, **overrides)


def hs256_raw(payload_json: str) -> str:
    """An HS256 token over `payload_json` exactly as written (e.g. the non-JSON `NaN`)."""
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = f"{header}.{b64(payload_json.encode())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def rejected_without_echo(verifier: JwtVerifier, token: str, message: str) -> None:
    """Like `rejected`, and no part of the token (header, payload, signature) is echoed."""
    with pytest.raises(JwtError) as info:
        await verifier.verify(token)
    text = str(info.value)
    assert text == message
    for part in (token, *token.split(".")):
        assert not part or part not in text


async def test_lifetime_up_to_the_bound_passes_beyond_it_fails(
    make_verifier: VerifierFactory,
) -> None:
    verifier = await make_verifier(hs256_config())  # max_lifetime_s defaults to 86400
    now = int(NOW)
    for lifetime in (3600, 86399, 86400, 86399.5):
        token = hs256(iat=now, exp=now + lifetime)
        assert (await verifier.verify(token)).caller_id == "caller-1", lifetime
    for lifetime in (86401, 86400.001, 365 * 86400):
        token = hs256(iat=now, exp=now + lifetime)
        await rejected_without_echo(verifier, token, "token lifetime exceeds the allowed maximum")


async def test_leeway_does_not_extend_the_lifetime(make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(hs256_config(leeway_s=600))
    now = int(NOW)
    await rejected_without_echo(
        verifier, hs256(iat=now, exp=now + 86400 + 1), "token lifetime exceeds the allowed maximum"
    )
    # Currently valid, but issued two days ago for a day and an hour: still too long-lived.
    old = hs256(iat=now - 2 * 86400, exp=now + 3600)
    await rejected_without_echo(verifier, old, "token lifetime exceeds the allowed maximum")


async def test_configured_max_lifetime_is_respected(make_verifier: VerifierFactory) -> None:
    now = int(NOW)
    short = await make_verifier(hs256_config(max_lifetime_s=3600))
    assert (await short.verify(hs256(iat=now, exp=now + 3600))).caller_id == "caller-1"
    await rejected_without_echo(
        short, hs256(iat=now, exp=now + 3601), "token lifetime exceeds the allowed maximum"
    )
    week = await make_verifier(hs256_config(max_lifetime_s=7 * 86400))
    assert (await week.verify(hs256(iat=now, exp=now + 2 * 86400))).caller_id == "caller-1"
    await rejected_without_echo(
        week, hs256(iat=now, exp=now + 8 * 86400), "token lifetime exceeds the allowed maximum"
    )


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", 1e300),
        ("exp", -1e300),
        pytest.param("exp", 10**400, id="exp-10**400"),  # an int: no OverflowError
        ("exp", float("inf")),
        ("exp", float("-inf")),
        ("exp", float("nan")),
        ("exp", True),
        ("exp", False),
        ("exp", 253_402_300_800),  # one second past 9999-12-31T23:59:59Z
        ("exp", [int(NOW) + 300]),
        ("iat", 1e300),
        ("iat", -1e300),
        ("iat", -1),
        ("iat", float("nan")),
        ("iat", float("-inf")),
        ("iat", True),
        pytest.param("iat", "1700000000", id="iat-numeric-string"),
        ("nbf", 1e300),
        ("nbf", float("nan")),
        ("nbf", float("inf")),
        ("nbf", False),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
async def test_absurd_time_claims_are_rejected(
    make_verifier: VerifierFactory, claim: str, value: Any
) -> None:
    verifier = await make_verifier(hs256_config())
    await rejected_without_echo(verifier, hs256(**{claim: value}), f"invalid claim {claim}")


@pytest.mark.parametrize(
    ("times", "claim"),
    [
        ('"iat": 1700000000, "exp": 1e300', "exp"),
        ('"iat": 1700000000, "exp": 1e999', "exp"),  # json reads it as inf
        ('"iat": 1700000000, "exp": NaN', "exp"),
        ('"iat": 1700000000, "exp": Infinity', "exp"),
        ('"iat": 1700000000, "exp": -Infinity', "exp"),
        ('"iat": 1700000000, "exp": true', "exp"),
        ('"iat": NaN, "exp": 1700000300', "iat"),
        ('"iat": -Infinity, "exp": 1700000300', "iat"),
        ('"iat": 1700000000, "exp": 1700000300, "nbf": Infinity', "nbf"),
    ],
)
async def test_non_finite_time_claims_in_raw_json_are_rejected(
    make_verifier: VerifierFactory, times: str, claim: str
) -> None:
    # Written by hand so that the test does not depend on what PyJWT agrees to encode.
    payload = f'{{"iss": "{ISSUER}", "aud": "{AUDIENCE}", "sub": "caller-1", {times}}}'
    verifier = await make_verifier(hs256_config())
    await rejected_without_echo(verifier, hs256_raw(payload), f"invalid claim {claim}")


async def test_raw_json_helper_makes_valid_tokens(make_verifier: VerifierFactory) -> None:
    payload = (
        f'{{"iss": "{ISSUER}", "aud": "{AUDIENCE}", "sub": "caller-1", '
        '"iat": 1700000000, "exp": 1700000300.5}'
    )
    verifier = await make_verifier(hs256_config())
    assert (await verifier.verify(hs256_raw(payload))).caller_id == "caller-1"
