"""The request flow: authenticate -> parse once -> route -> lease a key -> send -> relay -> settle.

Before the client response is prepared, every failure is an ordinary HTTP error in the caller's
API format. After `prepare()` (a stream has started) a failure can only travel in-band, as one
final error event (see relay.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.appkeys import HTTP_CLIENT, OUTCOME_SINKS, RUNTIME
from gateway.auth import authenticate
from gateway.config.runtime import Caller, Deployment, Route, Runtime
from gateway.errors import (
    ApiFamily,
    GatewayError,
    Kind,
    UpstreamFailure,
    error_body,
    stream_error_event,
)
from gateway.keypool import KeyLease
from gateway.logs import get_logger
from gateway.providers import build_upstream_request
from gateway.providers.base import Endpoint, ParsedRequest, StreamFacts
from gateway.relay import StreamEnd, relay_stream
from gateway.sse import SSEDecoder

_log = get_logger("gateway.access")

# Upstream response headers passed on to the caller. Rate-limit headers of the upstream key are
# deliberately not among them: they describe the gateway's quota, not the caller's.
_PASS_HEADERS = ("x-request-id", "request-id", "retry-after", "retry-after-ms", "x-should-retry")
_MAX_MODEL_CHARS = 256
# Upstream statuses that mean "the gateway's key is bad", never the caller's fault: the caller
# must not see a 401/403 (its SDK would blame the caller's own key).
_KEY_FAULTS = frozenset({401, 402, 403})


@dataclass(slots=True)
class Outcome:
    """What the access log and (later) telemetry report about one request."""

    started: float
    caller: str | None = None
    model: str | None = None
    deployment: str | None = None
    key_id: str | None = None
    key_fp: str | None = None
    status: int | None = None
    outcome: str = "ok"
    stream: bool = False
    upstream_status: int | None = None
    ttfb_ms: float | None = None
    bytes_out: int = 0
    facts: StreamFacts | None = field(default=None)


def family_for_path(path: str, headers: Any) -> ApiFamily:
    """The error format for a request the router could not place (unknown path, bad method)."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return ApiFamily.ANTHROPIC
    return ApiFamily.OPENAI


