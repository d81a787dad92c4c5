"""A scriptable fake OpenAI + Anthropic upstream, served on a real socket.

The fake speaks the wire formats of OpenAI Chat Completions, legacy Completions, Responses,
Embeddings and Models, and of Anthropic Messages and count_tokens, byte for byte as the
providers stream them. Every request can be scripted (timing, errors, truncation, stalls,
tool calls, replays of recorded streams, and HTTP-level misbehaviour: raw odd statuses,
unasked-for compression, echoed keys, missing end markers, oversized events) through its
model name suffix, ``x-fake-*`` headers or a per-attempt plan; every request is recorded,
including each body byte written and whether the client went away. It is the upstream of the
tests, the benchmarks and the demo.

Scripting, lowest to highest precedence (see `FakeScript` for the parameters):

1. the request's model name suffix after ``@``: ``"fake-gpt@chunks=50,gap_ms=20"`` (the part
   before ``@`` is the model name echoed back);
2. ``x-fake-<name>`` request headers, ``_`` written as ``-`` (``x-fake-gap-ms: 20``);
3. a per-attempt plan: ``x-fake-plan`` is a JSON array of objects with the same keys, and the
   i-th request (0-based) carrying ``x-fake-session: S`` uses ``plan[min(i, len(plan) - 1)]``
   merged over 1 and 2. Without a session header every request uses ``plan[0]``.

A value of ``null`` (JSON) or ``none``/``null`` (text) resets a parameter to its default.
Unknown parameters and bad values are answered with 400 in the route's error format, naming
the parameter.

Determinism, so that tests can predict exact content:

- content tokens are `fake_tokens(n)`; tool-call arguments are `FAKE_TOOL_ARGUMENTS` split
  by `fake_tool_fragments(n)`;
- prompt tokens are `estimate_prompt_tokens(body)`; output tokens are the number of content
  chunks (text tokens or argument fragments) emitted;
- embeddings are `fake_embedding(text, dimensions)`.

Ids (``chatcmpl-…``, ``msg_…``, request ids) and ``created`` timestamps are random / current.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import http
import math
import random
import re
import secrets
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson
from aiohttp import web

__all__ = [
    "FAKE_MODELS",
    "FAKE_TOOL_ARGUMENTS",
    "FakeProvider",
    "FakeScript",
    "Outcome",
    "RequestRecord",
    "ScriptError",
    "estimate_prompt_tokens",
    "fake_embedding",
    "fake_tokens",
    "fake_tool_fragments",
    "parse_script",
    "run_fake_provider",
    "start_fake_provider",
]

# --------------------------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------------------------

# Non-ASCII words are included on purpose: split writes must be able to cut inside a
# multi-byte UTF-8 character, and decoders downstream must cope.
_FIRST_WORD: Final = "Hello"
_WORD_CYCLE: Final[tuple[str, ...]] = (
    " from",
    " the",
    " fake",
    " provider",
    ".",
    " The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ",",
    " café",
    " naïve",
    " 世界",
    " 🙂",
    ".",
)

FAKE_TOOL_ARGUMENTS: Final = '{"location":"Paris","unit":"celsius"}'
"""The arguments of every fake tool call (compact JSON), streamed as `fake_tool_fragments`."""

_DEFAULT_TOOL_NAME: Final = "get_weather"

FAKE_MODELS: Final[tuple[str, ...]] = ("fake-gpt", "fake-gpt-mini", "fake-claude", "fake-embedding")
"""The model ids listed by ``GET /v1/models`` (any model name is accepted by every route)."""

_MODELS_CREATED: Final = 1_700_000_000
_FINGERPRINT: Final = "fp_fake"
_DEFAULT_EMBEDDING_DIMENSIONS: Final = 8
_MAX_EMBEDDING_DIMENSIONS: Final = 8192
_STALL_CAP_S: Final = 600.0
_SPLIT_MAX: Final = 64
# The largest single write: bigger events and bodies go out in pieces of this size.
_PIECE_MAX: Final = 64 * 1024
_MAX_EVENT_BYTES: Final = 64 * 1024 * 1024
# The padding of ``event_bytes``: one byte in UTF-8 and never escaped inside a JSON string.
_PAD_CHAR: Final = "x"


def fake_tokens(n: int) -> list[str]:
    """Return the first ``n`` content tokens every fake stream emits.

    The first token is ``"Hello"``; the rest cycle through a fixed word list (with leading
    spaces, and some non-ASCII words). Pure and deterministic; ``n <= 0`` gives ``[]``.
    """
    if n <= 0:
        return []
    cycle = len(_WORD_CYCLE)
    return [_FIRST_WORD, *(_WORD_CYCLE[i % cycle] for i in range(n - 1))]


def fake_tool_fragments(n: int) -> list[str]:
    """Split `FAKE_TOOL_ARGUMENTS` into ``min(n, len)`` nearly equal, non-empty fragments.

    Earlier fragments are at most one character longer than later ones. Their concatenation
    is `FAKE_TOOL_ARGUMENTS`; ``n <= 0`` gives ``[]``.
    """
    text = FAKE_TOOL_ARGUMENTS
    n = min(n, len(text))
    if n <= 0:
        return []
    size, extra = divmod(len(text), n)
    out: list[str] = []
    pos = 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(text[pos : pos + step])
        pos += step
    return out


_PROMPT_FIELDS: Final = ("system", "instructions", "messages", "prompt", "input")
_UNCOUNTED_KEYS: Final = frozenset({"role", "type"})


def _count_chars(value: object) -> int:
    # Iterative so that a deeply nested request cannot hit the recursion limit.
    total = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(v for k, v in item.items() if k not in _UNCOUNTED_KEYS)
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _tokens_for_chars(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimate a request's prompt tokens: ``max(1, ceil(chars / 4))``.

    ``chars`` counts the characters of every string under the request fields ``system``,
    ``instructions``, ``messages``, ``prompt`` and ``input`` (at any depth), except the values
    of ``role`` and ``type`` keys. Integers (token arrays) are not counted.
    """
    return _tokens_for_chars(sum(_count_chars(body.get(name)) for name in _PROMPT_FIELDS))


def fake_embedding(text: str, dimensions: int = _DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """Return the deterministic unit-length embedding of ``text``.

    Values are derived from SHA-256 of the text and rounded to float32, so the ``"float"``
    and ``"base64"`` encodings decode to exactly these numbers. A token-array input ``[1, 2]``
    is embedded as the text ``"tokens:1,2"``.
    """
    raw: list[float] = []
    block = 0
    seed = text.encode()
    while len(raw) < dimensions:
        digest = hashlib.sha256(block.to_bytes(4, "little") + seed).digest()
        raw.extend(v / 2**31 - 1.0 for v in struct.unpack("<8I", digest))
        block += 1
    del raw[dimensions:]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    scaled = [v / norm for v in raw]
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *scaled)))


# --------------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------------

TruncateMode = Literal["clean", "reset"]
LineEnding = Literal["lf", "crlf", "cr"]
ContentEncoding = Literal["gzip", "deflate"]


