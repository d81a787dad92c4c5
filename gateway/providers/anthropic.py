"""Anthropic Messages wire API: endpoints, request building, the stream observer, error
formats, model lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import Kind
from gateway.providers.base import (
    ApiFamily,
    Endpoint,
    ParsedRequest,
    StreamFacts,
    Stripper,
    UpstreamRequest,
    Usage,
    as_int,
    short,
    text_size,
)
from gateway.providers.common import base_headers, rewritten_body, upstream_request
from gateway.sse import SSEEvent

if TYPE_CHECKING:
    from gateway.config.runtime import ProviderSpec


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _merge_usage(old: Usage | None, raw: Any) -> Usage | None:
    # message_start carries input tokens; message_delta carries the cumulative output (and,
    # on some servers, a corrected input count): later values win, absent ones are kept.
    if not isinstance(raw, dict):
        return old
    base = old or Usage()
    inp = as_int(raw.get("input_tokens"))
    out = as_int(raw.get("output_tokens"))
    cached = as_int(raw.get("cache_read_input_tokens"))
    return Usage(
        input_tokens=inp if inp is not None else base.input_tokens,
        output_tokens=out if out is not None else base.output_tokens,
        cache_read_input_tokens=cached if cached is not None else base.cache_read_input_tokens,
    )


_MARKERS = (b"message_delta", b"message_stop", b"error")


class MessagesObserver:
    """Messages stream: everything needed is named by the `event:` field, so only
    message_start, message_delta and error payloads are ever parsed."""

    __slots__ = ("facts",)

    def __init__(self) -> None:
        self.facts = StreamFacts()

    def on_event(self, event: SSEEvent, now: float) -> None:
        facts = self.facts
        index = facts.events
        facts.events = index + 1
        name = event.event
        if name == "content_block_delta":
            if facts.first_token_at is None:
                facts.first_token_at = now
                facts.first_token_event = index
            return
        if name in ("ping", "content_block_start", "content_block_stop"):
            return
        obj = _loads(event.data)
        if obj is None:
            return
        if not name:  # a server that omits `event:`: the payload's type says the same
            kind = obj.get("type")
            name = kind if isinstance(kind, str) else ""
            if name == "content_block_delta":
                if facts.first_token_at is None:
                    facts.first_token_at = now
                    facts.first_token_event = index
                return
        if name == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if facts.response_id is None:
                    facts.response_id = short(message.get("id"))
                    facts.response_model = short(message.get("model"))
                facts.usage = _merge_usage(facts.usage, message.get("usage"))
        elif name == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                facts.finish_reason = short(delta["stop_reason"], 64)
            facts.usage = _merge_usage(facts.usage, obj.get("usage"))
        elif name == "message_stop":
            facts.done = True
        elif name == "error":
            error = obj.get("error")
            if isinstance(error, dict):
                facts.error_type = short(error.get("type") or "error", 64)
                facts.error_message = short(error.get("message"))

    def quiet(self, window: bytes) -> bool:
        # After the first token: message_delta (finish reason, usage), message_stop and error
        # events matter; content blocks and pings do not.
        return not any(marker in window for marker in _MARKERS)

    def skip(self, events: list[SSEEvent]) -> None:
        self.facts.events += len(events)

    def next_sequence_number(self) -> int:
        return 0  # Messages events are not numbered

    def content_size(self, event: SSEEvent) -> int:
        name = event.event
        if name and name != "content_block_delta":
            return 0
        obj = _loads(event.data)
        if obj is None or (not name and obj.get("type") != "content_block_delta"):
            return 0
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return 0
        # text_delta, input_json_delta (tool input), thinking_delta.
        return (
            text_size(delta.get("text"))
            + text_size(delta.get("partial_json"))
            + text_size(delta.get("thinking"))
        )

    def on_end(self) -> None:
        return None


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a non-stream Messages response body."""
    obj = _loads(body)
    return _merge_usage(None, obj.get("usage")) if obj else None


