"""One upstream attempt, as data: it never writes to the client.

`Upstream.attempt` sends the request built afresh for one deployment and key and returns a
`Reply` (a whole non-stream answer), an `OpenStream` (the headers and the held first event of
a stream, its upstream response still open: the relay owns it from there), or a `Failure`
(a verdict the planner understands, and what the caller gets if no attempt follows). Every
aiohttp client error is mapped to a `Failure` by one table (`_failing`), used as a `with`
block at every place the upstream is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import aiohttp

from gateway.config.runtime import Deployment, Runtime
from gateway.edge import Request
from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.keypool import KeyLease
from gateway.providers import WIRE_APIS
from gateway.providers.base import StreamFacts, StreamObserver, Usage
from gateway.render import ErrorAnswer, Passthrough
from gateway.report import Report
from gateway.retry import (
    KEY_FAULT_STATUSES,
    KeyAction,
    Verdict,
    classify_status,
    classify_stream_error,
)
from gateway.sse import SSEDecoder, SSEError
from gateway.telemetry import Telemetry

# Upstream response headers passed on to the caller. Rate-limit headers of the upstream key are
# deliberately not among them: they describe the gateway's quota, not the caller's. The request
# id is set separately (the upstream's, else the gateway's own).
_PASS_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
# Hold a stream's response until its first event is whole: until then a failure (nothing sent,
# an error as the first event) is still retryable. Bounded: one event, 64 KiB.
PEEK_LIMIT = 64 * 1024
_DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}
# How a retryable first-event error is told to the client when no attempt is left.
_FIRST_EVENT_KINDS = {
    "first_event_overloaded": (Kind.OVERLOADED, 529),
    "first_event_rate_limited": (Kind.RATE_LIMITED, 429),
}


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt: its verdict, and what the caller gets if no attempt follows."""

    verdict: Verdict
    answer: ErrorAnswer


@dataclass(slots=True)
class Reply:
    """A whole non-stream answer (status < 300), its body scrubbed of upstream secrets."""

    status: int
    headers: dict[str, str]
    body: bytes
    usage: Usage | None


@dataclass(slots=True)
class OpenStream:
    """A stream whose first event has arrived (held, scrubbed, not yet sent). `response` is
    open: whoever takes this closes it (the relay, at the stream's end)."""

    response: aiohttp.ClientResponse
    status: int
    headers: dict[str, str]
    held: bytes
    decoder: SSEDecoder
    observer: StreamObserver
    provider: str  # the provider's name (for the gateway's own messages about it)

    @property
    def facts(self) -> StreamFacts:
        return self.observer.facts


Result = Reply | OpenStream | Failure


class ConnectTiming:
    """Filled by the HTTP client's trace hooks when an attempt opens a new connection."""

    __slots__ = ("end", "start")

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start if self.start is not None and self.end is not None else 0.0