@dataclass(frozen=True, slots=True)
class FakeScript:
    """How the fake answers one request. Every field is optional.

    Counting: ``stall_after``, ``error_after`` and ``truncate_after`` count content chunks
    (text tokens or tool-argument fragments) for generated streams and events for replays. The
    action happens before the next event once N have been written, so ``0`` acts before the
    first event (right after the headers); an N the stream never reaches has no effect. When
    several apply at the same point, the first of stall, error, truncate wins.

    Non-stream answers honour ``headers_delay_ms``, ``first_delay_ms``, the error-status
    fields, ``raw_status``, ``content_encoding``, ``echo_key`` and ``split_seed``; any
    ``stall_after`` hangs before the headers, any ``truncate_after`` sends half the body and
    then resets the connection (a Content-Length body cannot end cleanly early), and
    ``error_after``, ``omit_done`` and ``event_bytes`` are ignored. A replay is streamed
    whatever the route and the request's ``stream`` flag; ``chunks``, ``tool``, max tokens and
    ``event_bytes`` do not apply to it, and its in-band error follows the route's API.
    """

    chunks: int = 8
    """Content chunks to generate (capped by the request's max tokens)."""
    headers_delay_ms: float = 0.0
    """Sleep before sending the response headers (also before scripted error statuses)."""
    first_delay_ms: float = 0.0
    """After the headers are sent, sleep before the first body byte."""
    gap_ms: float = 0.0
    """Sleep between consecutive events (not before the first)."""
    stall_after: int | None = None
    """Stop writing after N and hang until the client disconnects (capped at 600 s)."""
    status: int | None = None
    """Answer at once with this HTTP status and an error body in the route's format."""
    error_type: str | None = None
    """Error type for ``status`` and ``error_after`` (default depends on status and API)."""
    error_code: str | None = None
    """OpenAI error ``code`` for ``status`` and ``error_after`` (a Responses ``error`` event's
    code defaults to ``error_type``, then ``server_error``); Anthropic errors have no code."""
    error_message: str | None = None
    """Error message for ``status`` and ``error_after``."""
    retry_after: str | None = None
    """``retry-after`` header value of a scripted error status, verbatim."""
    retry_after_ms: str | None = None
    """``retry-after-ms`` header value of a scripted error status, verbatim."""
    error_after: int | None = None
    """After N, send one in-band error event in the API's format and end the stream."""
    truncate_after: int | None = None
    """After N, end the body without the terminator (see ``truncate_mode``)."""
    truncate_mode: TruncateMode = "clean"
    """``clean``: finish the chunked body normally; ``reset``: abort the TCP connection."""
    reset_before_headers: bool = False
    """Abort the TCP connection before sending anything (after ``headers_delay_ms``)."""
    tool: bool = False
    """Stream a tool call instead of text."""
    replay: str | None = None
    """Serve ``<recordings_dir>/<replay>.chunks.jsonl`` framed as the provider sent it."""
    replay_part: int = 0
    """For files holding several Responses streams: serve the part starting at the
    (replay_part + 1)-th ``response.created``."""
    split_seed: int | None = None
    """Write each event in random 1..64-byte pieces from a PRNG seeded with this value."""
    line_ending: LineEnding = "lf"
    """SSE line terminator: ``lf``, ``crlf`` or ``cr``."""
    raw_status: int | None = None
    """Answer with this status (100..999) written as raw HTTP/1.1 on the transport, bypassing
    aiohttp's response object (which refuses odd statuses); wins over ``status``. ``101``
    sends ``101 Switching Protocols`` with ``Connection: Upgrade`` and ``Upgrade: websocket``,
    any other 1xx that informational response alone; both then hold the connection open, no
    final response ever coming, until the client goes away (capped at 600 s, then closed:
    outcome ``stall_timeout``). Any other value (200..599 too) sends a status line,
    ``content-type: application/json``, ``content-length``, the request-id and scripted
    retry-after headers, ``connection: close`` and an error body in the route's format (the
    ``error_*`` fields and ``echo_key`` apply; ``content_encoding`` and ``split_seed`` do
    not), then closes the connection: outcome ``error_status``. ``RequestRecord.status`` is
    this status; ``sent`` holds the error body only, never the raw head."""
    content_encoding: ContentEncoding | None = None
    """``gzip`` or ``deflate`` (zlib format): compress the answer and send it with
    ``Content-Encoding``, whatever the request's ``accept-encoding`` asked for: JSON bodies,
    error-status bodies (every answer once the script is parsed; the 401 for a missing or
    rejected key and the 400 for a bad script are plain) and streams. A stream is compressed
    incrementally, one compressor per response flushed with ``Z_SYNC_FLUSH`` after each event,
    so events still arrive one by one; every ending but a reset finishes the encoding (its
    trailer), a clean truncation too. A truncated non-stream answer is half of the compressed
    body. ``RequestRecord.sent`` holds the compressed bytes, as they went on the wire."""
    echo_key: bool = False
    """Echo the upstream key the fake received (``RequestRecord.api_key``) verbatim, as
    ``" (api key: <key>)"`` appended to: the message of a scripted error-status body
    (``status`` or a final ``raw_status``), the message of the in-band error events of
    ``error_after`` (both Responses events), and the generated text of a 200 non-stream text
    answer (chat ``content``, completion ``text``, Responses ``output_text``, the Messages
    text block). Streamed content, tool-call answers and the 401 for a rejected key never
    carry it. Simulates providers that echo keys, for secret-scrubbing tests."""
    omit_done: bool = False
    """End a stream cleanly without the API's end marker: no ``data: [DONE]`` (chat, legacy
    completions, chat replays), no ``message_stop`` (Messages), no terminal
    ``response.completed`` or ``response.incomplete`` (Responses). The content, finish and
    usage chunks are all sent and the chunked body ends normally (outcome ``complete``)."""
    event_bytes: int = 0
    """Pad the text of a generated stream's first content chunk with ``x`` so that its SSE
    event (one ``data:`` line, framing included) is N bytes long (0..67108864; 0 or an N below
    the unpadded size: no padding). Like every write, the event goes out in pieces of at most
    64 KiB, so the reader sees many reads of one event. In tool mode the first argument
    fragment is padded (the arguments no longer parse); Responses' ``output_text.done``,
    ``content_part.done``, ``output_item.done`` and final events repeat the padded text.
    Non-stream answers and replays are not padded."""

    def to_headers(self) -> dict[str, str]:
        """Return the ``x-fake-*`` headers that script this (only fields off their default)."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            name = "x-fake-" + f.name.replace("_", "-")
            out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out


class ScriptError(ValueError):
    """A script parameter is unknown or has a bad value; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"fake provider: script parameter '{param}': {message}")
        self.param = param


_Converter = Callable[[str, object], object]


def _int_converter(lo: int | None, hi: int | None) -> _Converter:
    def convert(name: str, raw: object) -> object:
        value: int | None = None
        if isinstance(raw, bool):
            value = None
        elif isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
            if lo is not None and hi is None:
                bounds = f" >= {lo}"
            raise ScriptError(name, f"expected an integer{bounds}, got {raw!r}")
        return value

    return convert


def _ms_converter(name: str, raw: object) -> object:
    value: float | None = None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or not 0 <= value <= _STALL_CAP_S * 1000:
        raise ScriptError(name, f"expected milliseconds in [0, 600000], got {raw!r}")
    return value


def _bool_converter(name: str, raw: object) -> object:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ScriptError(name, f"expected true or false, got {raw!r}")


def _str_converter(name: str, raw: object) -> object:
    if isinstance(raw, str):
        return raw
    # A JSON plan may write retry_after as a number; the header value is its text.
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(raw)
    raise ScriptError(name, f"expected a string, got {raw!r}")


def _choice_converter(*choices: str) -> _Converter:
    def convert(name: str, raw: object) -> object:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise ScriptError(name, f"expected one of {', '.join(choices)}, got {raw!r}")

    return convert


_CONVERTERS: Final[Mapping[str, _Converter]] = MappingProxyType(
    {
        "chunks": _int_converter(0, 1_000_000),
        "headers_delay_ms": _ms_converter,
        "first_delay_ms": _ms_converter,
        "gap_ms": _ms_converter,
        "stall_after": _int_converter(0, None),
        "status": _int_converter(200, 599),
        "error_type": _str_converter,
        "error_code": _str_converter,
        "error_message": _str_converter,
        "retry_after": _str_converter,
        "retry_after_ms": _str_converter,
        "error_after": _int_converter(0, None),
        "truncate_after": _int_converter(0, None),
        "truncate_mode": _choice_converter("clean", "reset"),
        "reset_before_headers": _bool_converter,
        "tool": _bool_converter,
        "replay": _str_converter,
        "replay_part": _int_converter(0, None),
        "split_seed": _int_converter(None, None),
        "line_ending": _choice_converter("lf", "crlf", "cr"),
        "raw_status": _int_converter(100, 999),
        "content_encoding": _choice_converter("gzip", "deflate"),
        "echo_key": _bool_converter,
        "omit_done": _bool_converter,
        "event_bytes": _int_converter(0, _MAX_EVENT_BYTES),
    }
)
_DEFAULTS: Final[Mapping[str, object]] = MappingProxyType(
    {f.name: f.default for f in dataclasses.fields(FakeScript)}
)
_NULLS: Final = frozenset({"none", "null"})


