"""What the fake answers on each API: the builders of its streams and bodies, and which APIs
stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from gateway.fake.anthropic import count_tokens_body, messages_body, messages_stream
from gateway.fake.inputs import Gen
from gateway.fake.openai import (
    chat_body,
    chat_stream,
    completions_body,
    completions_stream,
    embeddings_body,
    models_body,
)
from gateway.fake.records import RequestRecord
from gateway.fake.responses import responses_body, responses_stream
from gateway.fake.wire import Api, StreamPlan

_STREAM_BUILDERS: Final[Mapping[str, Callable[[Gen], StreamPlan]]] = MappingProxyType(
    {
        "chat": chat_stream,
        "completions": completions_stream,
        "responses": responses_stream,
        "messages": messages_stream,
    }
)
_BODY_BUILDERS: Final[Mapping[str, Callable[[Gen], bytes]]] = MappingProxyType(
    {
        "chat": chat_body,
        "completions": completions_body,
        "responses": responses_body,
        "messages": messages_body,
    }
)


def streams(api: Api) -> bool:
    """Whether ``api`` answers ``"stream": true`` requests with a generated stream."""
    return api in _STREAM_BUILDERS


def stream_plan(api: Api, body: Mapping[str, Any], model: str, record: RequestRecord) -> StreamPlan:
    """Build a generated stream, its first content event padded to ``event_bytes``.

    Raises `Reject` for a bad request field.
    """
    g = Gen.from_request(api, body, model, record)
    build = _STREAM_BUILDERS[api]
    plan = build(g)
    target = record.script.event_bytes
    first = next((e for e in plan.events if e.content), None)
    if first is not None and len(first.payload) < target:
        # One padding character is one byte more in the event, and a rebuild keeps the
        # widths of everything else (ids, timestamps, sequence numbers): exact in one go.
        plan = build(dataclasses.replace(g, pad=target - len(first.payload)))
    return plan


def body_payload(api: Api, body: Mapping[str, Any], model: str, record: RequestRecord) -> bytes:
    """Build the JSON body of a non-stream answer; raises `Reject` for a bad request field."""
    if api == "embeddings":
        return embeddings_body(body, model)
    if api == "models":
        return models_body()
    if api == "count":
        return count_tokens_body(body)
    return _BODY_BUILDERS[api](Gen.from_request(api, body, model, record))
