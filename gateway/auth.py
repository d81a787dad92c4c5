"""Caller authentication: API keys from the YAML, stored and compared as sha256 digests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from gateway.config.runtime import Caller, Runtime
from gateway.errors import GatewayError, Kind

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


def authenticate(headers: Mapping[str, str], runtime: Runtime) -> Caller:
    """The caller for this request. Raises GatewayError 401 (never echoing the key)."""
    key = presented_key(headers)
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
    if caller is None:
        raise GatewayError(401, Kind.AUTHENTICATION, "Invalid API key.")
    return caller
