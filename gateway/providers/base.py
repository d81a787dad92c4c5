"""What every wire API module provides: its endpoints, upstream request building, and a stream
observer that reads first token / usage / finish / in-band errors off decoded SSE events.

Observers only look; they never alter what the client receives. They are fed every event of
a stream, so each `on_event` does the least it can: event-name checks and substring probes
first, JSON parsing only for the few events that carry what is looked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import ApiFamily
from gateway.sse import SSEEvent


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None


@dataclass(slots=True)
class StreamFacts:
    """What an observer learned from one stream (read at the end, or live by telemetry)."""

    events: int = 0
    first_token_at: float | None = None
    first_token_event: int | None = None  # 0-based index of the first event with content
    last_event_at: float | None = None
    response_id: str | None = None
    response_model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error_type: str | None = None  # in-band error reported by the upstream (bounded label)
    error_message: str | None = None
    done: bool = False  # the API's own end marker was seen ([DONE], message_stop, terminal event)


class StreamObserver(Protocol):
    facts: StreamFacts

    def on_event(self, event: SSEEvent, now: float) -> None:
        """Called for every decoded event, in order. Must not raise on odd payloads."""

    def on_end(self) -> None:
        """Called once when the upstream body ended (cleanly or not)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route of a wire API, e.g. OpenAI `POST /v1/chat/completions`."""

    family: ApiFamily
    path: str  # the gateway's path
    upstream_path: str  # appended to the provider's base_url
    operation: str  # GenAI operation name (chat, text_completion, embeddings, ...)
    streams: bool  # may answer with an SSE stream when the body asks for it
    cap_fields: tuple[str, ...] = ()  # output-cap fields, clamped when present
    fill_cap: bool = False  # fill in the cap when the caller gave none
    # Fields asking for several generations (OpenAI `n`, Completions `best_of`).
    choice_fields: tuple[str, ...] = ()
    observer: Callable[[], StreamObserver] | None = None
    is_responses: bool = False  # OpenAI Responses API (its own error event shape)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True)
class ParsedRequest:
    """The caller's request, parsed once at the edge. Every attempt is built from it afresh."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    # Ask upstream for the usage chunk the caller did not request (stripped again on the way).
    inject_usage: bool = False


def as_int(value: object) -> int | None:
    """An int from a JSON value, None for anything else (bools are not ints here)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def short(value: object, limit: int = 200) -> str | None:
    """A bounded string for logs and facts (upstream error text can be arbitrarily long)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