def parse_script(params: Mapping[str, object], base: FakeScript | None = None) -> FakeScript:
    """Apply raw script parameters over ``base`` (default: all defaults) and validate them.

    Keys may use ``-`` or ``_``. Values may be JSON values or their text form; ``None``,
    ``"none"`` and ``"null"`` reset a parameter to its default. Raises `ScriptError` naming
    the first unknown parameter or bad value.
    """
    # Values are validated by their converter; Any only bridges to replace()'s typed kwargs.
    changes: dict[str, Any] = {}
    for key, raw in params.items():
        name = key.strip().lower().replace("-", "_")
        converter = _CONVERTERS.get(name)
        if converter is None:
            raise ScriptError(name, "unknown parameter")
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NULLS):
            changes[name] = _DEFAULTS[name]
        else:
            changes[name] = converter(name, raw)
    return dataclasses.replace(base if base is not None else FakeScript(), **changes)


def _split_model(model: str) -> tuple[str, dict[str, object]]:
    """Split ``"name@k=v,k2=v2"`` into the echoed name and its raw script parameters."""
    name, sep, suffix = model.partition("@")
    params: dict[str, object] = {}
    if not sep:
        return model, params
    for item in suffix.split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ScriptError(item.strip(), "expected k=v in the model name suffix")
        params[key.strip()] = value.strip()
    return name, params


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Errors, per wire format
# --------------------------------------------------------------------------------------------

Wire = Literal["openai", "anthropic"]
Api = Literal["chat", "completions", "responses", "embeddings", "models", "messages", "count"]

# (type, code, message) for OpenAI routes.
_OPENAI_ERRORS: Final[Mapping[int, tuple[str, str | None, str]]] = MappingProxyType(
    {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        402: ("invalid_request_error", "billing_not_active", "Your account is not active."),
        403: (
            "invalid_request_error",
            "unsupported_country_region_territory",
            "Country, region, or territory not supported",
        ),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        408: ("timeout", None, "Request timed out."),
        409: ("invalid_request_error", None, "Conflict."),
        413: ("invalid_request_error", "request_too_large", "Request too large."),
        422: ("invalid_request_error", None, "Unprocessable request."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        500: (
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        ),
        502: ("server_error", None, "Bad gateway."),
        503: ("server_error", None, "The server is overloaded or not ready yet."),
        504: ("server_error", None, "Gateway timeout."),
        529: ("server_error", None, "The server is overloaded or not ready yet."),
    }
)
# (type, message) for Anthropic routes.
_ANTHROPIC_ERRORS: Final[Mapping[int, tuple[str, str]]] = MappingProxyType(
    {
        400: ("invalid_request_error", "Invalid request."),
        401: ("authentication_error", "invalid x-api-key"),
        402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
        403: ("permission_error", "Your API key does not have permission to use this resource."),
        404: ("not_found_error", "The requested resource could not be found."),
        408: ("timeout_error", "Request timed out."),
        413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
        500: ("api_error", "Internal server error"),
        504: ("timeout_error", "Request timed out"),
        529: ("overloaded_error", "Overloaded"),
    }
)
_INBAND_OPENAI_MESSAGE: Final = _OPENAI_ERRORS[500][2]


class _Reject(Exception):
    """Answer the request with an error status (raised before anything was sent)."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        echo: str = "",
    ) -> None:
        super().__init__(message or f"HTTP {status}")
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        # Appended to the message, default or scripted (see FakeScript.echo_key).
        self.echo = echo

    @classmethod
    def from_script(cls, script: FakeScript, status: int, echo: str = "") -> _Reject:
        headers: dict[str, str] = {}
        if script.retry_after is not None:
            headers["retry-after"] = script.retry_after
        if script.retry_after_ms is not None:
            headers["retry-after-ms"] = script.retry_after_ms
        return cls(
            status,
            script.error_message,
            error_type=script.error_type,
            code=script.error_code,
            headers=headers,
            echo=echo,
        )

    def body(self, wire: Wire, request_id: str) -> bytes:
        if wire == "anthropic":
            fallback = "api_error" if self.status >= 500 else "invalid_request_error"
            a_type, a_msg = _ANTHROPIC_ERRORS.get(self.status, (fallback, "Error."))
            return orjson.dumps(
                {
                    "type": "error",
                    "error": {
                        "type": self.error_type or a_type,
                        "message": (self.message or a_msg) + self.echo,
                    },
                    "request_id": request_id,
                }
            )
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        o_type, o_code, o_msg = _OPENAI_ERRORS.get(self.status, (fallback, None, "Error."))
        return orjson.dumps(
            {
                "error": {
                    "message": (self.message or o_msg) + self.echo,
                    "type": self.error_type or o_type,
                    "param": self.param,
                    "code": self.code if self.code is not None else o_code,
                }
            }
        )


# --------------------------------------------------------------------------------------------
# Event building (sans-I/O: every event is framed bytes, built once)
# --------------------------------------------------------------------------------------------

_EOLS: Final[Mapping[str, bytes]] = MappingProxyType({"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"})
_DONE: Final = b"[DONE]"
# Anthropic really sends ping with a space after the colon; keep it so relays meet it.
_ANTHROPIC_PING: Final = b'{"type": "ping"}'


def _frame(data: bytes, eol: bytes, event: bytes | None = None) -> bytes:
    if event is None:
        return b"data: " + data + eol + eol
    return b"event: " + event + eol + b"data: " + data + eol + eol


def _rand_id(nbytes: int = 12) -> str:
    return secrets.token_hex(nbytes)


@dataclass(frozen=True, slots=True)
class _Event:
    payload: bytes
    content: bool
    # The API's end marker ([DONE], message_stop, the final response.*), left out by omit_done.
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class _StreamPlan:
    events: Sequence[_Event]
    # Builds the in-band error events, given how many events were written before them.
    error: Callable[[int], list[bytes]]


@dataclass(frozen=True, slots=True)
class _Gen:
    """Everything the builders need, parsed once from the request."""

    body: Mapping[str, Any]
    model: str
    created: int
    prompt_tokens: int
    max_tokens: int | None
    include_usage: bool
    tool_name: str | None
    script: FakeScript
    eol: bytes
    # Appended to in-band error messages and non-stream answer texts (FakeScript.echo_key).
    echo: str = ""
    # Padding characters appended to the first piece (streams only, see FakeScript.event_bytes).
    pad: int = 0

    def pieces(self) -> tuple[list[str], bool]:
        """Content pieces to emit and whether max tokens cut them short."""
        pieces = (
            fake_tool_fragments(self.script.chunks)
            if self.tool_name is not None
            else fake_tokens(self.script.chunks)
        )
        cut = self.max_tokens is not None and self.max_tokens < len(pieces)
        if cut:
            pieces = pieces[: self.max_tokens]
        if self.pad and pieces:
            pieces[0] += _PAD_CHAR * self.pad
        return pieces, cut


def _openai_inband_error(script: FakeScript, echo: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": (script.error_message or _INBAND_OPENAI_MESSAGE) + echo,
                "type": script.error_type or "server_error",
                "param": None,
                "code": script.error_code,
            }
        }
    )


def _anthropic_inband_error(script: FakeScript, echo: str) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "error": {
                "type": script.error_type or "overloaded_error",
                "message": (script.error_message or "Overloaded") + echo,
            },
        }
    )


def _chat_error(script: FakeScript, eol: bytes, echo: str) -> Callable[[int], list[bytes]]:
    framed = _frame(_openai_inband_error(script, echo), eol)
    return lambda _written: [framed]


def _anthropic_error(script: FakeScript, eol: bytes, echo: str) -> Callable[[int], list[bytes]]:
    framed = _frame(_anthropic_inband_error(script, echo), eol, b"error")
    return lambda _written: [framed]


def _key_echo(key: str | None) -> str:
    """The text `FakeScript.echo_key` appends (nothing without a key)."""
    return f" (api key: {key})" if key else ""


def _chat_tool_call_id() -> str:
    return "call_" + _rand_id()


def _chat_stream(g: _Gen) -> _StreamPlan:
    head: dict[str, Any] = {
        "id": "chatcmpl-" + _rand_id(),
        "object": "chat.completion.chunk",
        "created": g.created,
        "model": g.model,
        "system_fingerprint": _FINGERPRINT,
    }

    def chunk(delta: Mapping[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if g.include_usage:
            obj["usage"] = None
        return _frame(orjson.dumps(obj), g.eol)

    pieces, cut = g.pieces()
    events: list[_Event] = []
    if g.tool_name is None:
        events.append(_Event(chunk({"role": "assistant", "content": ""}, None), False))
        events.extend(_Event(chunk({"content": p}, None), True) for p in pieces)
        finish = "length" if cut else "stop"
    else:
        first_call = {
            "index": 0,
            "id": _chat_tool_call_id(),
            "type": "function",
            "function": {"name": g.tool_name, "arguments": ""},
        }
        role = {"role": "assistant", "content": None, "tool_calls": [first_call], "refusal": None}
        events.append(_Event(chunk(role, None), False))
        events.extend(
            _Event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, None), True)
            for p in pieces
        )
        finish = "length" if cut else "tool_calls"
    events.append(_Event(chunk({}, finish), False))
    if g.include_usage:
        usage = _openai_usage(g.prompt_tokens, len(pieces))
        events.append(
            _Event(_frame(orjson.dumps({**head, "choices": [], "usage": usage}), g.eol), False)
        )
    events.append(_Event(_frame(_DONE, g.eol), False, terminal=True))
    return _StreamPlan(events, _chat_error(g.script, g.eol, g.echo))


def _openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completions_stream(g: _Gen) -> _StreamPlan:
    head: dict[str, Any] = {
        "id": "cmpl-" + _rand_id(),
        "object": "text_completion",
        "created": g.created,
        "model": g.model,
        "system_fingerprint": _FINGERPRINT,
    }

    def chunk(text: str, finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            **head,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }
        if g.include_usage:
            obj["usage"] = None
        return _frame(orjson.dumps(obj), g.eol)

    tokens, cut = dataclasses.replace(g, tool_name=None).pieces()
    events = [_Event(chunk(t, None), True) for t in tokens]
    events.append(_Event(chunk("", "length" if cut else "stop"), False))
    if g.include_usage:
        usage = _openai_usage(g.prompt_tokens, len(tokens))
        events.append(
            _Event(_frame(orjson.dumps({**head, "choices": [], "usage": usage}), g.eol), False)
        )
    events.append(_Event(_frame(_DONE, g.eol), False, terminal=True))
    return _StreamPlan(events, _chat_error(g.script, g.eol, g.echo))


@dataclass(frozen=True, slots=True)
class _ResponsesIds:
    response: str
    item: str
    call: str


def _responses_usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _response_object(
    g: _Gen,
    ids: _ResponsesIds,
    status: str,
    output: list[Any],
    usage: Mapping[str, Any] | None,
    *,
    error: Mapping[str, Any] | None = None,
    incomplete: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    instructions = g.body.get("instructions")
    tools = g.body.get("tools")
    return {
        "id": ids.response,
        "object": "response",
        "created_at": g.created,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
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


def _responses_final(
    g: _Gen, ids: _ResponsesIds, text_suffix: str = ""
) -> tuple[dict[str, Any], list[str], bool]:
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
    obj = _response_object(
        g,
        ids,
        "incomplete" if cut else "completed",
        [item],
        _responses_usage(g.prompt_tokens, len(pieces)),
        incomplete={"reason": "max_output_tokens"} if cut else None,
    )
    return obj, pieces, cut


def _responses_ids(tool: bool) -> _ResponsesIds:
    return _ResponsesIds(
        response="resp_" + _rand_id(24),
        item=("fc_" if tool else "msg_") + _rand_id(24),
        call="call_" + _rand_id(),
    )


def _responses_stream(g: _Gen) -> _StreamPlan:
    ids = _responses_ids(g.tool_name is not None)
    final, pieces, cut = _responses_final(g, ids)
    joined = "".join(pieces)
    events: list[_Event] = []

    def add(payload: dict[str, Any], content: bool = False, terminal: bool = False) -> None:
        payload["sequence_number"] = len(events)
        kind = payload["type"].encode()
        events.append(_Event(_frame(orjson.dumps(payload), g.eol, kind), content, terminal))

    start = _response_object(g, ids, "in_progress", [], None)
    add({"type": "response.created", "response": start})
    add({"type": "response.in_progress", "response": start})
    item_done = final["output"][0]
    common = {"item_id": ids.item, "output_index": 0}
    if g.tool_name is None:
        item_added = {**item_done, "status": "in_progress", "content": []}
        add({"type": "response.output_item.added", "output_index": 0, "item": item_added})
        empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        text_common = {**common, "content_index": 0}
        add({"type": "response.content_part.added", **text_common, "part": empty})
        for p in pieces:
            delta = {"type": "response.output_text.delta", **text_common, "delta": p}
            add({**delta, "logprobs": []}, True)
        add({"type": "response.output_text.done", **text_common, "logprobs": [], "text": joined})
        add(
            {
                "type": "response.content_part.done",
                **text_common,
                "part": item_done["content"][0],
            }
        )
    else:
        item_added = {**item_done, "status": "in_progress", "arguments": ""}
        add({"type": "response.output_item.added", "output_index": 0, "item": item_added})
        for p in pieces:
            add({"type": "response.function_call_arguments.delta", **common, "delta": p}, True)
        add({"type": "response.function_call_arguments.done", **common, "arguments": joined})
    add({"type": "response.output_item.done", "output_index": 0, "item": item_done})
    kind = "response.incomplete" if cut else "response.completed"
    add({"type": kind, "response": final}, terminal=True)

    def error(written: int) -> list[bytes]:
        code = g.script.error_code or g.script.error_type or "server_error"
        message = (g.script.error_message or _INBAND_OPENAI_MESSAGE) + g.echo
        err = {"type": "error", "code": code, "message": message, "param": None}
        failed = _response_object(
            g, ids, "failed", [], None, error={"code": code, "message": message}
        )
        return [
            _frame(orjson.dumps({**err, "sequence_number": written}), g.eol, b"error"),
            _frame(
                orjson.dumps(
                    {"type": "response.failed", "response": failed, "sequence_number": written + 1}
                ),
                g.eol,
                b"response.failed",
            ),
        ]

    return _StreamPlan(events, error)


def _anthropic_usage(prompt: int, output: int) -> dict[str, int]:
    """The usage of a ``message_delta`` event, keys in the API's order."""
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    }


