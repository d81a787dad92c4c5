"""What every wire API's request building shares: the body rewrite (model, output cap) and the
headers every upstream request carries. Each API adds its own credentials and extras."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway import __version__
from gateway.providers.base import ParsedRequest, UpstreamRequest, as_int

if TYPE_CHECKING:
    from gateway.config.runtime import ProviderSpec

_USER_AGENT = f"llm-stream-gateway/{__version__}"


def rewritten_body(
    parsed: ParsedRequest, provider: ProviderSpec, model: str, cap: int | None
) -> dict[str, Any]:
    """A shallow copy of the caller's body with the deployment's model name and the output cap
    clamped (or filled in where the API has no bound of its own). The original is untouched."""
    endpoint = parsed.endpoint
    body = dict(parsed.body)  # shallow: only top-level fields are rewritten
    body["model"] = model
    if cap is None or not endpoint.cap_fields:
        return body
    present = False
    for cap_field in endpoint.cap_fields:
        # An explicit null means "no limit" upstream: treat it as absent, not as a value.
        if body.get(cap_field) is not None:
            present = True
            value = as_int(body[cap_field])
            # The edge refuses non-integers; whatever got here is never sent above the cap.
            if value is None or value > cap:
                body[cap_field] = cap
    if not present and endpoint.fill_cap:
        fill = (
            provider.chat_max_tokens_field
            if endpoint.path == "/v1/chat/completions"
            else endpoint.cap_fields[0]
        )
        body[fill] = cap
    return body


def base_headers(parsed: ParsedRequest, provider: ProviderSpec) -> dict[str, str]:
    """Content type, identity encoding, user agent, the caller headers the provider forwards,
    and the provider's fixed headers."""
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
    return headers


def upstream_request(
    parsed: ParsedRequest, provider: ProviderSpec, body: dict[str, Any], headers: dict[str, str]
) -> UpstreamRequest:
    return UpstreamRequest(
        url=provider.base_url + parsed.endpoint.upstream_path,
        headers=headers,
        body=orjson.dumps(body),
    )