def gateway_error_response(family: ApiFamily, err: GatewayError) -> web.Response:
    headers = dict(err.headers)
    return web.Response(
        status=err.status,
        body=error_body(family, err.kind, err.message, param=err.param),
        content_type="application/json",
        headers=headers,
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, bounded by `limit` (413 beyond it, before reading it all)."""
    too_large = GatewayError(
        413,
        Kind.TOO_LARGE,
        f"Request body is larger than this gateway's limit of {limit} bytes.",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    buf = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise too_large


def parse_request(endpoint: Endpoint, raw: bytes, headers: Any) -> ParsedRequest:
    """Parse and check the JSON body once. Raises GatewayError 400 with a precise message."""
    if not raw:
        raise GatewayError(400, Kind.INVALID_REQUEST, "Request body is empty; expected JSON.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"Request body is not valid JSON: {str(exc).splitlines()[0][:200]}",
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, Kind.INVALID_REQUEST, "Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(
            400, Kind.INVALID_REQUEST, "'model' is required and must be a string.", param="model"
        )
    if len(model) > _MAX_MODEL_CHARS:
        raise GatewayError(400, Kind.INVALID_REQUEST, "'model' is too long.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise GatewayError(400, Kind.INVALID_REQUEST, "'stream' must be a boolean.", param="stream")
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream and endpoint.streams,
        headers=headers,
    )


def resolve_route(runtime: Runtime, caller: Caller, parsed: ParsedRequest) -> Route:
    route = runtime.routes.get(parsed.model)
    if route is None:
        raise GatewayError(
            404,
            Kind.NOT_FOUND,
            f"The model '{parsed.model}' does not exist or you do not have access to it.",
            param="model",
        )
    if not caller.may_use(parsed.model):
        raise GatewayError(
            403,
            Kind.PERMISSION,
            f"This API key is not allowed to use the model '{parsed.model}'.",
            param="model",
        )
    family = parsed.endpoint.family
    if route.family is not family:
        where = "/v1/messages" if route.family is ApiFamily.ANTHROPIC else "/v1/chat/completions"
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"The model '{parsed.model}' is served through the {route.family.value} API "
            f"({where}), not {parsed.endpoint.path}.",
            param="model",
        )
    return route


def _scrub(body: bytes, secrets: tuple[bytes, ...]) -> bytes:
    # Providers echo (parts of) a rejected key in error messages; the caller must never see it.
    for secret in secrets:
        if secret in body:
            body = body.replace(secret, b"[redacted]")
    return body


def _pass_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    out = {}
    for name in _PASS_HEADERS:
        value = upstream.headers.get(name)
        if value is not None:
            out[name] = value
    return out


class Handler:
    """The aiohttp handler of one endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def handle(self, request: web.Request) -> web.StreamResponse:
        runtime = request.app[RUNTIME].current
        loop = asyncio.get_running_loop()
        outcome = Outcome(started=loop.time())
        family = self.endpoint.family
        try:
            caller = authenticate(request.headers, runtime)
            outcome.caller = caller.id
            raw = await read_body(request, runtime.server.max_request_bytes)
            parsed = parse_request(self.endpoint, raw, request.headers)
            outcome.model = parsed.model
            outcome.stream = parsed.stream
            route = resolve_route(runtime, caller, parsed)
            return await self._forward(request, runtime, parsed, route, outcome)
        except GatewayError as err:
            outcome.status = err.status
            outcome.outcome = (
                err.reason if isinstance(err, UpstreamFailure) else err.kind.name.lower()
            )
            return gateway_error_response(family, err)
        except asyncio.CancelledError:
            outcome.outcome = "client_cancel"
            raise
        finally:
            now = loop.time()
            for sink in request.app[OUTCOME_SINKS]:
                sink(outcome, now)

    async def _forward(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        outcome: Outcome,
    ) -> web.StreamResponse:
        deployment = route.deployments[0]
        lease = deployment.pool.acquire()
        if lease is None:
            raise GatewayError(
                503,
                Kind.UPSTREAM_UNAVAILABLE,
                f"No upstream key is available for the model '{route.name}' right now.",
                headers={"retry-after": "1"},
            )
        outcome.deployment = f"{deployment.provider.name}/{deployment.model}"
        outcome.key_id = lease.key.id
        outcome.key_fp = lease.key.fingerprint
        try:
            return await self._attempt(request, runtime, parsed, route, deployment, lease, outcome)
        finally:
            lease.release()

    async def _attempt(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        deployment: Deployment,
        lease: KeyLease,
        outcome: Outcome,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        timeouts = route.timeouts
        deadline = outcome.started + timeouts.total_s
        # A non-stream answer arrives only once the whole generation is done, so its wait for
        # the first byte is bounded by total_s, not first_byte_s.
        first_byte_s = timeouts.first_byte_s if parsed.stream else timeouts.total_s
        first_byte_deadline = min(loop.time() + first_byte_s, deadline)
        ureq = build_upstream_request(
            parsed, deployment.provider, deployment.model, route.max_tokens_cap, lease.key.secret
        )
        session = request.app[HTTP_CLIENT]
        provider = deployment.provider.name
        try:
            async with asyncio.timeout_at(first_byte_deadline):
                upstream = await session.post(
                    ureq.url,
                    data=ureq.body,
                    headers=ureq.headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s
                    ),
                )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamFailure(
                504,
                Kind.UPSTREAM_TIMEOUT,
                f"Timed out connecting to the upstream provider '{provider}'.",
                reason="connect_timeout",
            ) from None
        except TimeoutError:
            raise UpstreamFailure(
                504,
                Kind.UPSTREAM_TIMEOUT,
                f"The upstream provider '{provider}' sent no response within {first_byte_s:g} s.",
                reason="first_byte_timeout",
            ) from None
        except aiohttp.ClientConnectorError:
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_UNAVAILABLE,
                f"Could not connect to the upstream provider '{provider}'.",
                reason="connect_error",
            ) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_ERROR,
                f"The connection to the upstream provider '{provider}' failed before a response.",
                reason="upstream_error",
            ) from None
        outcome.upstream_status = upstream.status
        try:
            content_type = upstream.headers.get("content-type", "")
            if upstream.status < 300 and content_type.startswith("text/event-stream"):
                return await self._stream(
                    request, parsed, upstream, outcome, first_byte_deadline, deadline, route
                )
            return await self._buffered(runtime, parsed, upstream, outcome, deadline, provider)
        finally:
            upstream.close()

    async def _buffered(
        self,
        runtime: Runtime,
        parsed: ParsedRequest,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        deadline: float,
        provider: str,
    ) -> web.Response:
        limit = runtime.server.max_response_bytes
        buf = bytearray()
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    chunk = await upstream.content.readany()
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > limit:
                        raise UpstreamFailure(
                            502,
                            Kind.UPSTREAM_ERROR,
                            f"The upstream response is larger than {limit} bytes.",
                            reason="response_too_large",
                        )
        except TimeoutError:
            raise UpstreamFailure(
                504,
                Kind.UPSTREAM_TIMEOUT,
                f"The upstream provider '{provider}' did not finish within the time limit.",
                reason="total_timeout",
            ) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_ERROR,
                f"The upstream provider '{provider}' broke the connection mid-response.",
                reason="payload_error",
            ) from None
        status = upstream.status
        if status in _KEY_FAULTS:
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_CREDENTIALS,
                f"The upstream provider '{provider}' rejected the gateway's credentials "
                f"(HTTP {status}); the operator has to fix the key.",
                reason="upstream_credentials",
            )
        body = bytes(buf)
        if status >= 400:
            body = _scrub(body, runtime.secrets)
            outcome.outcome = "upstream_error"
        outcome.status = status
        outcome.bytes_out = len(body)
        headers = _pass_headers(upstream)
        return web.Response(
            status=status,
            body=body,
            headers={
                **headers,
                "content-type": upstream.headers.get("content-type", "application/json"),
            },
        )

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        first_byte_deadline: float,
        deadline: float,
        route: Route,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        provider = route.deployments[0].provider.name
        # Hold the response until the first body bytes arrived: until then a failure is still a
        # plain HTTP error the client's SDK understands.
        try:
            async with asyncio.timeout_at(first_byte_deadline):
                first = await upstream.content.readany()
        except TimeoutError:
            raise UpstreamFailure(
                504,
                Kind.UPSTREAM_TIMEOUT,
                f"The upstream provider '{provider}' sent no data within "
                f"{route.timeouts.first_byte_s:g} s.",
                reason="first_byte_timeout",
            ) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_ERROR,
                f"The upstream provider '{provider}' broke the stream before its first byte.",
                reason="payload_error",
            ) from None
        if not first:
            raise UpstreamFailure(
                502,
                Kind.UPSTREAM_ERROR,
                f"The upstream provider '{provider}' ended the stream without sending anything.",
                reason="empty_stream",
            )
        outcome.ttfb_ms = (loop.time() - outcome.started) * 1000
        headers = _pass_headers(upstream)
        headers["Content-Type"] = upstream.headers.get("content-type", "text/event-stream")
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        assert endpoint.observer is not None
        observer = endpoint.observer()
        outcome.facts = observer.facts
        outcome.status = upstream.status
        await response.prepare(request)

        def error_event(end: StreamEnd) -> bytes:
            messages = {
                StreamEnd.CHUNK_TIMEOUT: (
                    Kind.UPSTREAM_TIMEOUT,
                    f"The upstream provider '{provider}' went silent for more than "
                    f"{route.timeouts.chunk_s:g} s; the gateway ended the stream.",
                ),
                StreamEnd.TOTAL_TIMEOUT: (
                    Kind.UPSTREAM_TIMEOUT,
                    f"The request exceeded the gateway's limit of {route.timeouts.total_s:g} s.",
                ),
            }
            kind, message = messages.get(
                end,
                (
                    Kind.UPSTREAM_ERROR,
                    f"The upstream provider '{provider}' ended the stream before it was complete.",
                ),
            )
            return stream_error_event(
                endpoint.family, kind, message, responses=endpoint.is_responses
            )

        result = await relay_stream(
            request,
            upstream,
            response,
            first,
            SSEDecoder(),
            observer,
            chunk_s=route.timeouts.chunk_s,
            deadline=deadline,
            error_event=error_event,
        )
        outcome.outcome = result.end.value
        outcome.bytes_out = result.bytes_out
        if not result.aborted and result.end is not StreamEnd.CLIENT_CANCEL:
            try:
                await response.write_eof()
            except ConnectionResetError:
                outcome.outcome = StreamEnd.CLIENT_CANCEL.value
        return response


