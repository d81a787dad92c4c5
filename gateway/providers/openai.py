"""OpenAI wire API (and every OpenAI-compatible server): endpoints, request building, stream
observers, error formats, usage injection and stripping, model lists."""

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

_DONE = b"[DONE]"
# Substring probes on the raw event: OpenAI sends compact JSON, so a chunk that carries a
# finish reason, usage or an error shows one of these. Other spellings (spaces after colons)
# are still caught: a finish/usage not seen by the probes is read from the last event at the end.
_FINISH_NULL = b'"finish_reason":null'
_FINISH = b"finish_reason"
_FINISH_KEY = b'"finish_reason"'
_USAGE = b'"usage":{'
_USAGE_KEY = b'"usage"'
_USAGE_NULL = b'"usage":null'
_ERROR = b'"error"'
# What can end or fail a Responses stream (and an `error` event): seen, the events are shown.
_RESPONSES_MARKERS = (b"response.completed", b"response.incomplete", b"response.failed", b"error")


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    details = obj.get("prompt_tokens_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:  # Responses API
        details = obj.get("input_tokens_details")
        cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is None:  # DeepSeek reports prompt_cache_hit_tokens
        cached = as_int(obj.get("prompt_cache_hit_tokens"))
    return Usage(
        input_tokens=as_int(obj.get("prompt_tokens", obj.get("input_tokens"))),
        output_tokens=as_int(obj.get("completion_tokens", obj.get("output_tokens"))),
        cache_read_input_tokens=cached,
    )


_DELTA_TEXT = ("content", "reasoning_content", "reasoning", "refusal")


def _delta_size(delta: Any) -> int:
    """Characters of output in one chat delta (text, reasoning, refusal, tool calls)."""
    if not isinstance(delta, dict):
        return 0
    size = 0
    for name in _DELTA_TEXT:
        size += text_size(delta.get(name))
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                size += _function_size(call.get("function"))
    return size + _function_size(delta.get("function_call"))


def _function_size(function: Any) -> int:
    if not isinstance(function, dict):
        return 0
    return text_size(function.get("name")) + text_size(function.get("arguments"))


def _has_content(delta: Any) -> bool:
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("function_call")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("refusal")
    )


class ChatObserver:
    """Chat Completions (`chat.completion.chunk`) and legacy Completions (`text_completion`)."""

    __slots__ = ("_last", "_text", "facts")

    def __init__(self, *, text_completion: bool = False) -> None:
        self.facts = StreamFacts()
        self._text = text_completion
        self._last: bytes | None = None

    def on_event(self, event: SSEEvent, now: float) -> None:
        facts = self.facts
        index = facts.events
        facts.events = index + 1
        data = event.data
        if data == _DONE:
            facts.done = True
            return
        self._last = data
        if facts.first_token_at is not None and not (
            _USAGE in data or _ERROR in data or (_FINISH in data and _FINISH_NULL not in data)
        ):
            return
        obj = _loads(data)
        if obj is None:
            return
        self._read(obj)
        if facts.first_token_at is None and self._content(obj):
            facts.first_token_at = now
            facts.first_token_event = index

    def quiet(self, window: bytes) -> bool:
        # After the first token only a finish reason, usage, an error and [DONE] matter;
        # every ordinary chunk carries `"finish_reason":null` (and `"usage":null` when usage
        # was asked for), so a count that differs means one of them (or another spelling).
        return (
            _DONE not in window
            and _ERROR not in window
            and window.count(_FINISH_KEY) == window.count(_FINISH_NULL)
            and window.count(_USAGE_KEY) == window.count(_USAGE_NULL)
        )

    def skip(self, events: list[SSEEvent]) -> None:
        self.facts.events += len(events)

    def next_sequence_number(self) -> int:
        return 0  # Chat and Completions events are not numbered

    def content_size(self, event: SSEEvent) -> int:
        data = event.data
        if data == _DONE:
            return 0
        obj = _loads(data)
        choices = obj.get("choices") if obj is not None else None
        if not isinstance(choices, list):
            return 0
        size = 0
        for choice in choices:
            if isinstance(choice, dict):
                if self._text:
                    size += text_size(choice.get("text"))
                else:
                    size += _delta_size(choice.get("delta"))
        return size

    def on_end(self) -> None:
        facts = self.facts
        if (facts.usage is None or facts.finish_reason is None) and self._last is not None:
            obj = _loads(self._last)
            if obj is not None:
                self._read(obj)

    def _content(self, obj: dict[str, Any]) -> bool:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if self._text:
                if choice.get("text"):
                    return True
            elif _has_content(choice.get("delta")):
                return True
        return False

    def _read(self, obj: dict[str, Any]) -> None:
        facts = self.facts
        if facts.response_id is None and isinstance(obj.get("id"), str) and obj["id"]:
            facts.response_id = short(obj["id"])
            facts.response_model = short(obj.get("model"))
        error = obj.get("error")
        if isinstance(error, dict):
            facts.error_type = short(error.get("type") or error.get("code") or "error", 64)
            facts.error_message = short(error.get("message"))
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                    facts.finish_reason = short(choice["finish_reason"], 64)
        usage = _usage(obj.get("usage"))
        if usage is not None:
            facts.usage = usage


