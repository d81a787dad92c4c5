"""One error hierarchy (rendered in one place, gateway/render.py, in the caller's format).

Every error the gateway itself produces is a `GatewayError`: it carries an HTTP status, a
message safe to show a caller (no keys, hosts or tracebacks) and a `Kind` from which each wire
API derives its `type`/`code`, so that the official SDKs raise the matching exception class
(`openai.NotFoundError`, `anthropic.AuthenticationError`, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Kind(enum.Enum):
    """What went wrong, independent of wire format. Each wire API maps a kind to its own error
    type (and code), so that its SDK raises the matching exception class."""

    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    REQUEST_TIMEOUT = "request_timeout"
    RATE_LIMITED = "rate_limited"
    BUDGET_EXCEEDED = "budget_exceeded"  # a tier's day or month budget is spent
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_CREDENTIALS = "upstream_credentials"
    OVERLOADED = "overloaded"
    LIMITER_UNAVAILABLE = "limiter_unavailable"
    CANCELLED_BY_OPERATOR = "cancelled_by_operator"  # a stream ended from the admin listener
    STREAM_NOT_FOUND = "stream_not_found"  # no resumable stream with that id for this caller
    GONE = "gone"  # a resumable stream that can no longer be resumed (410)
    RANGE = "range"  # a resume offset past the stream's bytes (416)
    INTERNAL = "internal"


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
