"""What the fake saw: one `RequestRecord` per request, and how its answer ended (`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.fake.script import FakeScript

Outcome = Literal[
    "pending",
    "complete",
    "error_status",
    "error_event",
    "truncated",
    "reset",
    "stall_timeout",
    "disconnected",
]


@dataclass(slots=True)
class RequestRecord:
    """One request as the fake saw and answered it; appended when the request arrives.

    ``completed`` means the handler carried out its whole script (a scripted error status,
    error event, truncation or reset counts as carried out) without the client going away;
    ``outcome`` says which ending it was. ``disconnected`` means the client went away (the
    handler was cancelled, or a write failed) before that. ``sent`` holds every body byte
    handed to the transport, without HTTP chunk framing (compressed, under
    ``content_encoding``); ``writes`` counts the writes (each at most 64 KiB).
    ``status`` is the HTTP status sent (0 until the headers went out). ``attempt`` is the
    0-based index of this request among those with the same ``x-fake-session``. ``api_key``
    is the key the request authenticated with (also when it was rejected). ``model`` is the
    echoed model name (without the ``@`` suffix). Times are ``loop.time()`` values.
    """

    path: str
    method: str
    headers: dict[str, str]
    started_at: float
    body: bytes = b""
    json: Any = None
    script: FakeScript = field(default_factory=FakeScript)
    session: str | None = None
    attempt: int = 0
    api_key: str | None = None
    model: str | None = None
    stream: bool = False
    request_id: str = ""
    status: int = 0
    sent: bytearray = field(default_factory=bytearray)
    writes: int = 0
    first_byte_at: float | None = None
    ended_at: float | None = None
    completed: bool = False
    disconnected: bool = False
    disconnected_at: float | None = None
    outcome: Outcome = "pending"


def key_echo(record: RequestRecord) -> str:
    """What `FakeScript.echo_key` appends for this request: ``" (api key: <key>)"``, or
    nothing when it is off or the request carried no key."""
    key = record.api_key
    return f" (api key: {key})" if record.script.echo_key and key else ""
