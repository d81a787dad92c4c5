"""Wire APIs the gateway speaks. A new wire API is one module here and its entry below."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway import __version__
from gateway.errors import ApiFamily
from gateway.providers import anthropic, openai
from gateway.providers.base import Endpoint, ParsedRequest, UpstreamRequest, as_int

if TYPE_CHECKING:
    from gateway.config.runtime import ProviderSpec

ENDPOINTS: tuple[Endpoint, ...] = openai.ENDPOINTS + anthropic.ENDPOINTS

_USER_AGENT = f"llm-stream-gateway/{__version__}"


def build_upstream_request(
    parsed: ParsedRequest,
    provider: ProviderSpec,
    upstream_model: str,
    max_tokens_cap: int | None,
    secret: str,
) -> UpstreamRequest:
    """One attempt's upstream request, built afresh from the untouched parsed original.

    The model is rewritten to the deployment's name, the output cap clamped (or filled in
    where the API has no bound of its own), and the caller's credentials replaced by `secret`.
    """
    endpoint = parsed.endpoint
    body = dict(parsed.body)  # shallow: only top-level fields are rewritten
    body["model"] = upstream_model
    if parsed.inject_usage:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    if max_tokens_cap is not None and endpoint.cap_fields:
        present = False
        for cap_field in endpoint.cap_fields:
            # An explicit null means "no limit" upstream: treat it as absent, not as a value.
            if body.get(cap_field) is not None:
                present = True
                value = as_int(body[cap_field])
                # The edge refuses non-integers; whatever got here is never sent above the cap.
                if value is None or value > max_tokens_cap:
                    body[cap_field] = max_tokens_cap
        if not present and endpoint.fill_cap:
            fill = (
                provider.chat_max_tokens_field
                if endpoint.path == "/v1/chat/completions"
                else endpoint.cap_fields[0]
            )
            body[fill] = max_tokens_cap

    headers: dict[str, str] = {
        "content-type": "application/json",
        # The relay forwards bytes as they arrive: a compressed upstream body would have to be
        # inflated (and buffered by zlib) first.
        "accept-encoding": "identity",
        "user-agent": _USER_AGENT,
    }
    if provider.forward_exact or provider.forward_prefixes:
        for raw_name, header_value in parsed.headers.items():
            name = raw_name.lower()
            if name in provider.forward_exact or name.startswith(provider.forward_prefixes):
                headers[name] = header_value
    headers.update(provider.headers)
    if endpoint.family is ApiFamily.ANTHROPIC:
        headers["x-api-key"] = secret
        headers["anthropic-version"] = parsed.headers.get(
            "anthropic-version", provider.anthropic_version
        )
        beta = parsed.headers.get("anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
    else:
        headers["authorization"] = f"Bearer {secret}"
    return UpstreamRequest(
        url=provider.base_url + endpoint.upstream_path,
        headers=headers,
        body=orjson.dumps(body),
    )


__all__ = ["ENDPOINTS", "Endpoint", "ParsedRequest", "UpstreamRequest", "build_upstream_request"]
