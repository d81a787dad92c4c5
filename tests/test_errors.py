"""Tests for gateway.errors: error bodies and in-band stream error events in each wire format,
and that the official SDKs (served our bodies over a real socket) raise the matching
exception classes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.providers import anthropic as anthropic_api
from gateway.providers import openai as openai_api
from gateway.providers.base import ApiFamily
from gateway.render import error_body, terminal_event

_CHAT, _COMPLETIONS, _RESPONSES, _EMBEDDINGS = openai_api.ENDPOINTS
_MESSAGES = anthropic_api.ENDPOINTS[0]


def stream_error_event(
    family: ApiFamily, kind: Kind, message: str, *, responses: bool, sequence_number: int = 0
) -> bytes:
    """The gateway's final error event for a stream of `family` (Responses when asked)."""
    openai_endpoint = _RESPONSES if responses else _CHAT
    endpoint = _MESSAGES if family is ApiFamily.ANTHROPIC else openai_endpoint
    return terminal_event(endpoint, kind, message, sequence_number)


def kind_names(kind: Kind) -> tuple[str, str | None, str]:
    """(OpenAI type, OpenAI code, Anthropic type) of a kind, as each wire API names it."""
    return openai_api.error_type(kind), openai_api.error_code(kind), anthropic_api.error_type(kind)


ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

# The contract per Kind: (OpenAI type, OpenAI code, Anthropic type). Pinned here on purpose: a
# change to any of these changes what the callers' SDKs see.
EXPECTED: dict[Kind, tuple[str, str | None, str]] = {
    Kind.INVALID_REQUEST: ("invalid_request_error", None, "invalid_request_error"),
    Kind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key", "authentication_error"),
    Kind.PERMISSION: ("invalid_request_error", "model_not_allowed", "permission_error"),
    Kind.NOT_FOUND: ("invalid_request_error", "model_not_found", "not_found_error"),
    Kind.ROUTE_NOT_FOUND: ("invalid_request_error", "unknown_url", "not_found_error"),
    Kind.METHOD_NOT_ALLOWED: (
        "invalid_request_error",
        "method_not_allowed",
        "invalid_request_error",
    ),
    Kind.TOO_LARGE: ("invalid_request_error", "request_too_large", "request_too_large"),
    Kind.REQUEST_TIMEOUT: ("invalid_request_error", "request_timeout", "invalid_request_error"),
    Kind.RATE_LIMITED: ("rate_limit_exceeded", "rate_limit_exceeded", "rate_limit_error"),
    # The budget contract names it in both formats (OpenAI's code, Anthropic's type); the
    # SDKs pick their exception by the HTTP status (429: RateLimitError), see SDK_CASES.
    Kind.BUDGET_EXCEEDED: ("budget_exceeded", "budget_exceeded", "budget_exceeded"),
    Kind.UPSTREAM_UNAVAILABLE: ("server_error", "upstream_unavailable", "api_error"),
    Kind.UPSTREAM_TIMEOUT: ("server_error", "upstream_timeout", "timeout_error"),
    Kind.UPSTREAM_ERROR: ("server_error", "upstream_error", "api_error"),
    Kind.UPSTREAM_CREDENTIALS: ("server_error", "upstream_credentials", "api_error"),
    Kind.OVERLOADED: ("server_error", "overloaded", "overloaded_error"),
    Kind.LIMITER_UNAVAILABLE: ("server_error", "rate_limiter_unavailable", "api_error"),
    Kind.CANCELLED_BY_OPERATOR: ("server_error", "cancelled_by_operator", "api_error"),
    Kind.STREAM_NOT_FOUND: ("invalid_request_error", "stream_not_found", "not_found_error"),
    Kind.GONE: ("invalid_request_error", "stream_not_resumable", "invalid_request_error"),
    Kind.RANGE: ("invalid_request_error", "offset_out_of_range", "invalid_request_error"),
    Kind.INTERNAL: ("server_error", None, "api_error"),
}

# Every type Anthropic documents for its error bodies.
ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
}

MESSAGE = 'The model "gpt-x" isn\'t here \u2014 \u00fcn\u00efc\u00f6de, <tags> & \\ back\nslash'

ALL_KINDS = list(Kind)