def access_log(o: Outcome, now: float) -> None:
    """The outcome sink that writes one JSON access line per request."""
    fields: dict[str, Any] = {
        "caller": o.caller,
        "model": o.model,
        "deployment": o.deployment,
        "key_id": o.key_id,
        "key_fp": o.key_fp,
        "status": o.status,
        "outcome": o.outcome,
        "stream": o.stream,
        "upstream_status": o.upstream_status,
        "duration_ms": round((now - o.started) * 1000, 3),
    }
    if o.ttfb_ms is not None:
        fields["ttfb_ms"] = round(o.ttfb_ms, 3)
    facts = o.facts
    if facts is not None:
        fields["events"] = facts.events
        fields["bytes_out"] = o.bytes_out
        if facts.first_token_at is not None:
            fields["ttft_ms"] = round((facts.first_token_at - o.started) * 1000, 3)
        fields["finish_reason"] = facts.finish_reason
        if facts.usage is not None:
            fields["input_tokens"] = facts.usage.input_tokens
            fields["output_tokens"] = facts.usage.output_tokens
        if facts.error_type is not None:
            fields["upstream_error_type"] = facts.error_type
    _log.info("request", **fields)


__all__ = [
    "Handler",
    "Outcome",
    "access_log",
    "family_for_path",
    "gateway_error_response",
    "parse_request",
    "read_body",
    "resolve_route",
]
