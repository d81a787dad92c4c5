"""Scripts: how the fake answers one request, and how a request scripts it.

A `FakeScript` is parsed once per request from, lowest to highest precedence, the model name
suffix after ``@``, the ``x-fake-*`` request headers and the request's entry of the
``x-fake-plan`` (see the package docstring); `parse_script` validates every value with the
converter of its parameter and raises `ScriptError` naming the first bad one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson

STALL_CAP_S: Final = 600.0
"""The longest the fake ever hangs (a stall, a held 1xx, a scripted delay)."""
_MAX_EVENT_BYTES: Final = 64 * 1024 * 1024

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
    if value is None or not math.isfinite(value) or not 0 <= value <= STALL_CAP_S * 1000:
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


def split_model(model: str) -> tuple[str, dict[str, object]]:
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


def build_script(
    suffix: Mapping[str, object], headers: Mapping[str, str], attempt: int
) -> FakeScript:
    """Build a request's script: its model-name ``suffix`` parameters, then its ``x-fake-*``
    ``headers`` (lower-case names), then its ``x-fake-plan`` entry for ``attempt``.

    Raises `ScriptError` naming the first unknown parameter or bad value.
    """
    script = parse_script(suffix)
    script = parse_script(_script_from_headers(headers), script)
    plan = headers.get("x-fake-plan")
    if plan is not None:
        script = parse_script(_plan_entry(plan, attempt), script)
    return script