def _anthropic_message_usage(prompt: int, output: int) -> dict[str, Any]:
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


def _anthropic_stop(g: _Gen, cut: bool) -> str:
    if cut:
        return "max_tokens"
    return "end_turn" if g.tool_name is None else "tool_use"


def _messages_stream(g: _Gen) -> _StreamPlan:
    pieces, cut = g.pieces()
    events: list[_Event] = []

    def add(payload: Mapping[str, Any], content: bool = False, terminal: bool = False) -> None:
        kind = str(payload["type"]).encode()
        events.append(_Event(_frame(orjson.dumps(payload), g.eol, kind), content, terminal))

    message: dict[str, Any] = {
        "id": "msg_" + _rand_id(),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_message_usage(g.prompt_tokens, 1),
    }
    add({"type": "message_start", "message": message})
    events.append(_Event(_frame(_ANTHROPIC_PING, g.eol, b"ping"), False))
    if g.tool_name is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        add({"type": "content_block_start", "index": 0, "content_block": block})
        for p in pieces:
            delta = {"type": "text_delta", "text": p}
            add({"type": "content_block_delta", "index": 0, "delta": delta}, True)
    else:
        block = {"type": "tool_use", "id": "toolu_" + _rand_id(), "name": g.tool_name, "input": {}}
        add({"type": "content_block_start", "index": 0, "content_block": block})
        # Anthropic opens every tool_use input with an empty fragment; it carries no content.
        empty = {"type": "input_json_delta", "partial_json": ""}
        add({"type": "content_block_delta", "index": 0, "delta": empty})
        for p in pieces:
            delta = {"type": "input_json_delta", "partial_json": p}
            add({"type": "content_block_delta", "index": 0, "delta": delta}, True)
    add({"type": "content_block_stop", "index": 0})
    add(
        {
            "type": "message_delta",
            "delta": {"stop_reason": _anthropic_stop(g, cut), "stop_sequence": None},
            # The real API repeats the input and cache counters here, not only the output.
            "usage": _anthropic_usage(g.prompt_tokens, len(pieces)),
        }
    )
    add({"type": "message_stop"}, terminal=True)
    return _StreamPlan(events, _anthropic_error(g.script, g.eol, g.echo))


