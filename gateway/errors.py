"""One error hierarchy, rendered in one place in the caller's API format.

Every error the gateway itself produces is a `GatewayError`: it carries an HTTP status, a
message safe to show a caller (no keys, hosts or tracebacks) and a `Kind` from which each wire
format's `type`/`code` is derived, so that the official SDKs raise the matching exception
class (`openai.NotFoundError`, `anthropic.AuthenticationError`, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import cast

import orjson


class ApiFamily(enum.Enum):
    """The wire API a caller speaks: it decides the error format and the stream framing."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class Kind(enum.Enum):
    """What went wrong, independent of wire format.

    value = (OpenAI error type, OpenAI error code, Anthropic error type)
    """

    INVALID_REQUEST = ("invalid_request_error", None, "invalid_request_error")
    AUTHENTICATION = ("invalid_request_error", "invalid_api_key", "authentication_error")
    PERMISSION = ("invalid_request_error", "model_not_allowed", "permission_error")
    NOT_FOUND = ("invalid_request_error", "model_not_found", "not_found_error")
    ROUTE_NOT_FOUND = ("invalid_request_error", "unknown_url", "not_found_error")
    METHOD_NOT_ALLOWED = ("invalid_request_error", "method_not_allowed", "invalid_request_error")
    TOO_LARGE = ("invalid_request_error", "request_too_large", "request_too_large")
    REQUEST_TIMEOUT = ("invalid_request_error", "request_timeout", "invalid_request_error")
    RATE_LIMITED = ("rate_limit_exceeded", "rate_limit_exceeded", "rate_limit_error")
    UPSTREAM_UNAVAILABLE = ("server_error", "upstream_unavailable", "api_error")
    UPSTREAM_TIMEOUT = ("server_error", "upstream_timeout", "timeout_error")
    UPSTREAM_ERROR = ("server_error", "upstream_error", "api_error")
    UPSTREAM_CREDENTIALS = ("server_error", "upstream_credentials", "api_error")
    OVERLOADED = ("server_error", "overloaded", "overloaded_error")
    LIMITER_UNAVAILABLE = ("server_error", "rate_limiter_unavailable", "api_error")
    INTERNAL = ("server_error", None, "api_error")

    @property
    def openai_type(self) -> str:
        return cast(str, self.value[0])

    @property
    def openai_code(self) -> str | None:
        return cast("str | None", self.value[1])

    @property
    def anthropic_type(self) -> str:
        return cast(str, self.value[2])


class GatewayError(Exception):
    """An error answered by the gateway itself. `message` is shown to the caller verbatim."""

    def __init__(
        self,
        status: int,
        kind: Kind,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        # Close the connection after answering (e.g. the rest of the body is never read).
        self.close = close


class UpstreamFailure(GatewayError):
    """The upstream could not give a usable response (connect error, timeout, dead stream).

    `reason` is a short, bounded label for logs and metrics (connect_error, first_byte_timeout,
    chunk_timeout, total_timeout, payload_error, ...).
    """

    def __init__(self, status: int, kind: Kind, message: str, *, reason: str) -> None:
        super().__init__(status, kind, message)
        self.reason = reason


def error_body(
    family: ApiFamily,
    kind: Kind,
    message: str,
    *,
    param: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """The JSON error body in `family`'s format (what its SDK parses)."""
    if family is ApiFamily.ANTHROPIC:
        body: dict[str, object] = {
            "type": "error",
            "error": {"type": kind.anthropic_type, "message": message},
        }
        if request_id is not None:
            body["request_id"] = request_id
        return orjson.dumps(body)
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": kind.openai_type,
                "param": param,
                "code": kind.openai_code,
            }
        }
    )


def stream_error_event(
    family: ApiFamily,
    kind: Kind,
    message: str,
    *,
    responses: bool,
    sequence_number: int = 0,
) -> bytes:
    """One final in-band SSE error event in the stream's own format (after the response is
    committed, this is the only way left to tell the client). A Responses stream's events are
    numbered: `sequence_number` is the one after the last event the client got."""
    if family is ApiFamily.ANTHROPIC:
        payload = orjson.dumps(
            {"type": "error", "error": {"type": kind.anthropic_type, "message": message}}
        )
        return b"event: error\ndata: " + payload + b"\n\n"
    if responses:
        payload = orjson.dumps(
            {
                "type": "error",
                "code": kind.openai_code,
                "message": message,
                "param": None,
                "sequence_number": sequence_number,
            }
        )
        return b"event: error\ndata: " + payload + b"\n\n"
    payload = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": kind.openai_type,
                "param": None,
                "code": kind.openai_code,
            }
        }
    )
    return b"data: " + payload + b"\n\n"