class ResponsesObserver:
    """Responses API: typed events; usage and status in the one terminal event."""

    __slots__ = ("_last", "facts")

    _TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self) -> None:
        self.facts = StreamFacts()
        self._last: bytes | None = None  # the last event's data (a reference, not a copy)

    def next_sequence_number(self) -> int:
        """The `sequence_number` an event appended now must carry: one more than the last
        event's (read only when asked), else the count of events seen (numbering from 0)."""
        if self._last is not None:
            obj = _loads(self._last)
            number = obj.get("sequence_number") if obj is not None else None
            if isinstance(number, int) and not isinstance(number, bool) and number >= 0:
                return number + 1
        return self.facts.events

    def on_event(self, event: SSEEvent, now: float) -> None:
        facts = self.facts
        index = facts.events
        facts.events = index + 1
        self._last = event.data
        name = event.event
        if not name:  # a compatible server that omits `event:`: the type is in the payload
            obj = _loads(event.data)
            name = obj.get("type", "") if obj is not None else ""
            if not isinstance(name, str):
                return
        if name.endswith(".delta"):
            if facts.first_token_at is None:
                facts.first_token_at = now
                facts.first_token_event = index
            return
        if name == "response.created":
            obj = _loads(event.data)
            response = obj.get("response") if obj else None
            if isinstance(response, dict):
                facts.response_id = short(response.get("id"))
                facts.response_model = short(response.get("model"))
        elif name in self._TERMINAL:
            facts.done = True
            obj = _loads(event.data)
            response = obj.get("response") if obj else None
            if not isinstance(response, dict):
                return
            facts.response_id = short(response.get("id")) or facts.response_id
            status = response.get("status")
            details = response.get("incomplete_details")
            if isinstance(details, dict) and isinstance(details.get("reason"), str):
                facts.finish_reason = short(details["reason"], 64)
            elif isinstance(status, str):
                facts.finish_reason = short(status, 64)
            usage = _usage(response.get("usage"))
            if usage is not None:
                facts.usage = usage
            error = response.get("error")
            if isinstance(error, dict) and facts.error_type is None:
                facts.error_type = short(error.get("code") or "error", 64)
                facts.error_message = short(error.get("message"))
        elif name == "error":
            obj = _loads(event.data)
            if obj is not None:
                # Documented shape: code/message at the top; recorded streams also nest them
                # in an `error` object.
                nested = obj.get("error")
                inner: dict[str, Any] = nested if isinstance(nested, dict) else {}
                facts.error_type = short(
                    obj.get("code") or inner.get("code") or inner.get("type") or "error", 64
                )
                facts.error_message = short(obj.get("message") or inner.get("message"))

    def quiet(self, window: bytes) -> bool:
        return not any(marker in window for marker in _RESPONSES_MARKERS)

    def content_size(self, event: SSEEvent) -> int:
        # Every output delta (text, refusal, reasoning, tool-call arguments) is a
        # `response.*.delta` event with a string `delta`.
        name = event.event
        if name and not name.endswith(".delta"):
            return 0
        obj = _loads(event.data)
        if obj is None or (not name and not str(obj.get("type", "")).endswith(".delta")):
            return 0
        return text_size(obj.get("delta"))

    def skip(self, events: list[SSEEvent]) -> None:
        self.facts.events += len(events)
        self._last = events[-1].data  # its sequence number numbers the gateway's own event

    def on_end(self) -> None:
        return None