ENDPOINTS = (
    Endpoint(
        family=ApiFamily.ANTHROPIC,
        path="/v1/messages",
        upstream_path="/v1/messages",
        operation="chat",
        streams=True,
        cap_fields=("max_tokens",),
        fill_cap=True,
        observer=MessagesObserver,
    ),
    Endpoint(
        family=ApiFamily.ANTHROPIC,
        path="/v1/messages/count_tokens",
        upstream_path="/v1/messages/count_tokens",
        operation="count_tokens",
        streams=False,
        billed=False,
    ),
)


# Kind -> the Anthropic API's error type.
_ERRORS: dict[Kind, str] = {
    Kind.INVALID_REQUEST: "invalid_request_error",
    Kind.AUTHENTICATION: "authentication_error",
    Kind.PERMISSION: "permission_error",
    Kind.NOT_FOUND: "not_found_error",
    Kind.ROUTE_NOT_FOUND: "not_found_error",
    Kind.METHOD_NOT_ALLOWED: "invalid_request_error",
    Kind.TOO_LARGE: "request_too_large",
    Kind.REQUEST_TIMEOUT: "invalid_request_error",
    Kind.RATE_LIMITED: "rate_limit_error",
    Kind.BUDGET_EXCEEDED: "budget_exceeded",
    Kind.UPSTREAM_UNAVAILABLE: "api_error",
    Kind.UPSTREAM_TIMEOUT: "timeout_error",
    Kind.UPSTREAM_ERROR: "api_error",
    Kind.UPSTREAM_CREDENTIALS: "api_error",
    Kind.OVERLOADED: "overloaded_error",
    Kind.LIMITER_UNAVAILABLE: "api_error",
    Kind.CANCELLED_BY_OPERATOR: "api_error",
    Kind.STREAM_NOT_FOUND: "not_found_error",
    Kind.GONE: "invalid_request_error",
    Kind.RANGE: "invalid_request_error",
    Kind.INTERNAL: "api_error",
}


def error_type(kind: Kind) -> str:
    return _ERRORS[kind]


class AnthropicApi:
    """The Anthropic Messages wire API behind the `WireApi` seam."""

    family = ApiFamily.ANTHROPIC
    endpoints: tuple[Endpoint, ...] = ENDPOINTS
    request_id_header = "request-id"

    def build_request(
        self,
        parsed: ParsedRequest,
        provider: ProviderSpec,
        model: str,
        cap: int | None,
        secret: str,
    ) -> UpstreamRequest:
        body = rewritten_body(parsed, provider, model, cap)
        headers = base_headers(parsed, provider)
        headers["x-api-key"] = secret
        headers["anthropic-version"] = parsed.headers.get(
            "anthropic-version", provider.anthropic_version
        )
        beta = parsed.headers.get("anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        return upstream_request(parsed, provider, body, headers)

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body(body)

    def error_body(
        self, kind: Kind, message: str, *, param: str | None, request_id: str | None
    ) -> bytes:
        body: dict[str, object] = {
            "type": "error",
            "error": {"type": _ERRORS[kind], "message": message},
        }
        if request_id is not None:
            body["request_id"] = request_id
        return orjson.dumps(body)

    def terminal_event(self, endpoint: Endpoint, kind: Kind, message: str, sequence: int) -> bytes:
        payload = orjson.dumps(
            {"type": "error", "error": {"type": _ERRORS[kind], "message": message}}
        )
        return b"event: error\ndata: " + payload + b"\n\n"

    def injects_usage(self, parsed: ParsedRequest) -> bool:
        return False  # every Messages stream carries its usage

    def usage_stripper(self) -> Stripper:
        raise NotImplementedError("Messages streams carry usage: nothing is injected")

    def model_list(self, names: Sequence[str]) -> dict[str, Any]:
        data = [self.model_object(n) for n in names]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def model_object(self, name: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": name,
            "display_name": name,
            "created_at": "1970-01-01T00:00:00Z",
        }


API = AnthropicApi()