class _Failed(Exception):
    """Raised inside an attempt to end it with `failure` (caught by `Upstream.attempt`)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


# (what failed, the stage it failed in) -> (status, kind, reason, message about `provider`).
# Stages: send (connect .. response headers), body (a non-stream body), peek (a stream's
# first event). A timeout is looked up by the stage alone.
_CLIENT_ERRORS: dict[tuple[str, str], tuple[int, Kind, str, str]] = {
    ("connect_timeout", "send"): (
        504, Kind.UPSTREAM_TIMEOUT, "connect_timeout",
        "Timed out connecting to the upstream provider '{provider}'.",
    ),
    ("timeout", "send"): (
        504, Kind.UPSTREAM_TIMEOUT, "first_byte_timeout",
        "The upstream provider '{provider}' sent no response within {limit:g} s.",
    ),
    ("connector", "send"): (
        502, Kind.UPSTREAM_UNAVAILABLE, "connect_error",
        "Could not connect to the upstream provider '{provider}'.",
    ),
    ("client", "send"): (
        502, Kind.UPSTREAM_ERROR, "upstream_reset",
        "The connection to the upstream provider '{provider}' failed before a response.",
    ),
    ("timeout", "body"): (
        504, Kind.UPSTREAM_TIMEOUT, "total_timeout",
        "The upstream provider '{provider}' did not finish within the time limit.",
    ),
    ("client", "body"): (
        502, Kind.UPSTREAM_ERROR, "payload_error",
        "The upstream provider '{provider}' broke the connection mid-response.",
    ),
    ("timeout", "peek"): (
        504, Kind.UPSTREAM_TIMEOUT, "first_byte_timeout",
        "The upstream provider '{provider}' sent no data within {limit:g} s.",
    ),
    ("client", "peek"): (
        502, Kind.UPSTREAM_ERROR, "payload_error",
        "The upstream provider '{provider}' broke the stream before its first event.",
    ),
}  # fmt: skip
# Only a timeout of the whole response (a non-stream body) is not worth another attempt.
_FINAL_REASONS = frozenset({"total_timeout", "response_too_large"})


def _fail(status: int, kind: Kind, reason: str, message: str, *, retryable: bool = True) -> Failure:
    """A failure the gateway itself describes (connect error, timeout, broken body)."""
    error = UpstreamFailure(status, kind, message, reason=reason)
    return Failure(Verdict(retryable, reason), error)


# Outside `send`, a connect-phase error class means what its family does.
_FALLBACK = {"connect_timeout": "timeout", "connector": "client"}


def _raise(what: str, stage: str, provider: str, limit: float) -> NoReturn:
    entry = _CLIENT_ERRORS.get((what, stage)) or _CLIENT_ERRORS[(_FALLBACK[what], stage)]
    status, kind, reason, template = entry
    message = template.format(provider=provider, limit=limit)
    raise _Failed(_fail(status, kind, reason, message, retryable=reason not in _FINAL_REASONS))


@contextlib.contextmanager
def _failing(stage: str, provider: str, limit: float = 0.0) -> Iterator[None]:
    """Map what the HTTP client raises while reading the upstream in `stage` to a Failure.
    A timeout here is the attempt's own deadline (its `asyncio.timeout_at`)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError:
        _raise("connect_timeout", stage, provider, limit)
    except TimeoutError:
        _raise("timeout", stage, provider, limit)
    except aiohttp.ClientConnectorError:
        _raise("connector", stage, provider, limit)
    except (aiohttp.ClientError, OSError):
        _raise("client", stage, provider, limit)


