"""OpenAI Responses answers: the event stream (numbered events around one output item, a
message or a function call) and the response object of a non-stream answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.fake.errors import responses_error
from gateway.fake.inputs import Gen
from gateway.fake.wire import Event, StreamPlan, rand_id, typed_event


@dataclass(frozen=True, slots=True)
class _Ids:
    response: str
    item: str
    call: str

    @classmethod
    def new(cls, tool: bool) -> _Ids:
        return cls(
            response="resp_" + rand_id(24),
            item=("fc_" if tool else "msg_") + rand_id(24),
            call="call_" + rand_id(),
        )


def _usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _response_object(
    g: Gen, ids: _Ids, status: str, output: list[Any], usage: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A response object, without ``error`` or ``incomplete_details`` (callers set them)."""
    instructions = g.body.get("instructions")
    tools = g.body.get("tools")
    return {
        "id": ids.response,
        "object": "response",
        "created_at": g.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": g.max_tokens,
        "model": g.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": g.body.get("tool_choice", "auto"),
        "tools": tools if isinstance(tools, list) else [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _final(g: Gen, ids: _Ids, text_suffix: str = "") -> tuple[dict[str, Any], list[str], bool]:
    """The completed (or incomplete) response object, the pieces and whether they were cut.

    ``text_suffix`` is appended to a text answer's output text, not to the pieces.
    """
    pieces, cut = g.pieces()
    joined = "".join(pieces)
    item: dict[str, Any]
    if g.tool_name is None:
        text = joined + text_suffix
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {
            "id": ids.item,
            "type": "message",
            "status": "incomplete" if cut else "completed",
            "content": [part],
            "role": "assistant",
        }
    else:
        item = {
            "id": ids.item,
            "type": "function_call",
            "status": "incomplete" if cut else "completed",
            "arguments": joined,
            "call_id": ids.call,
            "name": g.tool_name,
        }
    usage = _usage(g.prompt_tokens, len(pieces))
    obj = _response_object(g, ids, "incomplete" if cut else "completed", [item], usage)
    obj["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
    return obj, pieces, cut


class _Sequence:
    """A stream's events in order, each numbered (``sequence_number``) as it is added."""

    __slots__ = ("eol", "events")

    def __init__(self, eol: bytes) -> None:
        self.eol = eol
        self.events: list[Event] = []

    def add(self, payload: dict[str, Any], content: bool = False, terminal: bool = False) -> None:
        payload["sequence_number"] = len(self.events)
        self.events.append(typed_event(payload, self.eol, content, terminal))


def _add_message(seq: _Sequence, ids: _Ids, item: Mapping[str, Any], pieces: Sequence[str]) -> None:
    """The events of a message item, from ``output_item.added`` to ``content_part.done``."""
    item_added = {**item, "status": "in_progress", "content": []}
    seq.add({"type": "response.output_item.added", "output_index": 0, "item": item_added})
    empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    text_common = {"item_id": ids.item, "output_index": 0, "content_index": 0}
    seq.add({"type": "response.content_part.added", **text_common, "part": empty})
    for p in pieces:
        delta = {"type": "response.output_text.delta", **text_common, "delta": p}
        seq.add({**delta, "logprobs": []}, True)
    joined = "".join(pieces)
    seq.add({"type": "response.output_text.done", **text_common, "logprobs": [], "text": joined})
    seq.add({"type": "response.content_part.done", **text_common, "part": item["content"][0]})


def _add_function_call(
    seq: _Sequence, ids: _Ids, item: Mapping[str, Any], pieces: Sequence[str]
) -> None:
    """The events of a function call item, from ``output_item.added`` to ``arguments.done``."""
    item_added = {**item, "status": "in_progress", "arguments": ""}
    seq.add({"type": "response.output_item.added", "output_index": 0, "item": item_added})
    common = {"item_id": ids.item, "output_index": 0}
    for p in pieces:
        seq.add({"type": "response.function_call_arguments.delta", **common, "delta": p}, True)
    joined = "".join(pieces)
    seq.add({"type": "response.function_call_arguments.done", **common, "arguments": joined})


def responses_stream(g: Gen) -> StreamPlan:
    """A Responses stream: ``response.created`` and ``in_progress``, the output item's events,
    ``output_item.done``, then ``response.completed`` (``response.incomplete`` when cut)."""
    ids = _Ids.new(g.tool_name is not None)
    final, pieces, cut = _final(g, ids)
    seq = _Sequence(g.eol)
    start = _response_object(g, ids, "in_progress", [], None)
    seq.add({"type": "response.created", "response": start})
    seq.add({"type": "response.in_progress", "response": start})
    item = final["output"][0]
    if g.tool_name is None:
        _add_message(seq, ids, item, pieces)
    else:
        _add_function_call(seq, ids, item, pieces)
    seq.add({"type": "response.output_item.done", "output_index": 0, "item": item})
    kind = "response.incomplete" if cut else "response.completed"
    seq.add({"type": kind, "response": final}, terminal=True)

    def failed(error: dict[str, Any]) -> dict[str, Any]:
        obj = _response_object(g, ids, "failed", [], None)
        obj["error"] = error
        return obj

    return StreamPlan(seq.events, responses_error(g.script, g.eol, g.echo, failed))


def responses_body(g: Gen) -> bytes:
    """A non-stream Responses answer: the final response object (text with any key echo)."""
    ids = _Ids.new(g.tool_name is not None)
    final, _pieces, _cut = _final(g, ids, g.echo)
    return orjson.dumps(final)
