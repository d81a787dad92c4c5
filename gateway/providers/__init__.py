"""Wire APIs the gateway speaks. A new wire API is one module implementing `WireApi`
(gateway/providers/base.py) and its entry in `WIRE_APIS`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from gateway.providers import anthropic, openai
from gateway.providers.base import (
    ApiFamily,
    Endpoint,
    ParsedRequest,
    UpstreamRequest,
    WireApi,
)

if TYPE_CHECKING:
    from gateway.config.runtime import ProviderSpec

WIRE_APIS: Mapping[ApiFamily, WireApi] = MappingProxyType(
    {ApiFamily.OPENAI: openai.API, ApiFamily.ANTHROPIC: anthropic.API}
)

ENDPOINTS: tuple[Endpoint, ...] = tuple(e for api in WIRE_APIS.values() for e in api.endpoints)


def wire_api(family: ApiFamily) -> WireApi:
    return WIRE_APIS[family]


def caller_api(path: str, headers: Mapping[str, str]) -> ApiFamily:
    """The API a caller speaks, from what any request shows before it is routed: the Anthropic
    SDK sends `anthropic-version` on every request (and uses /v1/messages); the OpenAI SDK
    never does."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return ApiFamily.ANTHROPIC
    return ApiFamily.OPENAI


def build_upstream_request(
    parsed: ParsedRequest,
    provider: ProviderSpec,
    upstream_model: str,
    max_tokens_cap: int | None,
    secret: str,
) -> UpstreamRequest:
    """One attempt's upstream request, built afresh from the untouched parsed original: the
    model rewritten to the deployment's name, the output cap clamped (or filled in where the
    API has no bound of its own), and the caller's credentials replaced by `secret`."""
    api = WIRE_APIS[parsed.endpoint.family]
    return api.build_request(parsed, provider, upstream_model, max_tokens_cap, secret)


__all__ = [
    "ENDPOINTS",
    "WIRE_APIS",
    "ApiFamily",
    "Endpoint",
    "ParsedRequest",
    "UpstreamRequest",
    "WireApi",
    "build_upstream_request",
    "caller_api",
    "wire_api",
]
