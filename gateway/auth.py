"""Caller authentication: API keys from the YAML (stored and compared as sha256 digests) and
JWTs (see jwtauth.py). Both end as a frozen `Caller` with its tier's limits."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from gateway.config.runtime import Caller, Runtime, make_caller
from gateway.errors import GatewayError, Kind
from gateway.jwtauth import JwtError, JwtVerifier, looks_like_jwt

# Longer than any real key format; bounds the hashing work an anonymous request can cause.
MAX_KEY_BYTES = 512


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key from `Authorization: Bearer` (OpenAI SDK) or `x-api-key` (Anthropic
    SDK); None when neither is present."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


async def authenticate(
    headers: Mapping[str, str], runtime: Runtime, jwt: JwtVerifier | None = None
) -> Caller:
    """The caller for this request. Raises GatewayError 401 (never echoing the credential)."""
    key = presented_key(headers)
    if key is not None and jwt is not None and looks_like_jwt(key):
        return await _jwt_caller(key, runtime, jwt)
    return api_key_caller(key, runtime)


async def _jwt_caller(token: str, runtime: Runtime, jwt: JwtVerifier) -> Caller:
    try:
        identity = await jwt.verify(token)
    except JwtError as exc:
        raise GatewayError(401, Kind.AUTHENTICATION, f"Invalid token: {exc}.") from None
    tier_name = identity.tier or runtime.default_tier
    tier = runtime.tiers.get(tier_name) if tier_name is not None else None
    if tier_name is not None and tier is None:
        raise GatewayError(401, Kind.AUTHENTICATION, "Invalid token: unknown tier.")
    # A namespace of their own: a token's subject never shares limits with an API key id.
    return make_caller(f"jwt:{identity.caller_id}", tier, None)


def api_key_caller(key: str | None, runtime: Runtime) -> Caller:
    """The caller of a static API key. Raises GatewayError 401."""
    if key is None:
        raise GatewayError(
            401,
            Kind.AUTHENTICATION,
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        )
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_KEY_BYTES:
        raise GatewayError(401, Kind.AUTHENTICATION, "Invalid API key.")
    digest = hashlib.sha256(raw).hexdigest()
    # Keys are compared as sha256 digests: whatever timing the lookup shows is about the
    # digest of what the attacker sent, which tells nothing about any stored key's bytes.
    caller = runtime.callers.get(digest)
    # The constant-time compare on top is belt and braces: equal digests mean equal keys.
    if caller is None or not hmac.compare_digest(digest, runtime.digests[caller.id]):
        raise GatewayError(401, Kind.AUTHENTICATION, "Invalid API key.")
    return caller