def test_expected_table_covers_every_kind() -> None:
    assert set(EXPECTED) == set(Kind)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_kind_properties(kind: Kind) -> None:
    assert kind_names(kind) == EXPECTED[kind]
    if kind is not Kind.BUDGET_EXCEEDED:  # named by the budget contract (see EXPECTED)
        assert kind_names(kind)[2] in ANTHROPIC_ERROR_TYPES


# --- error_body ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_openai_error_body(kind: Kind) -> None:
    body = json.loads(error_body(ApiFamily.OPENAI, kind, MESSAGE))
    openai_type, openai_code, _ = EXPECTED[kind]
    assert body == {
        "error": {"message": MESSAGE, "type": openai_type, "param": None, "code": openai_code}
    }
    assert list(body["error"]) == ["message", "type", "param", "code"]


def test_openai_error_body_with_param_ignores_request_id() -> None:
    raw = error_body(
        ApiFamily.OPENAI, Kind.NOT_FOUND, "no such model", param="model", request_id="req_1"
    )
    assert json.loads(raw) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_anthropic_error_body(kind: Kind) -> None:
    body = json.loads(error_body(ApiFamily.ANTHROPIC, kind, MESSAGE))
    assert body == {"type": "error", "error": {"type": EXPECTED[kind][2], "message": MESSAGE}}


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_anthropic_error_body_with_request_id(kind: Kind) -> None:
    raw = error_body(ApiFamily.ANTHROPIC, kind, MESSAGE, param="ignored", request_id="req_011")
    assert json.loads(raw) == {
        "type": "error",
        "error": {"type": EXPECTED[kind][2], "message": MESSAGE},
        "request_id": "req_011",
    }


def test_error_body_is_utf8_json_bytes() -> None:
    raw = error_body(ApiFamily.OPENAI, Kind.INTERNAL, "\u00e9")
    assert isinstance(raw, bytes)
    assert "\u00e9".encode() in raw  # UTF-8, not \u escapes or latin-1
    raw.decode("utf-8")


# --- stream_error_event ----------------------------------------------------------------------


def split_event(raw: bytes) -> list[bytes]:
    """The event's lines; asserts it ends with exactly one blank line."""
    assert raw.endswith(b"\n\n")
    assert not raw.endswith(b"\n\n\n")
    lines = raw[:-2].split(b"\n")
    assert b"" not in lines
    return lines


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_chat_stream_error_event(kind: Kind) -> None:
    raw = stream_error_event(ApiFamily.OPENAI, kind, MESSAGE, responses=False)
    (line,) = split_event(raw)
    assert line.startswith(b"data: ")
    openai_type, openai_code, _ = EXPECTED[kind]
    assert json.loads(line[len(b"data: ") :]) == {
        "error": {"message": MESSAGE, "type": openai_type, "param": None, "code": openai_code}
    }


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_responses_stream_error_event(kind: Kind) -> None:
    raw = stream_error_event(ApiFamily.OPENAI, kind, MESSAGE, responses=True, sequence_number=7)
    event_line, data_line = split_event(raw)
    assert event_line == b"event: error"
    assert data_line.startswith(b"data: ")
    data = json.loads(data_line[len(b"data: ") :])
    assert data == {
        "type": "error",
        "code": EXPECTED[kind][1],
        "message": MESSAGE,
        "param": None,
        "sequence_number": 7,
    }
    # The shape the official SDK's type declares (the Vercel AI SDK validates it too).
    from openai.types.responses import ResponseErrorEvent

    event = ResponseErrorEvent.model_validate(data, strict=True)
    assert event.sequence_number == 7 and event.message == MESSAGE


# The kinds of error event the relay writes itself (timeouts, truncated or broken streams).
STREAM_KINDS = (Kind.UPSTREAM_TIMEOUT, Kind.UPSTREAM_ERROR)


@pytest.mark.parametrize("kind", STREAM_KINDS, ids=lambda k: k.name)
def test_gateway_stream_error_events_match_the_sdk_types(kind: Kind) -> None:
    from anthropic.types import ErrorResponse
    from openai.types import ErrorObject

    chat = json.loads(
        split_event(stream_error_event(ApiFamily.OPENAI, kind, MESSAGE, responses=False))[0][
            len(b"data: ") :
        ]
    )
    ErrorObject.model_validate(chat["error"], strict=True)
    _, data_line = split_event(
        stream_error_event(ApiFamily.ANTHROPIC, kind, MESSAGE, responses=False)
    )
    ErrorResponse.model_validate(json.loads(data_line[len(b"data: ") :]), strict=True)