class UsageStripper:
    """Removes what `stream_options.include_usage` added to an OpenAI stream: the `"usage":null`
    member of every chunk and the usage-only chunk before `[DONE]`, so that the client's bytes
    are what it would have got had the gateway not asked. Works on whole events (LF framing,
    as OpenAI sends); an event still incomplete is held until its end arrives, up to
    `MAX_HELD` bytes: past that (an event longer than any real chunk) the stripper stops for
    the rest of the stream and passes bytes through unchanged, so memory and work per stream
    stay bounded."""

    __slots__ = ("_pending", "active")

    MAX_HELD = 64 * 1024
    _NULL = b',"usage":null'
    _BOUNDARY = b"\n\n"
    _EMPTY_CHOICES = b'"choices":[]'
    _USAGE_OBJECT = b'"usage":{'

    def __init__(self) -> None:
        self._pending = b""
        self.active = True

    def feed(self, chunk: bytes) -> bytes:
        if not self.active:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        if not self._pending and b"\r" in chunk:
            # Not the framing this was built for: pass everything through untouched.
            self.active = False
            return data
        end = data.rfind(self._BOUNDARY)
        if end < 0:
            return self._hold(data)
        complete, rest = data[: end + 2], data[end + 2 :]
        return self._strip(complete) + self._hold(rest)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _hold(self, rest: bytes) -> bytes:
        """Keep an incomplete event for later, or give up on stripping when it is too long."""
        if len(rest) > self.MAX_HELD:
            self.active = False
            self._pending = b""
            return rest
        self._pending = rest
        return b""

    def _strip(self, events: bytes) -> bytes:
        """Whole events without the usage-only chunk and the `"usage":null` members: the
        usage chunk is found where it is (its `"choices":[]`), not by splitting every event."""
        pos = events.find(self._EMPTY_CHOICES)
        while pos >= 0:
            start = events.rfind(self._BOUNDARY, 0, pos)
            start = 0 if start < 0 else start + 2
            end = events.find(self._BOUNDARY, pos)
            end = len(events) if end < 0 else end + 2
            if self._USAGE_OBJECT in events[start:end]:
                events = events[:start] + events[end:]
                pos = events.find(self._EMPTY_CHOICES, start)
            else:
                pos = events.find(self._EMPTY_CHOICES, end)
        return events.replace(self._NULL, b"") if self._NULL in events else events


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a non-stream OpenAI response body (chat, completions, responses, embeddings)."""
    obj = _loads(body)
    return _usage(obj.get("usage")) if obj else None


ENDPOINTS = (
    Endpoint(
        family=ApiFamily.OPENAI,
        path="/v1/chat/completions",
        upstream_path="/chat/completions",
        operation="chat",
        streams=True,
        cap_fields=("max_completion_tokens", "max_tokens"),
        fill_cap=True,
        choice_fields=("n",),
        observer=ChatObserver,
    ),
    Endpoint(
        family=ApiFamily.OPENAI,
        path="/v1/completions",
        upstream_path="/completions",
        operation="text_completion",
        streams=True,
        cap_fields=("max_tokens",),
        # The API's own default is 16 tokens: filling in a larger cap would change the answer.
        fill_cap=False,
        choice_fields=("n", "best_of"),
        observer=lambda: ChatObserver(text_completion=True),
    ),
    Endpoint(
        family=ApiFamily.OPENAI,
        path="/v1/responses",
        upstream_path="/responses",
        operation="chat",
        streams=True,
        cap_fields=("max_output_tokens",),
        fill_cap=True,
        observer=ResponsesObserver,
        is_responses=True,
    ),
    Endpoint(
        family=ApiFamily.OPENAI,
        path="/v1/embeddings",
        upstream_path="/embeddings",
        operation="embeddings",
        streams=False,
    ),
)


# Kind -> (error type, error code) as the OpenAI API and its SDK name them.
_ERRORS: dict[Kind, tuple[str, str | None]] = {
    Kind.INVALID_REQUEST: ("invalid_request_error", None),
    Kind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    Kind.PERMISSION: ("invalid_request_error", "model_not_allowed"),
    Kind.NOT_FOUND: ("invalid_request_error", "model_not_found"),
    Kind.ROUTE_NOT_FOUND: ("invalid_request_error", "unknown_url"),
    Kind.METHOD_NOT_ALLOWED: ("invalid_request_error", "method_not_allowed"),
    Kind.TOO_LARGE: ("invalid_request_error", "request_too_large"),
    Kind.REQUEST_TIMEOUT: ("invalid_request_error", "request_timeout"),
    Kind.RATE_LIMITED: ("rate_limit_exceeded", "rate_limit_exceeded"),
    Kind.BUDGET_EXCEEDED: ("budget_exceeded", "budget_exceeded"),
    Kind.UPSTREAM_UNAVAILABLE: ("server_error", "upstream_unavailable"),
    Kind.UPSTREAM_TIMEOUT: ("server_error", "upstream_timeout"),
    Kind.UPSTREAM_ERROR: ("server_error", "upstream_error"),
    Kind.UPSTREAM_CREDENTIALS: ("server_error", "upstream_credentials"),
    Kind.OVERLOADED: ("server_error", "overloaded"),
    Kind.LIMITER_UNAVAILABLE: ("server_error", "rate_limiter_unavailable"),
    Kind.CANCELLED_BY_OPERATOR: ("server_error", "cancelled_by_operator"),
    Kind.STREAM_NOT_FOUND: ("invalid_request_error", "stream_not_found"),
    Kind.GONE: ("invalid_request_error", "stream_not_resumable"),
    Kind.RANGE: ("invalid_request_error", "offset_out_of_range"),
    Kind.INTERNAL: ("server_error", None),
}
# Streams whose usage chunk the gateway may ask for (Responses always carries usage).
_INJECT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def error_type(kind: Kind) -> str:
    return _ERRORS[kind][0]


def error_code(kind: Kind) -> str | None:
    return _ERRORS[kind][1]


class OpenAIApi:
    """The OpenAI wire API behind the `WireApi` seam."""

    family = ApiFamily.OPENAI
    endpoints: tuple[Endpoint, ...] = ENDPOINTS
    request_id_header = "x-request-id"

    def build_request(
        self,
        parsed: ParsedRequest,
        provider: ProviderSpec,
        model: str,
        cap: int | None,
        secret: str,
    ) -> UpstreamRequest:
        body = rewritten_body(parsed, provider, model, cap)
        if parsed.inject_usage:
            options = body.get("stream_options")
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        headers = base_headers(parsed, provider)
        headers["authorization"] = f"Bearer {secret}"
        return upstream_request(parsed, provider, body, headers)

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body(body)

    def error_body(
        self, kind: Kind, message: str, *, param: str | None, request_id: str | None
    ) -> bytes:
        kind_type, code = _ERRORS[kind]
        return orjson.dumps(
            {"error": {"message": message, "type": kind_type, "param": param, "code": code}}
        )

    def terminal_event(self, endpoint: Endpoint, kind: Kind, message: str, sequence: int) -> bytes:
        if endpoint.is_responses:
            payload = orjson.dumps(
                {
                    "type": "error",
                    "code": error_code(kind),
                    "message": message,
                    "param": None,
                    "sequence_number": sequence,
                }
            )
            return b"event: error\ndata: " + payload + b"\n\n"
        return b"data: " + self.error_body(kind, message, param=None, request_id=None) + b"\n\n"

    def injects_usage(self, parsed: ParsedRequest) -> bool:
        """A Chat/Completions stream whose caller did not ask for the usage chunk: the gateway
        asks upstream and strips it again before the client sees it."""
        if not parsed.stream:
            return False
        if parsed.endpoint.path not in _INJECT_PATHS:
            return False
        options = parsed.body.get("stream_options")
        return not (isinstance(options, dict) and options.get("include_usage") is True)

    def usage_stripper(self) -> UsageStripper:
        return UsageStripper()

    def model_list(self, names: Sequence[str]) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_object(n) for n in names]}

    def model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llm-gateway"}


API = OpenAIApi()