def _chat_body(g: _Gen) -> bytes:
    pieces, cut = g.pieces()
    message: dict[str, Any]
    if g.tool_name is None:
        message = {
            "role": "assistant",
            "content": "".join(pieces) + g.echo,
            "refusal": None,
            "annotations": [],
        }
        finish = "length" if cut else "stop"
    else:
        call = {
            "id": _chat_tool_call_id(),
            "type": "function",
            "function": {"name": g.tool_name, "arguments": "".join(pieces)},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        finish = "length" if cut else "tool_calls"
    return orjson.dumps(
        {
            "id": "chatcmpl-" + _rand_id(),
            "object": "chat.completion",
            "created": g.created,
            "model": g.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": _openai_usage(g.prompt_tokens, len(pieces)),
            "system_fingerprint": _FINGERPRINT,
        }
    )


def _completions_body(g: _Gen) -> bytes:
    tokens, cut = dataclasses.replace(g, tool_name=None).pieces()
    choice = {
        "text": "".join(tokens) + g.echo,
        "index": 0,
        "logprobs": None,
        "finish_reason": "length" if cut else "stop",
    }
    return orjson.dumps(
        {
            "id": "cmpl-" + _rand_id(),
            "object": "text_completion",
            "created": g.created,
            "model": g.model,
            "choices": [choice],
            "usage": _openai_usage(g.prompt_tokens, len(tokens)),
            "system_fingerprint": _FINGERPRINT,
        }
    )


def _responses_body(g: _Gen) -> bytes:
    ids = _responses_ids(g.tool_name is not None)
    final, _pieces, _cut = _responses_final(g, ids, g.echo)
    return orjson.dumps(final)


def _messages_body(g: _Gen) -> bytes:
    pieces, cut = g.pieces()
    block: dict[str, Any]
    if g.tool_name is None:
        block = {"type": "text", "text": "".join(pieces) + g.echo}
    else:
        # A cut-short argument string is not JSON; Anthropic would not parse it either.
        tool_input = orjson.loads(FAKE_TOOL_ARGUMENTS) if not cut else {}
        block = {
            "type": "tool_use",
            "id": "toolu_" + _rand_id(),
            "name": g.tool_name,
            "input": tool_input,
        }
    return orjson.dumps(
        {
            "id": "msg_" + _rand_id(),
            "type": "message",
            "role": "assistant",
            "model": g.model,
            "content": [block],
            "stop_reason": _anthropic_stop(g, cut),
            "stop_sequence": None,
            "usage": _anthropic_message_usage(g.prompt_tokens, len(pieces)),
        }
    )


def _embeddings_body(body: Mapping[str, Any], model: str) -> bytes:
    dims_raw = body.get("dimensions", _DEFAULT_EMBEDDING_DIMENSIONS)
    if (
        not isinstance(dims_raw, int)
        or isinstance(dims_raw, bool)
        or not 1 <= dims_raw <= _MAX_EMBEDDING_DIMENSIONS
    ):
        raise _Reject(400, "'dimensions' must be an integer in [1, 8192].", param="dimensions")
    dims: int = dims_raw
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _Reject(
            400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    texts, prompt_tokens = _embedding_inputs(body.get("input"))
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = fake_embedding(text, dims)
        embedding: object = (
            base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
            if fmt == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def _is_token_array(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _embedding_inputs(value: object) -> tuple[list[str], int]:
    """Texts to embed and their prompt tokens; token arrays become ``"tokens:1,2"``."""
    items: list[object]
    if isinstance(value, str) or _is_token_array(value):
        items = [value]
    elif isinstance(value, list) and value:
        items = list(value)
    else:
        raise _Reject(400, "'input' must be a non-empty string or array.", param="input")
    texts: list[str] = []
    tokens = 0
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            tokens += _tokens_for_chars(len(item))
        elif isinstance(item, list) and _is_token_array(item):
            texts.append("tokens:" + ",".join(str(t) for t in item))
            tokens += len(item)
        else:
            raise _Reject(400, "'input' items must be strings or token arrays.", param="input")
    return texts, tokens


_STREAM_BUILDERS: Final[Mapping[str, Callable[[_Gen], _StreamPlan]]] = MappingProxyType(
    {
        "chat": _chat_stream,
        "completions": _completions_stream,
        "responses": _responses_stream,
        "messages": _messages_stream,
    }
)
_BODY_BUILDERS: Final[Mapping[str, Callable[[_Gen], bytes]]] = MappingProxyType(
    {
        "chat": _chat_body,
        "completions": _completions_body,
        "responses": _responses_body,
        "messages": _messages_body,
    }
)


# --------------------------------------------------------------------------------------------
# Request parsing helpers
# --------------------------------------------------------------------------------------------

_MAX_TOKENS_FIELDS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "chat": ("max_completion_tokens", "max_tokens"),
        "completions": ("max_tokens",),
        "responses": ("max_output_tokens",),
        "messages": ("max_tokens",),
    }
)


def _max_tokens(api: str, body: Mapping[str, Any]) -> int | None:
    for name in _MAX_TOKENS_FIELDS.get(api, ()):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _Reject(400, f"'{name}' must be a non-negative integer.", param=name)
        return value
    return None


def _first_tool_name(tools: list[Any]) -> str | None:
    first = tools[0] if tools else None
    if not isinstance(first, Mapping):
        return None
    name = first.get("name")
    if isinstance(name, str):
        return name
    function = first.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return str(function["name"])
    return None


def _tool_name(body: Mapping[str, Any], script: FakeScript) -> str | None:
    """The tool to call, or None for a text answer.

    Tool mode is on when the script says ``tool`` or when the request has tools and forces
    one (``tool_choice`` "required", a named function/tool, or Anthropic's ``any``).
    """
    tools = body.get("tools")
    tools = tools if isinstance(tools, list) else []
    choice = body.get("tool_choice")
    forced = False
    named: str | None = None
    if choice == "required" and tools:
        forced = True
    elif isinstance(choice, Mapping) and tools:
        kind = choice.get("type")
        if kind in ("function", "tool"):
            forced = True
            function = choice.get("function")
            raw = function.get("name") if isinstance(function, Mapping) else choice.get("name")
            named = raw if isinstance(raw, str) else None
        elif kind == "any":
            forced = True
    if not (forced or script.tool):
        return None
    return named or _first_tool_name(tools) or _DEFAULT_TOOL_NAME


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _script_from_headers(headers: Mapping[str, str]) -> dict[str, object]:
    params: dict[str, object] = {}
    for name, value in headers.items():
        if name.startswith("x-fake-") and name not in ("x-fake-plan", "x-fake-session"):
            params[name[len("x-fake-") :]] = value
    return params


def _plan_entry(raw: str, attempt: int) -> Mapping[str, object]:
    try:
        plan = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ScriptError("plan", "x-fake-plan is not valid JSON") from exc
    if not isinstance(plan, list) or not plan or not all(isinstance(p, dict) for p in plan):
        raise ScriptError("plan", "x-fake-plan must be a non-empty JSON array of objects")
    entry: dict[str, object] = plan[min(attempt, len(plan) - 1)]
    return entry


# --------------------------------------------------------------------------------------------
# Replays
# --------------------------------------------------------------------------------------------

_CHAT_RECORDING_DIRS: Final = ("openai-chat", "openai-completions")
# Recorded events that are the API's end marker (left out by omit_done).
_TERMINAL_KINDS: Final = frozenset({b"message_stop", b"response.completed", b"response.incomplete"})


def _frame_recording(raw: bytes, chat: bool, part: int, eol: bytes) -> list[_Event] | None:
    """Frame the lines of a recording file; None when ``part`` does not exist.

    Chat recordings become ``data:`` events plus ``[DONE]``; others ``event: <type>`` +
    ``data:``, where a line without a string ``type`` gets no ``event:`` field. Lines are
    written exactly as stored, never re-serialised.
    """
    lines = [line for line in raw.split(b"\n") if line.strip()]
    kinds: list[bytes | None] = []
    for line in lines:
        kind: bytes | None = None
        if not chat:
            try:
                parsed = orjson.loads(line)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
                kind = parsed["type"].encode()
        kinds.append(kind)
    starts = [i for i, k in enumerate(kinds) if k == b"response.created"]
    bounds = [0, *starts[1:]] if starts else [0]
    if part >= len(bounds):
        return None
    end = bounds[part + 1] if part + 1 < len(bounds) else len(lines)
    events = [
        _Event(_frame(lines[i], eol, kinds[i]), True, kinds[i] in _TERMINAL_KINDS)
        for i in range(bounds[part], end)
    ]
    if chat:
        events.append(_Event(_frame(_DONE, eol), False, terminal=True))
    return events


# --------------------------------------------------------------------------------------------
# The provider
# --------------------------------------------------------------------------------------------


def _compressor(encoding: ContentEncoding) -> zlib._Compress:
    # gzip: a gzip member (wbits 16 + 15); deflate: the zlib format HTTP means by "deflate".
    return zlib.compressobj(wbits=31 if encoding == "gzip" else 15)


def _compressed(payload: bytes, encoding: ContentEncoding | None) -> bytes:
    if encoding is None:
        return payload
    zipper = _compressor(encoding)
    return zipper.compress(payload) + zipper.flush()


class _Writer:
    """Writes body bytes to one response and records them.

    With an ``encoding`` each `write` is compressed and sync-flushed on its own, so that it
    can be decoded as soon as it arrives; `finish` ends the encoding. What goes on the wire
    is split into random pieces if scripted, else into pieces of at most 64 KiB.
    """

    __slots__ = ("_keep", "_loop", "_record", "_resp", "_rng", "_zipper")

    def __init__(
        self,
        resp: web.StreamResponse,
        record: RequestRecord,
        split_seed: int | None,
        *,
        keep: bool,
        encoding: ContentEncoding | None = None,
    ) -> None:
        self._resp = resp
        self._record = record
        self._keep = keep
        self._loop = asyncio.get_running_loop()
        # Not for security: a reproducible spread of piece sizes is the point.
        self._rng = random.Random(split_seed) if split_seed is not None else None  # noqa: S311
        self._zipper = _compressor(encoding) if encoding is not None else None

    async def write(self, data: bytes) -> None:
        """Write one event (or body); raises `ConnectionError` if the client went away."""
        if self._zipper is not None:
            data = self._zipper.compress(data) + self._zipper.flush(zlib.Z_SYNC_FLUSH)
        await self._send(data)

    async def finish(self) -> None:
        """End the content encoding (its trailer), if any; call before ``write_eof``."""
        zipper, self._zipper = self._zipper, None
        if zipper is not None:
            await self._send(zipper.flush())

    async def _send(self, data: bytes) -> None:
        record = self._record
        if record.first_byte_at is None:
            record.first_byte_at = self._loop.time()
        rng = self._rng
        if rng is None and len(data) <= _PIECE_MAX:
            await self._resp.write(data)
            if self._keep:
                record.sent += data
            record.writes += 1
            return
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            size = rng.randint(1, _SPLIT_MAX) if rng is not None else _PIECE_MAX
            piece = bytes(view[pos : pos + size])
            await self._resp.write(piece)
            if self._keep:
                record.sent += piece
            record.writes += 1
            pos += len(piece)
            # Yield so that each piece can leave as its own TCP segment.
            await asyncio.sleep(0)


class FakeProvider:
    """A scripted fake OpenAI + Anthropic upstream; one instance per server.

    ``keys``: accepted API keys (``Authorization: Bearer`` on OpenAI routes; ``x-api-key``,
    else ``Authorization: Bearer``, on Anthropic routes); ``None`` accepts any non-empty key.
    A missing or rejected key is a 401 in the route's error format. ``recordings_dir``: where
    ``replay`` names resolve. ``record_sent=False`` keeps ``RequestRecord.sent`` empty, for
    long benchmarks where holding every body would grow memory; ``max_records`` bounds the
    records kept (the newest are kept; counters still count everything).

    State (records, counters, per-session attempt counts) lives on the instance; `reset`
    clears it. Use `make_app` to build the aiohttp application, or `start_fake_provider`.
    """

    def __init__(
        self,
        keys: set[str] | None = None,
        recordings_dir: Path | None = None,
        *,
        record_sent: bool = True,
        max_records: int | None = None,
    ) -> None:
        self.keys: frozenset[str] | None = frozenset(keys) if keys is not None else None
        self.recordings_dir = recordings_dir
        self.record_sent = record_sent
        self.max_records = max_records
        self.records: list[RequestRecord] = []
        self.open_streams = 0
        self.max_open_streams = 0
        self.requests = 0
        self.disconnects = 0
        self.by_path: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self._sessions: dict[str, int] = {}
        # Framed replays, built once per (name, part, line ending): files never change while
        # serving, and benchmarks replay the same file thousands of times.
        self._recordings: dict[tuple[str, int, bytes], list[_Event]] = {}
        self._waiters: list[asyncio.Future[None]] = []

    # ---- public helpers ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every record, counter and session attempt count (replay cache is kept).

        Streams still in flight keep their records but are no longer listed; the open-stream
        gauge keeps counting them, and ``max_open_streams`` restarts from it.
        """
        self.records.clear()
        self.requests = 0
        self.disconnects = 0
        self.max_open_streams = self.open_streams
        self.by_path.clear()
        self.by_key.clear()
        self.by_status.clear()
        self._sessions.clear()
        self._notify()

    def stats(self) -> dict[str, Any]:
        """The counters served by ``GET /_fake/stats`` (keys are listed raw: they are the
        fake's own test keys, and out-of-process tests need to see which one was used)."""
        return {
            "requests": self.requests,
            "open_streams": self.open_streams,
            "max_open_streams": self.max_open_streams,
            "disconnects": self.disconnects,
            "by_path": dict(self.by_path),
            "by_key": dict(self.by_key),
            "by_status": {str(k): v for k, v in self.by_status.items()},
        }

    # A plain timeout argument (not asyncio.timeout) keeps test call sites one line.
    async def wait_for_records(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[RequestRecord]:
        """Wait until at least ``n`` requests were recorded; return the first ``n`` records.

        Raises `TimeoutError` after ``timeout`` seconds.
        """
        await self.wait_until(lambda: len(self.records) >= n, timeout)
        return self.records[:n]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - see wait_for_records
    ) -> None:
        """Wait until ``predicate()`` is true, re-checking whenever any record changes.

        Records change when a request arrives, is answered, ends or disconnects. Raises
        `TimeoutError` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake provider: condition not met within {timeout} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                continue
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this provider's routes."""
        # Anthropic accepts 32 MB requests; long-prompt tests need more than aiohttp's 1 MB.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handler("openai", "chat"))
        app.router.add_post("/v1/completions", self._handler("openai", "completions"))
        app.router.add_post("/v1/responses", self._handler("openai", "responses"))
        app.router.add_post("/v1/embeddings", self._handler("openai", "embeddings"))
        app.router.add_get("/v1/models", self._handler("openai", "models"))
        app.router.add_post("/v1/messages", self._handler("anthropic", "messages"))
        app.router.add_post("/v1/messages/count_tokens", self._handler("anthropic", "count"))
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_post("/_fake/reset", self._handle_reset)
        return app

    # ---- bookkeeping --------------------------------------------------------------------------

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _mark_disconnected(self, record: RequestRecord) -> None:
        if record.disconnected or record.completed:
            return
        record.disconnected = True
        record.disconnected_at = asyncio.get_running_loop().time()
        record.outcome = "disconnected"
        self.disconnects += 1

    def _finish(self, record: RequestRecord, outcome: Outcome) -> None:
        record.completed = True
        record.outcome = outcome

    def _stream_opened(self) -> None:
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)

    # ---- control routes ---------------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _handle_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    # ---- API routes ---------------------------------------------------------------------------

    def _handler(
        self, wire: Wire, api: Api
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, wire, api)

        return handle

    async def _handle(self, request: web.Request, wire: Wire, api: Api) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RequestRecord(
            path=request.path, method=request.method, headers=headers, started_at=loop.time()
        )
        record.request_id = "req_" + _rand_id()
        session = headers.get("x-fake-session")
        if session is not None:
            record.session = session
            record.attempt = self._sessions.get(session, 0)
            self._sessions[session] = record.attempt + 1
        self.records.append(record)
        cap = self.max_records
        if cap is not None and len(self.records) > 2 * cap:
            # Trim in batches: a long-running fake keeps the newest records, bounded memory.
            del self.records[:-cap]
        self.requests += 1
        self.by_path[record.path] = self.by_path.get(record.path, 0) + 1
        self._notify()
        try:
            return await self._serve(request, wire, api, record)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away: record it, never swallow.
            self._mark_disconnected(record)
            raise
        finally:
            record.ended_at = loop.time()
            if record.status:
                self.by_status[record.status] = self.by_status.get(record.status, 0) + 1
            self._notify()

    def _check_key(self, wire: Wire, headers: Mapping[str, str], record: RequestRecord) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        key: str | None
        if wire == "openai":
            key = bearer
            missing = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            # anthropic-sdk-python 2.x sends api_key as a Bearer token, older ones x-api-key.
            key = headers.get("x-api-key") or bearer
            missing = "x-api-key header is required"
        if key is None:
            raise _Reject(401, missing)
        record.api_key = key
        self.by_key[key] = self.by_key.get(key, 0) + 1
        if self.keys is not None and key not in self.keys:
            raise _Reject(401)

    async def _serve(
        self, request: web.Request, wire: Wire, api: Api, record: RequestRecord
    ) -> web.StreamResponse:
        id_header = "x-request-id" if wire == "openai" else "request-id"
        base_headers = {id_header: record.request_id}
        # Read the body even when the key is bad, so that the record shows what was sent.
        record.body = await request.read()
        try:
            self._check_key(wire, record.headers, record)
            body = _parse_body(record, api)
            model_field = body.get("model")
            model = model_field if isinstance(model_field, str) else "fake-model"
            model, suffix = _split_model(model)
            record.model = model
            script = parse_script(suffix)
            script = parse_script(_script_from_headers(record.headers), script)
            plan = record.headers.get("x-fake-plan")
            if plan is not None:
                script = parse_script(_plan_entry(plan, record.attempt), script)
            record.script = script
        except ScriptError as exc:
            return await self._send_error(request, record, wire, base_headers, _bad_script(exc))
        except _Reject as rej:
            return await self._send_error(request, record, wire, base_headers, rej)

        stream = script.replay is not None or (
            api in _STREAM_BUILDERS and body.get("stream") is True
        )
        record.stream = stream
        if not stream:
            return await self._serve_body(request, wire, api, record, body, model, base_headers)
        self._stream_opened()
        try:
            return await self._serve_stream(request, wire, api, record, body, model, base_headers)
        finally:
            self.open_streams -= 1

    def _gen(self, api: Api, body: Mapping[str, Any], model: str, record: RequestRecord) -> _Gen:
        script = record.script
        return _Gen(
            body=body,
            model=model,
            created=int(time.time()),
            prompt_tokens=estimate_prompt_tokens(body),
            max_tokens=_max_tokens(api, body),
            include_usage=_include_usage(body),
            tool_name=_tool_name(body, script) if api != "completions" else None,
            script=script,
            eol=_EOLS[script.line_ending],
            echo=_echo(record),
        )

    def _stream_plan(
        self, api: Api, body: Mapping[str, Any], model: str, record: RequestRecord
    ) -> _StreamPlan:
        """Build a generated stream, its first content event padded to ``event_bytes``."""
        g = self._gen(api, body, model, record)
        build = _STREAM_BUILDERS[api]
        plan = build(g)
        target = record.script.event_bytes
        first = next((e for e in plan.events if e.content), None)
        if first is not None and len(first.payload) < target:
            # One padding character is one byte more in the event, and a rebuild keeps the
            # widths of everything else (ids, timestamps, sequence numbers): exact in one go.
            plan = build(dataclasses.replace(g, pad=target - len(first.payload)))
        return plan

    async def _scripted_head(
        self, request: web.Request, wire: Wire, record: RequestRecord, headers: Mapping[str, str]
    ) -> web.StreamResponse | None:
        """Carry out what the script does before (or instead of) a normal answer.

        Sleeps ``headers_delay_ms``, then carries out the first of ``reset_before_headers``,
        ``raw_status`` and ``status``. Returns the response when one of those answered, else
        None (the caller answers normally).
        """
        script = record.script
        if script.headers_delay_ms:
            await asyncio.sleep(script.headers_delay_ms / 1000)
        if script.reset_before_headers:
            self._abort(request, record)
            return web.Response(status=500)  # never sent: the connection is gone
        if script.raw_status is not None:
            return await self._send_raw(request, wire, record, script.raw_status, headers)
        if script.status is not None:
            scripted = _Reject.from_script(script, script.status, _echo(record))
            return await self._send_error(request, record, wire, headers, scripted)
        return None

    async def _serve_body(
        self,
        request: web.Request,
        wire: Wire,
        api: Api,
        record: RequestRecord,
        body: Mapping[str, Any],
        model: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        script = record.script
        payload = b""
        try:
            if script.status is None and script.raw_status is None:
                payload = self._build_body(api, body, model, record)
        except _Reject as rej:
            return await self._send_error(request, record, wire, headers, rej)
        scripted = await self._scripted_head(request, wire, record, headers)
        if scripted is not None:
            return scripted
        if script.stall_after is not None:
            # A non-stream answer has no chunks to count: any stall hangs before the headers.
            await asyncio.sleep(_STALL_CAP_S)
        return await self._send_json(request, record, 200, payload, headers, scripted=True)

    def _build_body(
        self, api: Api, body: Mapping[str, Any], model: str, record: RequestRecord
    ) -> bytes:
        if api == "embeddings":
            return _embeddings_body(body, model)
        if api == "models":
            data = [
                {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "fake"}
                for m in FAKE_MODELS
            ]
            return orjson.dumps({"object": "list", "data": data})
        if api == "count":
            return orjson.dumps({"input_tokens": estimate_prompt_tokens(body)})
        return _BODY_BUILDERS[api](self._gen(api, body, model, record))

    async def _send_json(
        self,
        request: web.Request,
        record: RequestRecord,
        status: int,
        payload: bytes,
        headers: Mapping[str, str],
        *,
        scripted: bool = False,
    ) -> web.StreamResponse:
        script = record.script
        encoding = script.content_encoding
        payload = _compressed(payload, encoding)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(payload)
        if encoding is not None:
            resp.headers["Content-Encoding"] = encoding
        await resp.prepare(request)
        record.status = status
        if scripted and script.first_delay_ms:
            await asyncio.sleep(script.first_delay_ms / 1000)
        split_seed = script.split_seed if scripted else None
        writer = _Writer(resp, record, split_seed, keep=self.record_sent)
        if scripted and script.truncate_after is not None:
            # Without chunks to count, a truncated JSON answer is half its body, then a reset:
            # with a Content-Length, no clean ending is possible.
            try:
                await writer.write(payload[: len(payload) // 2])
            except ConnectionError:
                self._mark_disconnected(record)
                return resp
            self._abort(request, record)
            return resp
        try:
            await writer.write(payload)
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(record)
            return resp
        self._finish(record, "complete" if status < 400 else "error_status")
        return resp

    async def _send_error(
        self,
        request: web.Request,
        record: RequestRecord,
        wire: Wire,
        headers: Mapping[str, str],
        rej: _Reject,
    ) -> web.StreamResponse:
        payload = rej.body(wire, record.request_id)
        return await self._send_json(
            request, record, rej.status, payload, {**headers, **rej.headers}
        )

    async def _send_raw(
        self,
        request: web.Request,
        wire: Wire,
        record: RequestRecord,
        status: int,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Write ``raw_status`` as raw HTTP/1.1 on the transport (see `FakeScript.raw_status`).

        Returns a response aiohttp can never send: the transport is closing (a final status)
        or gone (the client left a held 1xx), so aiohttp treats it as a disconnect.
        """
        transport = request.transport
        if transport is None or transport.is_closing():
            self._mark_disconnected(record)
            return web.Response(status=500)
        if status < 200:
            if status == 101:
                head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                head += b"Upgrade: websocket\r\n\r\n"
            else:
                head = f"HTTP/1.1 {status} {_reason(status)}\r\n\r\n".encode()
            transport.write(head)
            record.status = status
            self._notify()
            # No final response follows; the client going away cancels this sleep.
            await asyncio.sleep(_STALL_CAP_S)
            transport.close()
            self._finish(record, "stall_timeout")
            return web.Response(status=500)
        rej = _Reject.from_script(record.script, status, _echo(record))
        fields = {**headers, **rej.headers}
        for name, value in fields.items():
            if "\r" in value or "\n" in value:
                param = name.replace("-", "_")
                bad = _Reject(
                    400, f"fake provider: script parameter '{param}': CR or LF in {value!r}"
                )
                return await self._send_error(request, record, wire, headers, bad)
        body = rej.body(wire, record.request_id)
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            *(f"{name}: {value}" for name, value in fields.items()),
            "connection: close",
        ]
        record.first_byte_at = asyncio.get_running_loop().time()
        transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        record.status = status
        record.writes += 1
        if self.record_sent:
            record.sent += body
        # close(), not abort(): the buffered response is flushed first.
        transport.close()
        self._finish(record, "error_status")
        return web.Response(status=500)

    def _abort(self, request: web.Request, record: RequestRecord) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()
        self._finish(record, "reset")

    async def _replay_plan(self, api: Api, record: RequestRecord) -> _StreamPlan:
        script = record.script
        name = script.replay
        assert name is not None
        eol = _EOLS[script.line_ending]
        key = (name, script.replay_part, eol)
        events = self._recordings.get(key)
        if events is None:
            path = self._resolve_recording(name)
            raw = await asyncio.to_thread(path.read_bytes)
            chat = path.relative_to(self._recordings_root()).parts[0] in _CHAT_RECORDING_DIRS
            events = _frame_recording(raw, chat, script.replay_part, eol)
            if events is None:
                raise _Reject(
                    400,
                    f"fake provider: script parameter 'replay_part': recording {name!r} has no "
                    f"part {script.replay_part}",
                )
            self._recordings[key] = events
        echo = _echo(record)
        if api in ("chat", "completions"):
            error = _chat_error(script, eol, echo)
        elif api == "messages":
            error = _anthropic_error(script, eol, echo)
        else:
            error = _responses_replay_error(script, eol, echo)
        return _StreamPlan(events, error)

    def _recordings_root(self) -> Path:
        if self.recordings_dir is None:
            raise _Reject(
                400, "fake provider: script parameter 'replay': no recordings_dir configured"
            )
        return self.recordings_dir.resolve()

    def _resolve_recording(self, name: str) -> Path:
        root = self._recordings_root()
        bad = _Reject(400, f"fake provider: script parameter 'replay': bad recording name {name!r}")
        relative = Path(name)
        if not name or "\\" in name or relative.is_absolute() or ".." in relative.parts:
            raise bad
        filename = name if name.endswith(".chunks.jsonl") else name + ".chunks.jsonl"
        path = (root / filename).resolve()
        if not path.is_relative_to(root) or path == root:
            raise bad
        if not path.is_file():
            raise _Reject(
                400, f"fake provider: script parameter 'replay': no recording named {name!r}"
            )
        return path

    async def _serve_stream(
        self,
        request: web.Request,
        wire: Wire,
        api: Api,
        record: RequestRecord,
        body: Mapping[str, Any],
        model: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        script = record.script
        plan: _StreamPlan | None = None
        try:
            if script.status is None and script.raw_status is None:
                if script.replay is not None:
                    plan = await self._replay_plan(api, record)
                else:
                    plan = self._stream_plan(api, body, model, record)
        except _Reject as rej:
            return await self._send_error(request, record, wire, headers, rej)
        scripted = await self._scripted_head(request, wire, record, headers)
        if scripted is not None:
            return scripted
        assert plan is not None

        stream_headers = {**headers, "Cache-Control": "no-cache"}
        if script.content_encoding is not None:
            stream_headers["Content-Encoding"] = script.content_encoding
        resp = web.StreamResponse(status=200, headers=stream_headers)
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)
        record.status = 200
        writer = _Writer(
            resp,
            record,
            script.split_seed,
            keep=self.record_sent,
            encoding=script.content_encoding,
        )
        try:
            if script.first_delay_ms:
                await asyncio.sleep(script.first_delay_ms / 1000)
            gap = script.gap_ms / 1000
            content = 0
            for written, event in enumerate(plan.events):
                if written and gap:
                    await asyncio.sleep(gap)
                if script.stall_after is not None and content >= script.stall_after:
                    await asyncio.sleep(_STALL_CAP_S)
                    await writer.finish()
                    await resp.write_eof()
                    self._finish(record, "stall_timeout")
                    return resp
                if script.error_after is not None and content >= script.error_after:
                    for payload in plan.error(written):
                        await writer.write(payload)
                    await writer.finish()
                    await resp.write_eof()
                    self._finish(record, "error_event")
                    return resp
                if script.truncate_after is not None and content >= script.truncate_after:
                    if script.truncate_mode == "reset":
                        self._abort(request, record)
                        return resp
                    await writer.finish()
                    await resp.write_eof()
                    self._finish(record, "truncated")
                    return resp
                if event.terminal and script.omit_done:
                    continue
                await writer.write(event.payload)
                if event.content:
                    content += 1
            await writer.finish()
            await resp.write_eof()
        except ConnectionError:
            self._mark_disconnected(record)
            return resp
        self._finish(record, "complete")
        return resp


def _echo(record: RequestRecord) -> str:
    """What `FakeScript.echo_key` appends for this request (nothing when it is off)."""
    return _key_echo(record.api_key) if record.script.echo_key else ""


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"


def _responses_replay_error(
    script: FakeScript, eol: bytes, echo: str
) -> Callable[[int], list[bytes]]:
    """In-band error for a replay on the Responses route: the ids of the recording are not
    known here, so the ``response.failed`` carries a minimal response object."""

    def error(written: int) -> list[bytes]:
        code = script.error_code or script.error_type or "server_error"
        message = (script.error_message or _INBAND_OPENAI_MESSAGE) + echo
        failed: dict[str, Any] = {
            "id": "resp_" + _rand_id(24),
            "object": "response",
            "status": "failed",
            "error": {"code": code, "message": message},
            "output": [],
            "usage": None,
        }
        err = {"type": "error", "code": code, "message": message, "param": None}
        return [
            _frame(orjson.dumps({**err, "sequence_number": written}), eol, b"error"),
            _frame(
                orjson.dumps(
                    {"type": "response.failed", "response": failed, "sequence_number": written + 1}
                ),
                eol,
                b"response.failed",
            ),
        ]

    return error


def _parse_body(record: RequestRecord, api: Api) -> dict[str, Any]:
    """Parse the request body once into ``record.json``; GET /v1/models has none."""
    if api == "models":
        return {}
    try:
        parsed = orjson.loads(record.body)
    except orjson.JSONDecodeError as exc:
        raise _Reject(400, "We could not parse the JSON body of your request.") from exc
    record.json = parsed
    if not isinstance(parsed, dict):
        raise _Reject(400, "The request body must be a JSON object.")
    return parsed


def _bad_script(exc: ScriptError) -> _Reject:
    return _Reject(400, str(exc), param=exc.param)


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_fake_provider(
    provider: FakeProvider,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> tuple[web.AppRunner, str]:
    """Serve ``provider`` on a real socket; return the runner and ``http://host:port``.

    OpenAI clients use ``<url>/v1`` as base URL, Anthropic clients ``<url>``. The runner uses
    ``handler_cancellation=True`` so that a client disconnect cancels the handler (and is
    recorded) even during a stall. The caller must ``await runner.cleanup()``; streams still
    open then are given ``shutdown_timeout`` seconds before they are cancelled.
    """
    runner = web.AppRunner(
        provider.make_app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _base_url(host, site.port)


_URL_RE: Final = re.compile(r"https?://[^\s,]+")


def run_fake_provider(host: str, port: int, recordings_dir: Path | None) -> None:
    """Serve a fresh `FakeProvider` until interrupted (the ``gateway fake-provider`` command).

    Accepts any non-empty key. Prints one line with the URL once listening.
    """
    # A long-lived process (demos, benchmarks, users' CI): bounded memory.
    provider = FakeProvider(recordings_dir=recordings_dir, record_sent=False, max_records=1000)

    def announce(message: str) -> None:
        urls = _URL_RE.findall(message)
        url = urls[0] if urls else _base_url(host, port)
        print(
            f"fake provider listening on {url} "
            f"(OpenAI base URL {url}/v1, Anthropic base URL {url})",
            flush=True,
        )

    web.run_app(
        provider.make_app(),
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        # aiohttp's default listen backlog (128) drops SYNs when hundreds of clients connect
        # at once; a dropped SYN costs the client a 1 s retransmit.
        backlog=1024,
        print=announce,
    )