@pytest.mark.parametrize("responses", [False, True])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.name)
def test_anthropic_stream_error_event(kind: Kind, responses: bool) -> None:
    raw = stream_error_event(ApiFamily.ANTHROPIC, kind, MESSAGE, responses=responses)
    event_line, data_line = split_event(raw)
    assert event_line == b"event: error"
    assert data_line.startswith(b"data: ")
    assert json.loads(data_line[len(b"data: ") :]) == {
        "type": "error",
        "error": {"type": EXPECTED[kind][2], "message": MESSAGE},
    }


# --- GatewayError ----------------------------------------------------------------------------


def test_gateway_error_fields() -> None:
    headers = {"retry-after": "1"}
    err = GatewayError(429, Kind.RATE_LIMITED, "slow down", param="model", headers=headers)
    headers["retry-after"] = "999"  # the error keeps its own copy
    assert (err.status, err.kind, err.message, err.param) == (
        429,
        Kind.RATE_LIMITED,
        "slow down",
        "model",
    )
    assert err.headers == {"retry-after": "1"}
    assert str(err) == "slow down"
    assert GatewayError(400, Kind.INVALID_REQUEST, "x").headers == {}


def test_upstream_failure_is_a_gateway_error_with_reason() -> None:
    err = UpstreamFailure(504, Kind.UPSTREAM_TIMEOUT, "timed out", reason="first_byte_timeout")
    assert isinstance(err, GatewayError)
    assert (err.status, err.kind, err.reason, err.param) == (
        504,
        Kind.UPSTREAM_TIMEOUT,
        "first_byte_timeout",
        None,
    )


# --- the official SDKs against our bodies, over a real socket --------------------------------

# (status, kind, OpenAI SDK class, Anthropic SDK class): exact classes, not just a base class.
SDK_CASES: list[tuple[int, Kind, type[Exception], type[Exception]]] = [
    (400, Kind.INVALID_REQUEST, openai.BadRequestError, anthropic.BadRequestError),
    (401, Kind.AUTHENTICATION, openai.AuthenticationError, anthropic.AuthenticationError),
    (403, Kind.PERMISSION, openai.PermissionDeniedError, anthropic.PermissionDeniedError),
    (404, Kind.NOT_FOUND, openai.NotFoundError, anthropic.NotFoundError),
    (404, Kind.ROUTE_NOT_FOUND, openai.NotFoundError, anthropic.NotFoundError),
    (405, Kind.METHOD_NOT_ALLOWED, openai.APIStatusError, anthropic.APIStatusError),
    (413, Kind.TOO_LARGE, openai.APIStatusError, anthropic.ContentTooLargeError),
    (429, Kind.RATE_LIMITED, openai.RateLimitError, anthropic.RateLimitError),
    (429, Kind.BUDGET_EXCEEDED, openai.RateLimitError, anthropic.RateLimitError),
    (500, Kind.INTERNAL, openai.InternalServerError, anthropic.InternalServerError),
    (502, Kind.UPSTREAM_ERROR, openai.InternalServerError, anthropic.InternalServerError),
    (502, Kind.UPSTREAM_CREDENTIALS, openai.InternalServerError, anthropic.InternalServerError),
    (503, Kind.UPSTREAM_UNAVAILABLE, openai.InternalServerError, anthropic.ServiceUnavailableError),
    (504, Kind.UPSTREAM_TIMEOUT, openai.InternalServerError, anthropic.GatewayTimeoutError),
    (529, Kind.OVERLOADED, openai.InternalServerError, anthropic.OverloadedError),
]


def case_id(case: tuple[int, Kind, type[Exception], type[Exception]]) -> str:
    return f"{case[0]}-{case[1].name}"


async def error_server(
    aiohttp_server: ServerFactory,
    status: int,
    body: bytes,
    seen: list[str],
    headers: dict[str, str] | None = None,
) -> TestServer:

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


