"""The wire-API seam: what every wire API module provides (`WireApi`), and the values that
cross it.

A wire API knows its endpoints, how to build an upstream request (credentials, output caps,
usage injection), how to read usage off a body, its stream observers (first token, usage,
finish, in-band errors off decoded SSE events), its error format (HTTP bodies and the
terminal SSE event), its usage stripping and its model list. A new wire API is one module
implementing `WireApi` and one entry in `gateway.providers.WIRE_APIS`.

Observers only look; they never alter what the client receives. They are fed every event of
a stream, so each `on_event` does the least it can: event-name checks and substring probes
first, JSON parsing only for the few events that carry what is looked for.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.sse import SSEEvent

if TYPE_CHECKING:
    from gateway.config.runtime import ProviderSpec
    from gateway.errors import Kind


class ApiFamily(enum.Enum):
    """The wire API a caller speaks: it decides the error format and the stream framing (the
    key of `gateway.providers.WIRE_APIS`)."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


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

    def quiet(self, window: bytes) -> bool:
        """Once the first token was seen: True when no event in `window` (raw stream bytes)
        can change what the observer reports, so that the relay may `skip` the events it
        completes instead of showing them one by one. False is always safe."""

    def skip(self, events: list[SSEEvent]) -> None:
        """Account for events the relay did not show one by one (`quiet` said so)."""

    def next_sequence_number(self) -> int:
        """The number an event the gateway appends now must carry, for APIs that number their
        events (the Responses API); 0 for the others."""

    def content_size(self, event: SSEEvent) -> int:
        """Characters of generated output `event` carries (text, reasoning, refusals, tool
        names and arguments); 0 when it carries none. It may parse the event: only streams
        metered against a budget ask."""


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
    billed: bool = True  # the provider charges for it (count_tokens is free: no budget applies)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The caller's request, parsed once at the edge. Every attempt is built from it afresh
    (its body dict is never modified; once a stream is committed, when no attempt can follow,
    it is emptied to free the prompt)."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    # Ask upstream for the usage chunk the caller did not request (stripped again on the way).
    inject_usage: bool = False


class Stripper(Protocol):
    """Removes from a stream what the gateway asked the upstream for on the caller's behalf."""

    active: bool

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class WireApi(Protocol):
    """Everything one wire API knows (one module per API, registered in WIRE_APIS)."""

    family: ApiFamily
    endpoints: tuple[Endpoint, ...]
    request_id_header: str  # the answer header its SDK reads the request id from

    def build_request(
        self,
        parsed: ParsedRequest,
        provider: ProviderSpec,
        model: str,
        cap: int | None,
        secret: str,
    ) -> UpstreamRequest:
        """One attempt's upstream request, built from the untouched parsed original."""

    def usage_from_body(self, body: bytes) -> Usage | None:
        """Usage of a non-stream answer body."""

    def error_body(
        self, kind: Kind, message: str, *, param: str | None, request_id: str | None
    ) -> bytes:
        """The JSON error body its SDK parses (and raises the matching exception for)."""

    def terminal_event(self, endpoint: Endpoint, kind: Kind, message: str, sequence: int) -> bytes:
        """The one final SSE error event the gateway writes into a committed stream."""

    def injects_usage(self, parsed: ParsedRequest) -> bool:
        """Whether the gateway asks upstream for usage the caller did not ask for (asked only
        for a caller whose tokens are counted: a tokens-per-minute limit or a budget)."""

    def usage_stripper(self) -> Stripper:
        """What removes that injected usage again (only called when `injects_usage`)."""

    def model_list(self, names: Sequence[str]) -> dict[str, Any]:
        """`GET /v1/models` in this API's format."""

    def model_object(self, name: str) -> dict[str, Any]:
        """`GET /v1/models/{id}` in this API's format."""


def as_int(value: object) -> int | None:
    """An int from a JSON value, None for anything else (bools are not ints here)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def text_size(value: object) -> int:
    """The length of a JSON string value, 0 for anything else."""
    return len(value) if isinstance(value, str) else 0


def short(value: object, limit: int = 200) -> str | None:
    """A bounded string for logs and facts (upstream error text can be arbitrarily long)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
