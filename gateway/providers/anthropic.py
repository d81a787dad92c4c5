"""Anthropic Messages wire API: endpoints and the stream observer."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import ApiFamily
from gateway.providers.base import Endpoint, StreamFacts, Usage, as_int, short
from gateway.sse import SSEEvent


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
    ),
)
