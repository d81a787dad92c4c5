"""The one place that turns errors into what a caller receives: HTTP error answers in the
caller's API format (its SDK raises the matching exception), the final SSE error event of a
committed stream, an upstream error passed through, and the answer to a request too
malformed to know its API. The formats themselves belong to each wire API
(gateway/providers/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web

from gateway.errors import GatewayError, Kind
from gateway.providers import WIRE_APIS
from gateway.providers.base import ApiFamily, Endpoint


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An upstream's own error answer, handed to the caller as it came (scrubbed)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# What a failed attempt leaves for the caller when no attempt follows.
ErrorAnswer = GatewayError | Passthrough


def error_body(
    family: ApiFamily,
    kind: Kind,
    message: str,
    *,
    param: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """The JSON error body in `family`'s format (what its SDK parses)."""
    return WIRE_APIS[family].error_body(kind, message, param=param, request_id=request_id)


def error_response(family: ApiFamily, answer: ErrorAnswer, request_id: str) -> web.Response:
    """The answer a caller of `family` gets for `answer`, with the request id in the header its
    SDK reads (the upstream's own id, for a passed-through answer that carried one)."""
    header = WIRE_APIS[family].request_id_header
    if isinstance(answer, Passthrough):
        response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        response.headers.setdefault(header, request_id)
        return response
    headers = {**answer.headers, header: request_id}
    response = web.Response(
        status=answer.status,
        body=error_body(
            family, answer.kind, answer.message, param=answer.param, request_id=request_id
        ),
        content_type="application/json",
        headers=headers,
    )
    if answer.close:
        response.force_close()
    return response


def terminal_event(endpoint: Endpoint, kind: Kind, message: str, sequence: int = 0) -> bytes:
    """The one final error event the gateway writes into a committed stream, in the stream's
    own format (a Responses stream's events are numbered: `sequence` is the next number)."""
    return WIRE_APIS[endpoint.family].terminal_event(endpoint, kind, message, sequence)


def malformed_request(status: int, message: str, request_id: str) -> web.Response:
    """The answer to a request no header of which could be read: its API is unknown, so one
    body both SDKs parse (OpenAI reads `error.message/type/code/param`; Anthropic reads `type`
    and `error.type`), the request id in both SDKs' headers, and the connection closed."""
    code = "request_too_large" if status == 431 else "invalid_request_error"
    body = orjson.dumps(
        {
            "type": "error",
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": None,
            },
            "request_id": request_id,
        }
    )
    response = web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"x-request-id": request_id, "request-id": request_id},
    )
    response.force_close()
    return response