@pytest.mark.parametrize("case", SDK_CASES, ids=case_id)
async def test_openai_sdk_maps_our_error_body(
    aiohttp_server: ServerFactory, case: tuple[int, Kind, type[Exception], type[Exception]]
) -> None:
    status, kind, openai_class, _ = case
    body = error_body(ApiFamily.OPENAI, kind, MESSAGE, param="model")
    seen: list[str] = []
    server = await error_server(aiohttp_server, status, body, seen)
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=str(server.make_url("/v1")), max_retries=0
    ) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "hi"}]
            )
    exc = info.value
    assert type(exc) is openai_class
    assert exc.status_code == status
    assert MESSAGE in exc.message
    assert exc.type == EXPECTED[kind][0]
    assert exc.code == EXPECTED[kind][1]
    assert exc.param == "model"
    assert seen == ["/v1/chat/completions"]


@pytest.mark.parametrize("case", SDK_CASES, ids=case_id)
async def test_anthropic_sdk_maps_our_error_body(
    aiohttp_server: ServerFactory, case: tuple[int, Kind, type[Exception], type[Exception]]
) -> None:
    status, kind, _, anthropic_class = case
    body = error_body(ApiFamily.ANTHROPIC, kind, MESSAGE, request_id="req_gw_1")
    seen: list[str] = []
    server = await error_server(aiohttp_server, status, body, seen, {"request-id": "req_gw_1"})
    async with anthropic.AsyncAnthropic(
        api_key="sk-ant-test", base_url=str(server.make_url("")), max_retries=0
    ) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(
                model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
    exc = info.value
    assert type(exc) is anthropic_class
    assert exc.status_code == status
    assert MESSAGE in exc.message or repr(MESSAGE)[1:-1] in exc.message
    assert exc.api_message == MESSAGE
    assert exc.type == EXPECTED[kind][2]
    assert exc.request_id == "req_gw_1"
    assert seen == ["/v1/messages"]


# --- the SDKs against our in-band stream error events ----------------------------------------


async def stream_server(aiohttp_server: ServerFactory, events: list[bytes]) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handler)
    return await aiohttp_server(app)


CHAT_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}'
    b"\n\n"
)


async def test_openai_sdk_raises_on_our_chat_stream_error(aiohttp_server: ServerFactory) -> None:
    error_event = stream_error_event(
        ApiFamily.OPENAI, Kind.UPSTREAM_TIMEOUT, "upstream went silent", responses=False
    )
    server = await stream_server(aiohttp_server, [CHAT_CHUNK, error_event])
    received: list[str | None] = []
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=str(server.make_url("/v1")), max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )

        async def consume() -> None:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)

        with pytest.raises(openai.APIError) as info:
            await consume()
    assert received == ["Hel"]
    assert info.value.message == "upstream went silent"
    assert info.value.code == "upstream_timeout"
    assert info.value.type == "server_error"


async def test_openai_sdk_reads_our_responses_stream_error(aiohttp_server: ServerFactory) -> None:
    created = (
        b"event: response.created\n"
        b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
        b'"object":"response","created_at":1,"status":"in_progress","model":"m","output":[]}}'
        b"\n\n"
    )
    error_event = stream_error_event(
        ApiFamily.OPENAI, Kind.UPSTREAM_ERROR, "upstream broke", responses=True
    )
    server = await stream_server(aiohttp_server, [created, error_event])
    events: list[Any] = []
    async with openai.AsyncOpenAI(
        api_key="sk-test", base_url=str(server.make_url("/v1")), max_retries=0
    ) as client:
        stream = await client.responses.create(model="m", input="hi", stream=True)
        async for event in stream:
            events.append(event)
    assert [e.type for e in events] == ["response.created", "error"]
    assert events[-1].code == "upstream_error"
    assert events[-1].message == "upstream broke"


async def test_anthropic_sdk_raises_on_our_stream_error(aiohttp_server: ServerFactory) -> None:
    start = (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","content":[],"model":"m","stop_reason":null,'
        b'"stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
    )
    error_event = stream_error_event(
        ApiFamily.ANTHROPIC, Kind.OVERLOADED, "upstream overloaded", responses=False
    )
    server = await stream_server(aiohttp_server, [start, error_event])
    seen: list[str] = []
    async with anthropic.AsyncAnthropic(
        api_key="sk-ant-test", base_url=str(server.make_url("")), max_retries=0
    ) as client:
        stream = await client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True
        )

        async def consume() -> None:
            async for event in stream:
                seen.append(event.type)

        with pytest.raises(anthropic.APIStatusError) as info:
            await consume()
    assert seen == ["message_start"]
    assert info.value.type == "overloaded_error"
    assert info.value.api_message == "upstream overloaded"