def scrub(body: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """`body` with every upstream secret replaced by `[redacted]` (providers echo keys)."""
    for secret in secrets:
        if secret in body:
            body = body.replace(secret, b"[redacted]")
    return body


def _encoding(response: aiohttp.ClientResponse) -> str | None:
    """The upstream's content-encoding, None for identity (or none)."""
    value = response.headers.get("content-encoding", "").strip().lower()
    return None if value in ("", "identity") else value


def _decode(body: bytes, encoding: str, limit: int) -> bytes | None:
    """`body` inflated (gzip or deflate, zlib-wrapped or raw), at most `limit` bytes of it;
    None when it cannot be decoded or inflates past the limit (a decompression bomb)."""
    wbits = _DECODABLE.get(encoding)
    if wbits is None:
        return None
    for bits in [wbits] if wbits else [zlib.MAX_WBITS, -zlib.MAX_WBITS]:
        inflater = zlib.decompressobj(bits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            return None
        return out
    return None


def _pass_headers(response: aiohttp.ClientResponse, default_type: str) -> dict[str, str]:
    out = {name: response.headers[name] for name in _PASS_HEADERS if name in response.headers}
    out["content-type"] = response.headers.get("content-type", default_type)
    return out


class Upstream:
    """Attempts of one request against its runtime's providers."""

    def __init__(self, session: aiohttp.ClientSession, tel: Telemetry, runtime: Runtime) -> None:
        self.session = session
        self.tel = tel
        self.runtime = runtime

    async def attempt(
        self, req: Request, deployment: Deployment, lease: KeyLease, report: Report
    ) -> Result:
        """Send one attempt and read it as far as it can go without the client: the whole
        body of a non-stream answer, the first event of a stream. Never raises for upstream
        failures (they are the Failure); the caller's cancellation propagates."""
        loop = asyncio.get_running_loop()
        timeouts = req.route.timeouts
        deadline = report.started_loop + timeouts.total_s
        # A non-stream answer arrives only once the whole generation is done, so its wait for
        # the first byte is bounded by total_s, not first_byte_s.
        first_byte_s = timeouts.first_byte_s if req.parsed.stream else timeouts.total_s
        first_byte_at = min(loop.time() + first_byte_s, deadline)
        provider = deployment.provider.name
        try:
            response = await self._send(req, deployment, lease, report, first_byte_at)
        except _Failed as failed:
            return failed.failure
        keep_open = False
        try:
            result = await self._read(req, response, report, (first_byte_at, deadline), provider)
            keep_open = isinstance(result, OpenStream)
            return result
        except _Failed as failed:
            return failed.failure
        finally:
            if not keep_open:
                response.close()

    async def _send(
        self,
        req: Request,
        deployment: Deployment,
        lease: KeyLease,
        report: Report,
        first_byte_at: float,
    ) -> aiohttp.ClientResponse:
        route = req.route
        built = WIRE_APIS[req.endpoint.family].build_request(
            req.parsed,
            deployment.provider,
            deployment.model,
            route.max_tokens_cap,
            lease.key.secret,
        )
        headers = built.headers
        # Connect timing (the TTFT split) is for spans only: without tracing the HTTP client
        # runs no trace hooks at all.
        connect = ConnectTiming() if self.tel.enabled else None
        if connect is not None:
            headers = dict(headers)
            self.tel.inject(report.attempt_span, headers)
        timeouts = route.timeouts
        limit = timeouts.first_byte_s if req.parsed.stream else timeouts.total_s
        url = deployment.provider.urls.get(req.endpoint.path) or built.url
        with _failing("send", deployment.provider.name, limit):
            async with asyncio.timeout_at(first_byte_at):
                response = await self.session.post(
                    url,
                    data=built.body,
                    headers=headers,
                    trace_request_ctx=connect,
                    allow_redirects=False,
                    timeout=route.client_timeout,
                )
        upstream_id = response.headers.get(WIRE_APIS[req.endpoint.family].request_id_header)
        report.upstream_answered(response.status, upstream_id[:128] if upstream_id else None)
        if connect is not None:
            report.timings.connect_s = connect.seconds
        report.attempt_span.add_event(
            "gen_ai.response_headers", {"http.status_code": response.status}
        )
        return response

    async def _read(
        self,
        req: Request,
        response: aiohttp.ClientResponse,
        report: Report,
        deadlines: tuple[float, float],
        provider: str,
    ) -> Result:
        status = response.status
        if not 200 <= status <= 599:
            # 1xx as a final answer (a 101 would hang the client), or no HTTP status.
            return _fail(
                502,
                Kind.UPSTREAM_ERROR,
                "upstream_bad_status",
                f"The upstream provider '{provider}' answered with HTTP status {status}, "
                "which is not a valid final status.",
            )
        is_stream = response.headers.get("content-type", "").startswith("text/event-stream")
        if status < 300 and is_stream and req.endpoint.observer is not None:
            if _encoding(response) is not None:
                # Asked for identity; an encoded stream cannot be relayed byte for byte (nor
                # observed) without inflating it: refused.
                return _fail(
                    502,
                    Kind.UPSTREAM_ERROR,
                    "upstream_encoding",
                    f"The upstream provider '{provider}' sent a compressed stream although "
                    "the gateway asked for none.",
                )
            return await self._peek(req, response, report, deadlines[0], provider)
        return await self._buffered(req, response, report, deadlines[1], provider)

    async def _buffered(
        self,
        req: Request,
        response: aiohttp.ClientResponse,
        report: Report,
        deadline: float,
        provider: str,
    ) -> Reply | Failure:
        body = await self._read_body(response, deadline, provider)
        status = response.status
        # Every non-stream body is scrubbed, whatever its status: providers echo keys in
        # error messages, and a misbehaving one may anywhere.
        body = scrub(body, self.runtime.secrets)
        headers = _pass_headers(response, "application/json")
        if status < 300:
            # The whole answer is the "first byte" of a non-stream response.
            report.timings.first_upstream_byte = time.perf_counter()
            usage = WIRE_APIS[req.endpoint.family].usage_from_body(body)
            return Reply(status, headers, body, usage)
        verdict = classify_status(status, response.headers, body, time.time())
        if status in KEY_FAULT_STATUSES and verdict.key_action is KeyAction.DISABLE:
            return Failure(verdict, _credentials_error(provider, status))
        return Failure(verdict, Passthrough(status, headers, body))

    async def _read_body(
        self, response: aiohttp.ClientResponse, deadline: float, provider: str
    ) -> bytes:
        """The whole body, inflated if it came compressed, bounded by max_response_bytes."""
        limit = self.runtime.server.max_response_bytes
        buf = bytearray()
        with _failing("body", provider):
            async with asyncio.timeout_at(deadline):
                while chunk := await response.content.readany():
                    buf += chunk
                    if len(buf) > limit:
                        raise _Failed(_too_large(limit))
        body = bytes(buf)
        del buf
        encoding = _encoding(response)
        if encoding is None:
            return body
        decoded = _decode(body, encoding, limit)
        if decoded is None:
            raise _Failed(
                _fail(
                    502,
                    Kind.UPSTREAM_ERROR,
                    "upstream_encoding",
                    f"The upstream provider '{provider}' sent a compressed answer "
                    f"({encoding[:32]}) that the gateway cannot decode within its limits.",
                )
            )
        return decoded

    async def _peek(
        self,
        req: Request,
        response: aiohttp.ClientResponse,
        report: Report,
        first_byte_at: float,
        provider: str,
    ) -> OpenStream | Failure:
        assert req.endpoint.observer is not None
        observer = req.endpoint.observer()
        decoder = SSEDecoder()
        held = bytearray()
        limit = req.route.timeouts.first_byte_s
        first_error = False
        try:
            with _failing("peek", provider, limit):
                async with asyncio.timeout_at(first_byte_at):
                    first_error = await _read_first_event(response, decoder, observer, held, report)
        except _Failed as failed:
            # Part of an event came before the deadline: it is relayed (and the relay's own
            # clocks take over). A break, or nothing at all by the deadline, is a failure.
            if failed.failure.verdict.reason != "first_byte_timeout" or not held:
                raise
        if not held:
            return _fail(
                502,
                Kind.UPSTREAM_ERROR,
                "empty_stream",
                f"The upstream provider '{provider}' ended the stream without sending anything.",
            )
        if first_error:
            failure = self._first_event_failure(observer.facts, provider)
            if failure is not None:
                return failure
        headers = _pass_headers(response, "text/event-stream")
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        # The held first event is scrubbed like any non-stream body (an error event may echo
        # the key); what follows is relayed byte for byte.
        first = scrub(bytes(held), self.runtime.secrets)
        return OpenStream(response, response.status, headers, first, decoder, observer, provider)

    def _first_event_failure(self, facts: StreamFacts, provider: str) -> Failure | None:
        """A retryable error as the stream's first event; None when the request itself is bad
        (the client then gets the upstream's own error stream)."""
        verdict = classify_stream_error(facts.error_type)
        if not verdict.retryable:
            return None
        kind, status = _FIRST_EVENT_KINDS.get(verdict.reason, (Kind.UPSTREAM_ERROR, 502))
        text = facts.error_message or facts.error_type or "error"
        message = scrub(text.encode(), self.runtime.secrets).decode(errors="replace")
        error = UpstreamFailure(
            status,
            kind,
            f"The upstream provider '{provider}' failed: {message}",
            reason=verdict.reason,
        )
        return Failure(verdict, error)


async def _read_first_event(
    response: aiohttp.ClientResponse,
    decoder: SSEDecoder,
    observer: StreamObserver,
    held: bytearray,
    report: Report,
) -> bool:
    """Read until the first event is whole (or PEEK_LIMIT bytes, or the body ends), feeding
    the decoder and the observer; whether that first event is an error. Bytes that are not
    SSE are held and relayed unobserved."""
    facts = observer.facts
    content = response.content
    first_error = False
    while facts.events == 0 and len(held) < PEEK_LIMIT:
        chunk = await content.readany()
        if not chunk:
            break
        now = time.perf_counter()
        if not held:
            report.timings.first_upstream_byte = now
            report.attempt_span.add_event("gen_ai.first_byte")
        held += chunk
        try:
            events = decoder.feed(chunk)
        except SSEError:
            break  # not decodable as SSE: relayed as it is, observing nothing
        for event in events:
            observer.on_event(event, now)
            facts.last_event_at = now
            if facts.events == 1:
                first_error = facts.error_type is not None
    return first_error


def _too_large(limit: int) -> Failure:
    return _fail(
        502,
        Kind.UPSTREAM_ERROR,
        "response_too_large",
        f"The upstream response is larger than {limit} bytes.",
        retryable=False,
    )


def _credentials_error(provider: str, status: int) -> GatewayError:
    return UpstreamFailure(
        502,
        Kind.UPSTREAM_CREDENTIALS,
        f"The upstream provider '{provider}' rejected the gateway's credentials "
        f"(HTTP {status}); the operator has to fix the key.",
        reason="upstream_credentials",
    )
