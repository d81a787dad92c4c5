"""Anthropic answers: Messages (the event stream and the message object) and count_tokens,
byte for byte in the shapes the API sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.fake.content import FAKE_TOOL_ARGUMENTS, estimate_prompt_tokens
from gateway.fake.errors import messages_error
from gateway.fake.inputs import Gen
from gateway.fake.wire import Event, StreamPlan, frame, rand_id, typed_event

# Anthropic really sends ping with a space after the colon; keep it so relays meet it.
_PING: Final = b'{"type": "ping"}'


def _delta_usage(prompt: int, output: int) -> dict[str, int]:
    """The usage of a ``message_delta`` event, keys in the API's order."""
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    }


def _message_usage(prompt: int, output: int) -> dict[str, Any]:
    """The usage of a message object (``message_start``, non-stream bodies), as the API sends it.

    Keys in the API's order: cache counters, the per-TTL cache breakdown, tier and geography.
    """
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }


def _stop_reason(g: Gen, cut: bool) -> str:
    if cut:
        return "max_tokens"
    return "end_turn" if g.tool_name is None else "tool_use"


def _message(
    g: Gen, content: list[Any], stop_reason: str | None, output_tokens: int
) -> dict[str, Any]:
    return {
        "id": "msg_" + rand_id(),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _message_usage(g.prompt_tokens, output_tokens),
    }


def _tool_use_block(g: Gen, tool_input: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": "toolu_" + rand_id(),
        "name": g.tool_name,
        "input": tool_input,
    }


def messages_stream(g: Gen) -> StreamPlan:
    """A Messages stream: ``message_start``, ``ping``, one content block (text, or a tool use
    whose input arrives as JSON fragments), ``message_delta`` and ``message_stop``."""
    pieces, cut = g.pieces()
    events: list[Event] = []

    def add(payload: Mapping[str, Any], content: bool = False, terminal: bool = False) -> None:
        events.append(typed_event(payload, g.eol, content, terminal))

    add({"type": "message_start", "message": _message(g, [], None, 1)})
    events.append(Event(frame(_PING, g.eol, b"ping"), False))
    deltas: list[dict[str, Any]]
    if g.tool_name is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        add({"type": "content_block_start", "index": 0, "content_block": block})
        deltas = [{"type": "text_delta", "text": p} for p in pieces]
    else:
        block = _tool_use_block(g, {})
        add({"type": "content_block_start", "index": 0, "content_block": block})
        # Anthropic opens every tool_use input with an empty fragment; it carries no content.
        empty = {"type": "input_json_delta", "partial_json": ""}
        add({"type": "content_block_delta", "index": 0, "delta": empty})
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    for delta in deltas:
        add({"type": "content_block_delta", "index": 0, "delta": delta}, True)
    add({"type": "content_block_stop", "index": 0})
    add(
        {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(g, cut), "stop_sequence": None},
            # The real API repeats the input and cache counters here, not only the output.
            "usage": _delta_usage(g.prompt_tokens, len(pieces)),
        }
    )
    add({"type": "message_stop"}, terminal=True)
    return StreamPlan(events, messages_error(g.script, g.eol, g.echo))


def messages_body(g: Gen) -> bytes:
    """A non-stream Messages answer: one text block (with any key echo) or one tool use."""
    pieces, cut = g.pieces()
    block: dict[str, Any]
    if g.tool_name is None:
        block = {"type": "text", "text": "".join(pieces) + g.echo}
    else:
        # A cut-short argument string is not JSON; Anthropic would not parse it either.
        block = _tool_use_block(g, orjson.loads(FAKE_TOOL_ARGUMENTS) if not cut else {})
    message = _message(g, [block], _stop_reason(g, cut), len(pieces))
    return orjson.dumps(message)


def count_tokens_body(body: Mapping[str, Any]) -> bytes:
    """A count_tokens answer: `estimate_prompt_tokens` of the request."""
    return orjson.dumps({"input_tokens": estimate_prompt_tokens(body)})
