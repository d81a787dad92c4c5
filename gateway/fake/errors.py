"""Errors in each wire format: error-status answers (`ErrorAnswer`; `Reject` raises one before
anything was sent) and the in-band error events that end a stream, per API.

An in-band error carries the error object of a status answer (a 500 on OpenAI routes, a 529 on
Anthropic ones), as the providers send it; Responses streams have events of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import orjson

from gateway.fake.script import FakeScript
from gateway.fake.wire import Api, ErrorEvents, Wire, frame, rand_id, typed_event

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


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error status answer; `body` renders it in the route's wire format.

    Fields left unset take the defaults of the status; ``echo`` is appended to the message,
    default or scripted (see `FakeScript.echo_key`).
    """

    status: int
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    echo: str = ""

    @classmethod
    def scripted(cls, script: FakeScript, status: int, echo: str = "") -> ErrorAnswer:
        """The answer the script's ``error_*`` and ``retry_after*`` fields describe."""
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
        """The JSON error body; an Anthropic one also carries the request id."""
        if wire == "anthropic":
            return orjson.dumps({**self.error_object(wire), "request_id": request_id})
        return orjson.dumps(self.error_object(wire))

    def error_object(self, wire: Wire) -> dict[str, Any]:
        """The error object, as an error body and an in-band error event carry it."""
        if wire == "anthropic":
            fallback = "api_error" if self.status >= 500 else "invalid_request_error"
            a_type, a_msg = _ANTHROPIC_ERRORS.get(self.status, (fallback, "Error."))
            return {
                "type": "error",
                "error": {
                    "type": self.error_type or a_type,
                    "message": (self.message or a_msg) + self.echo,
                },
            }
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        o_type, o_code, o_msg = _OPENAI_ERRORS.get(self.status, (fallback, None, "Error."))
        return {
            "error": {
                "message": (self.message or o_msg) + self.echo,
                "type": self.error_type or o_type,
                "param": self.param,
                "code": self.code if self.code is not None else o_code,
            }
        }


class Reject(Exception):
    """Answer the request with an error status (raised before anything was sent)."""

    def __init__(
        self, status: int, message: str | None = None, *, param: str | None = None
    ) -> None:
        super().__init__(message or f"HTTP {status}")
        self.answer = ErrorAnswer(status, message, param=param)


def chat_error(script: FakeScript, eol: bytes, echo: str) -> ErrorEvents:
    """The in-band error of a Chat or legacy Completions stream: one ``data:`` event."""
    error = ErrorAnswer.scripted(script, 500, echo).error_object("openai")
    framed = frame(orjson.dumps(error), eol)
    return lambda _written: [framed]


def messages_error(script: FakeScript, eol: bytes, echo: str) -> ErrorEvents:
    """The in-band error of a Messages stream: one ``error`` event."""
    error = ErrorAnswer.scripted(script, 529, echo).error_object("anthropic")
    framed = frame(orjson.dumps(error), eol, b"error")
    return lambda _written: [framed]


def responses_error(
    script: FakeScript,
    eol: bytes,
    echo: str,
    failed: Callable[[dict[str, Any]], dict[str, Any]],
) -> ErrorEvents:
    """The in-band error of a Responses stream: an ``error`` event, then ``response.failed``
    carrying the response object that ``failed`` builds around the error."""

    def error(written: int) -> list[bytes]:
        code = script.error_code or script.error_type or "server_error"
        message = (script.error_message or _INBAND_OPENAI_MESSAGE) + echo
        response = failed({"code": code, "message": message})
        events: tuple[dict[str, Any], ...] = (
            {"type": "error", "code": code, "message": message, "param": None},
            {"type": "response.failed", "response": response},
        )
        return [
            typed_event({**event, "sequence_number": written + i}, eol).payload
            for i, event in enumerate(events)
        ]

    return error


def replay_error(api: Api, script: FakeScript, eol: bytes, echo: str) -> ErrorEvents:
    """The in-band error of a replay, in the route's API."""
    if api in ("chat", "completions"):
        return chat_error(script, eol, echo)
    if api == "messages":
        return messages_error(script, eol, echo)
    return responses_error(script, eol, echo, _failed_replay)


def _failed_replay(error: dict[str, Any]) -> dict[str, Any]:
    # The ids of the recording are not known here: a minimal response object.
    return {
        "id": "resp_" + rand_id(24),
        "object": "response",
        "status": "failed",
        "error": error,
        "output": [],
        "usage": None,
    }
