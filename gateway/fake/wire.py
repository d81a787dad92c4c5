"""The wire vocabulary shared by every builder: the two wire formats and their APIs, framed
SSE events and the plan of a stream (sans-I/O: every event is framed bytes, built once)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson

Wire = Literal["openai", "anthropic"]
Api = Literal["chat", "completions", "responses", "embeddings", "models", "messages", "count"]

EOLS: Final[Mapping[str, bytes]] = MappingProxyType({"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"})
"""The SSE line terminator of each `FakeScript.line_ending`."""
DONE: Final = b"[DONE]"

ErrorEvents = Callable[[int], list[bytes]]
"""Builds a stream's in-band error events, given how many events were written before them."""


def frame(data: bytes, eol: bytes, event: bytes | None = None) -> bytes:
    """One SSE event: an ``event:`` line when ``event`` is given, one ``data:`` line."""
    if event is None:
        return b"data: " + data + eol + eol
    return b"event: " + event + eol + b"data: " + data + eol + eol


def rand_id(nbytes: int = 12) -> str:
    """A random hex id (``2 * nbytes`` characters), for ids that real providers randomise."""
    return secrets.token_hex(nbytes)


@dataclass(frozen=True, slots=True)
class Event:
    payload: bytes
    content: bool
    # The API's end marker ([DONE], message_stop, the final response.*), left out by omit_done.
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class StreamPlan:
    events: Sequence[Event]
    error: ErrorEvents


def typed_event(
    payload: Mapping[str, Any], eol: bytes, content: bool = False, terminal: bool = False
) -> Event:
    """The event ``event: <type>`` carrying ``payload`` (which has a string ``type``) as JSON."""
    kind = str(payload["type"]).encode()
    return Event(frame(orjson.dumps(payload), eol, kind), content, terminal)
