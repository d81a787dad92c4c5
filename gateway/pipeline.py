"""The request flow: authenticate -> parse once -> route -> lease a key -> send -> relay -> settle.

Before the client response is prepared, every failure is an ordinary HTTP error in the caller's
API format. After `prepare()` (a stream has started) a failure can only travel in-band, as one
final error event (see relay.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from gateway.admission import (
    UsageStripper,
    estimate_tokens,
    rate_limited,
    ratelimit_headers,
    used_tokens,
    wants_injected_usage,
)
from gateway.appkeys import (
    BODY_BUDGET,
    HTTP_CLIENT,
    JWT,
    LIMITER,
    OUTCOME_SINKS,
    RANDOM,
    RUNTIME,
    TELEMETRY,
)
from gateway.auth import authenticate
from gateway.config.runtime import Caller, Deployment, Route, Runtime
from gateway.edge import BodyLimits, parse_request, read_body
from gateway.errors import (
    ApiFamily,
    GatewayError,
    Kind,
    UpstreamFailure,
    error_body,
    stream_error_event,
)
from gateway.keypool import HealthChange, KeyLease
from gateway.limits.base import Decision, Limiter, LimiterUnavailable, LimitSpec
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.providers import anthropic as anthropic_api
from gateway.providers import build_upstream_request
from gateway.providers import openai as openai_api
from gateway.providers.base import (
    Endpoint,
    ParsedRequest,
    StreamFacts,
    StreamObserver,
    Usage,
    as_int,
)
from gateway.providers.openai import next_sequence_number
from gateway.relay import StreamEnd, relay_stream
from gateway.retry import (
    KEY_FAULT_STATUSES,
    KeyAction,
    Verdict,
    backoff_s,
    classify_status,
    classify_stream_error,
)
from gateway.serving import close_after_response
from gateway.sse import SSEDecoder, SSEError
from gateway.telemetry import Timings, attrs, ids, set_error

_log = get_logger("gateway.access")

# Upstream response headers passed on to the caller. Rate-limit headers of the upstream key are
# deliberately not among them: they describe the gateway's quota, not the caller's. The request
# id is set separately (the upstream's, else the gateway's own).
_PASS_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
# The request-id header each API's SDK reads.
REQUEST_ID_HEADER = {ApiFamily.OPENAI: "x-request-id", ApiFamily.ANTHROPIC: "request-id"}
# The request's id on the aiohttp request (set by the middleware).
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass(slots=True)
class Outcome:
    """What the access log and (later) telemetry report about one request."""

    started: float  # perf_counter: every figure a user reads is measured on this clock
    started_loop: float = 0.0  # the loop clock at the same moment: deadlines and timers
    request_id: str = ""  # the gateway's own id of this request
    upstream_request_id: str | None = None  # the id the upstream gave its answer
    caller: str | None = None
    model: str | None = None
    model_label: str = "unknown"  # the configured model name, for metric labels
    deployment: str | None = None
    key_id: str | None = None
    key_fp: str | None = None
    status: int | None = None
    outcome: str = "ok"
    stream: bool = False
    upstream_status: int | None = None
    bytes_out: int = 0
    attempts: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    limiter: str | None = None  # ok | degraded | denied_<limit>; None = no limits
    usage: Usage | None = None  # of a non-stream answer (streams: facts.usage)
    reconciled: int | None = None  # tokens charged (+) or refunded (-) after the fact
    estimate: int = 0  # the request's token estimate (reservations)
    # Provider budgets charged for this request: (subject, spec, reserved tokens).
    provider_charges: list[tuple[str, LimitSpec, int]] = field(default_factory=list)
    extra_headers: dict[str, str] = field(default_factory=dict)
    operation: str = ""
    api: str = ""  # gen_ai.provider.name of the wire API (openai | anthropic)
    span: Span = field(default=INVALID_SPAN)
    attempt_span: Span = field(default=INVALID_SPAN)
    trace_id: str | None = None
    span_id: str | None = None
    timings: Timings = field(default_factory=Timings)
    overhead_ms: float | None = None
    facts: StreamFacts | None = field(default=None)


def family_for_path(path: str, headers: Any) -> ApiFamily:
    """The error format for a request the router could not place (unknown path, bad method)."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return ApiFamily.ANTHROPIC
    return ApiFamily.OPENAI


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def gateway_error_response(
    family: ApiFamily, err: GatewayError, request_id: str | None = None
) -> web.Response:
    """The gateway's own error answer in `family`'s format, carrying the request id in the
    header its SDK reads (and, for Anthropic, in the body as the API does)."""
    headers = dict(err.headers)
    if request_id is not None:
        headers[REQUEST_ID_HEADER[family]] = request_id
    response = web.Response(
        status=err.status,
        body=error_body(family, err.kind, err.message, param=err.param, request_id=request_id),
        content_type="application/json",
        headers=headers,
    )
    if err.close:
        response.force_close()
    return response


def body_limits(runtime: Runtime) -> BodyLimits:
    server = runtime.server
    return BodyLimits(
        max_bytes=server.max_request_bytes,
        timeout_s=server.body_timeout_s,
        max_containers=server.max_json_containers,
        max_depth=server.max_json_depth,
        in_flight_bytes=server.max_body_bytes_in_flight,
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


_DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}


def _encoding(upstream: aiohttp.ClientResponse) -> str | None:
    """The upstream's content-encoding, None for identity (or none)."""
    value = upstream.headers.get("content-encoding", "").strip().lower()
    return None if value in ("", "identity") else value


def _decode(body: bytes, encoding: str, limit: int) -> bytes | None:
    """`body` inflated (gzip or deflate, zlib-wrapped or raw), at most `limit` bytes of it;
    None when it cannot be decoded or inflates past the limit (a decompression bomb)."""
    wbits = _DECODABLE.get(encoding)
    if wbits is None:
        return None
    candidates = [wbits] if wbits else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for bits in candidates:
        inflater = zlib.decompressobj(bits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            return None
        return out
    return None


def _pass_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    out = {}
    for name in _PASS_HEADERS:
        value = upstream.headers.get(name)
        if value is not None:
            out[name] = value
    return out


@dataclass(slots=True)
class _Failure:
    """A failed attempt: its verdict, and what the client gets if no attempt follows."""

    verdict: Verdict
    final: Callable[[str], web.Response]  # called with the request id


def _credentials_error(provider: str, status: int) -> GatewayError:
    return UpstreamFailure(
        502,
        Kind.UPSTREAM_CREDENTIALS,
        f"The upstream provider '{provider}' rejected the gateway's credentials "
        f"(HTTP {status}); the operator has to fix the key.",
        reason="upstream_credentials",
    )


class Handler:
    """The aiohttp handler of one endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def handle(self, request: web.Request) -> web.StreamResponse:
        runtime = request.app[RUNTIME].current
        tel = request.app[TELEMETRY]
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        outcome = Outcome(
            started=time.perf_counter(),
            started_loop=loop.time(),
            operation=endpoint.operation,
            api=endpoint.family.value,
            request_id=request.get(REQUEST_ID) or new_request_id(),
        )
        family = endpoint.family
        span = tel.server_span(f"{request.method} {endpoint.path}", request.headers)
        outcome.span = span
        outcome.trace_id, outcome.span_id = ids(span)
        # Log lines written while handling this request carry its trace ids.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            auth_span = tel.child(span, "gateway.auth")
            try:
                caller = await authenticate(request.headers, runtime, request.app[JWT].current)
            except GatewayError as err:
                set_error(auth_span, "authentication_failed", err.message)
                raise
            finally:
                auth_span.end()
            outcome.caller = caller.id
            limits = body_limits(runtime)
            body = await read_body(request, limits, request.app[BODY_BUDGET])
            try:
                # The bytes count against the shared budget until the parse is done; only
                # the parsed request lives on.
                raw = body.data
                parsed = parse_request(endpoint, raw, request.headers, limits)
                if tel.capture_content:
                    span.set_attribute(
                        "gen_ai.input.messages", raw[:65536].decode(errors="replace")
                    )
                size = len(raw)
                del raw
            finally:
                body.release()
                del body
            outcome.model = parsed.model
            outcome.stream = parsed.stream
            if span.is_recording():  # attribute dicts cost time even for a no-op tracer
                span.set_attributes(
                    attrs(
                        gen_ai__request__model=parsed.model,
                        gen_ai__operation__name=endpoint.operation,
                        gateway__caller=caller.id,
                        gateway__tier=caller.tier,
                    )
                )
            route = resolve_route(runtime, caller, parsed)
            outcome.model_label = route.name
            outcome.estimate = estimate_tokens(size, parsed, route)
            spec = caller.limits
            if spec is None:
                outcome.timings.admitted = time.perf_counter()
                return await self._forward(request, runtime, parsed, route, outcome)
            return await self._admitted(request, runtime, parsed, route, spec, outcome)
        except GatewayError as err:
            outcome.status = err.status
            outcome.outcome = (
                err.reason if isinstance(err, UpstreamFailure) else err.kind.name.lower()
            )
            response = gateway_error_response(family, err, outcome.request_id)
            if err.close:
                close_after_response(request)
            if outcome.attempts:
                response.headers["x-gateway-attempts"] = str(outcome.attempts)
            return response
        except asyncio.CancelledError:
            outcome.outcome = "client_cancel"
            span.add_event("gateway.client_cancel")
            raise
        except Exception:
            # A bug: the middleware answers 500 and logs it; the outcome must not say "ok".
            outcome.outcome = "internal"
            outcome.status = outcome.status if outcome.facts is not None else 500
            raise
        finally:
            now = time.perf_counter()
            _finish_server_span(span, outcome, now)
            for sink in request.app[OUTCOME_SINKS]:
                sink(outcome, now)
            otel_context.detach(token)

    async def _admitted(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        spec: LimitSpec,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """Forward under the caller's limits: admit (charge) first, then release the stream
        slot and reconcile the token reservation whatever happens."""
        limiter = request.app[LIMITER]
        tokens = outcome.estimate if spec.tokens_per_minute else 0
        if not parsed.stream and spec.concurrent_streams is not None:
            # The concurrency limit is on open streams; a plain request takes no slot.
            spec = dataclasses.replace(spec, concurrent_streams=None)
        tel = request.app[TELEMETRY]
        limits_span = tel.child(outcome.span, "gateway.limits")
        try:
            decision = await limiter.admit(
                outcome.caller or "", spec, tokens, route.timeouts.total_s + 60
            )
        except LimiterUnavailable:
            set_error(limits_span, "limiter_unavailable")
            limits_span.end()
            retry = max(1, math.ceil(runtime.config.state.retry_redis_after_s))
            raise GatewayError(
                503,
                Kind.LIMITER_UNAVAILABLE,
                "Rate limiting is unavailable (its shared store cannot be reached); "
                "the gateway is configured to refuse requests then.",
                headers={"retry-after": str(retry)},
            ) from None
        outcome.limiter = "degraded" if decision.degraded else "ok"
        backend = "fallback" if decision.degraded else limiter.name
        tel.metrics.limiter_decisions.labels(
            backend, "allowed" if decision.allowed else "denied", decision.denied_by or "none"
        ).inc()
        if limits_span.is_recording():
            limits_span.set_attributes(
                attrs(
                    gateway__limiter__backend=backend,
                    gateway__limiter__allowed=decision.allowed,
                    gateway__limiter__denied_by=decision.denied_by,
                    gateway__limiter__reserved_tokens=decision.reserved_tokens,
                )
            )
        limits_span.end()
        outcome.timings.admitted = time.perf_counter()
        if not decision.allowed:
            prefix = "degraded_" if decision.degraded else ""
            outcome.limiter = f"{prefix}denied_{decision.denied_by}"
            raise rate_limited(decision, spec)
        outcome.extra_headers.update(ratelimit_headers(decision))
        parsed.inject_usage = wants_injected_usage(parsed, spec)
        try:
            return await self._forward(request, runtime, parsed, route, outcome)
        finally:
            # Shielded: a client that went away must not leak its slot or its tokens.
            await asyncio.shield(self._settle(limiter, decision, spec, outcome))

    @staticmethod
    async def _settle(
        limiter: Limiter, decision: Decision, spec: LimitSpec, outcome: Outcome
    ) -> None:
        if decision.lease is not None:
            await limiter.release(decision.lease)
        if spec.tokens_per_minute is None or outcome.caller is None:
            return
        actual = _actual_tokens(outcome)
        if actual is None:
            # No usage (an error, or a stream that died): the reservation stands, unless
            # nothing reached the upstream at all.
            if outcome.upstream_status is None:
                await limiter.reconcile(outcome.caller, spec, -decision.reserved_tokens)
            return
        outcome.reconciled = actual - decision.reserved_tokens
        outcome.span.add_event(
            "gateway.reservation_reconciled",
            {"reserved_tokens": decision.reserved_tokens, "used_tokens": actual},
        )
        await limiter.reconcile(outcome.caller, spec, actual - decision.reserved_tokens)

    # -- the attempt loop -------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """Attempts (deployment + key), built afresh from the parsed original each time, until
        one commits a response or the budget (attempts, deadline) is spent."""
        try:
            return await self._attempts(request, runtime, parsed, route, outcome)
        finally:
            if outcome.provider_charges:
                await asyncio.shield(self._settle_providers(request.app[LIMITER], outcome))

    @staticmethod
    async def _settle_providers(limiter: Limiter, outcome: Outcome) -> None:
        """Reconcile provider budgets: the attempt that answered is charged its real usage;
        attempts that failed before generating anything get their token reservation back (their
        request still counts against requests per minute)."""
        actual = _actual_tokens(outcome)
        last = len(outcome.provider_charges) - 1
        for i, (subject, spec, reserved) in enumerate(outcome.provider_charges):
            if spec.tokens_per_minute is None:
                continue
            if i < last or (actual is None and outcome.upstream_status is None):
                await limiter.reconcile(subject, spec, -reserved)
            elif actual is not None:
                await limiter.reconcile(subject, spec, actual - reserved)

    async def _provider_admits(
        self, request: web.Request, deployment: Deployment, outcome: Outcome
    ) -> float | None:
        """Charge the deployment's provider budget, if it has one. None when admitted, else
        the seconds until it would be."""
        spec = deployment.provider.limits
        if spec is None:
            return None
        subject = f"provider:{deployment.provider.name}"
        tokens = outcome.estimate if spec.tokens_per_minute else 0
        try:
            decision = await request.app[LIMITER].admit(subject, spec, tokens, 60)
        except LimiterUnavailable:
            return None  # the callers' limits decide what happens when Redis is down
        if not decision.allowed:
            return max(decision.retry_after_s, 0.001)
        outcome.provider_charges.append((subject, spec, decision.reserved_tokens))
        return None

    async def _attempts(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        outcome: Outcome,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        policy = route.retry
        retry_deadline = outcome.started_loop + min(policy.deadline_s, route.timeouts.total_s)
        tried: list[set[str]] = [set() for _ in route.deployments]
        over_budget: dict[int, float] = {}  # deployment index -> seconds until its budget
        # Upstream models whose context window the prompt exceeds: never tried again.
        too_small: set[str] = set()
        rng = request.app[RANDOM]
        tel = request.app[TELEMETRY]
        last: _Failure | None = None
        backoff_due = False  # a failure not yet followed by its backoff
        last_provider = ""
        while outcome.attempts < policy.max_attempts:
            # A key fault rotates to the next key at once; anything else backs off.
            delay = 0.0
            if backoff_due and last is not None:
                backoff_due = False
                if last.verdict.key_action is not KeyAction.DISABLE and not last.verdict.immediate:
                    delay = backoff_s(
                        outcome.attempts, policy.base_delay_s, policy.max_delay_s, rng
                    )
                    if loop.time() + delay >= retry_deadline:
                        break
                # The next attempt is certain now: this failure is a retry.
                outcome.retry_reasons.append(last.verdict.reason)
                tel.metrics.retries.labels(last_provider, last.verdict.reason).inc()
                _log.info(
                    "upstream attempt failed",
                    attempt=outcome.attempts,
                    reason=last.verdict.reason,
                    deployment=outcome.deployment,
                    key_id=outcome.key_id,
                    key_fp=outcome.key_fp,
                    caller=outcome.caller,
                    backoff_ms=round(delay * 1000, 3),
                )
                outcome.span.add_event(
                    "gateway.retry",
                    {
                        "gateway.attempt": outcome.attempts + 1,
                        "gateway.retry.reason": last.verdict.reason,
                        "gateway.retry.backoff_ms": round(delay * 1000, 3),
                    },
                )
            if delay:
                await asyncio.sleep(delay)
            narrowed = last is not None and (last.verdict.other_key or last.verdict.other_model)
            choice = _choose(
                route,
                time.time(),
                tried,
                over_budget,
                skip_models=too_small,
                untried_only=last is not None and last.verdict.other_key,
            )
            if not isinstance(choice, tuple) and narrowed and last is not None:
                # Nothing left that could answer differently: the upstream's own answer.
                return self._final(last, outcome)
            if (
                not isinstance(choice, tuple)
                and over_budget
                and len(over_budget) == len(route.deployments)
            ):
                raise _over_budget_error(route, min(over_budget.values()))
            if not isinstance(choice, tuple):
                wait = None if choice is None else choice - time.time()
                if (
                    wait is not None
                    and wait <= policy.max_retry_after_s
                    and loop.time() + wait < retry_deadline
                ):
                    # Every key is cooling down (or the provider backing off) for a short
                    # while: waiting is better than failing.
                    await asyncio.sleep(max(wait, 0.0))
                    continue
                raise _no_key_error(route, wait)
            index, deployment, lease = choice
            wait_budget = await self._provider_admits(request, deployment, outcome)
            if wait_budget is not None:
                # Over the provider's own budget: not an attempt; fall back to the next one.
                lease.release()
                over_budget[index] = wait_budget
                continue
            tried[index].add(lease.key.id)
            outcome.attempts += 1
            outcome.deployment = f"{deployment.provider.name}/{deployment.model}"
            outcome.key_id = lease.key.id
            outcome.key_fp = lease.key.fingerprint
            attempt_span = tel.child(
                outcome.span, f"{self.endpoint.operation} {deployment.model}", SpanKind.CLIENT
            )
            if attempt_span.is_recording():
                attempt_span.set_attributes(
                    attrs(
                        gen_ai__operation__name=self.endpoint.operation,
                        gen_ai__provider__name=self.endpoint.family.value,
                        gen_ai__request__model=deployment.model,
                        gen_ai__request__stream=parsed.stream,
                        gen_ai__request__max_tokens=_max_tokens(parsed),
                        server__address=deployment.server_address,
                        server__port=deployment.server_port,
                        gateway__deployment=outcome.deployment,
                        gateway__key_id=lease.key.id,
                        gateway__key_fp=lease.key.fingerprint,
                        gateway__attempt=outcome.attempts,
                    )
                )
            outcome.attempt_span = attempt_span
            outcome.timings.attempt_started = time.perf_counter()
            result: web.StreamResponse | _Failure | None = None
            try:
                result = await self._attempt(
                    request, runtime, parsed, route, deployment, lease, outcome
                )
            finally:
                lease.release()
                _finish_attempt_span(attempt_span, outcome, result)
            if not isinstance(result, _Failure):
                deployment.pool.succeeded(lease.key, time.time())
                return result
            verdict = result.verdict
            last_provider = deployment.provider.name
            for change in deployment.pool.failed(lease.key, verdict, time.time()):
                _log_health(deployment.provider.name, change)
                outcome.span.add_event(
                    "gateway.provider_backoff"
                    if change.fingerprint is None
                    else f"gateway.key_{change.block.state}",
                    attrs(
                        gateway__key_id=change.subject if change.fingerprint else None,
                        gateway__key_fp=change.fingerprint,
                        gateway__provider=deployment.provider.name,
                        gateway__reason=change.block.reason,
                        gateway__seconds=round(max(0.0, change.block.until - time.time()), 3),
                    ),
                )
            if not verdict.retryable:
                return self._final(result, outcome)
            if verdict.other_model:
                too_small.add(deployment.model)
            last = result
            backoff_due = True
        if last is None:  # max_attempts < 1 cannot happen (schema), but keep mypy honest
            raise _no_key_error(route, None)
        return self._final(last, outcome)

    def _final(self, failure: _Failure, outcome: Outcome) -> web.Response:
        response = failure.final(outcome.upstream_request_id or outcome.request_id)
        self._stamp(response, outcome)
        outcome.status = response.status
        outcome.outcome = failure.verdict.reason
        return response

    async def _attempt(
        self,
        request: web.Request,
        runtime: Runtime,
        parsed: ParsedRequest,
        route: Route,
        deployment: Deployment,
        lease: KeyLease,
        outcome: Outcome,
    ) -> web.StreamResponse | _Failure:
        """One attempt. Returns the committed response, or a _Failure while nothing has been
        sent to the client."""
        loop = asyncio.get_running_loop()
        timeouts = route.timeouts
        deadline = outcome.started_loop + timeouts.total_s
        # A non-stream answer arrives only once the whole generation is done, so its wait for
        # the first byte is bounded by total_s, not first_byte_s.
        first_byte_s = timeouts.first_byte_s if parsed.stream else timeouts.total_s
        first_byte_deadline = min(loop.time() + first_byte_s, deadline)
        ureq = build_upstream_request(
            parsed, deployment.provider, deployment.model, route.max_tokens_cap, lease.key.secret
        )
        session = request.app[HTTP_CLIENT]
        provider = deployment.provider.name
        headers = dict(ureq.headers)
        request.app[TELEMETRY].inject(outcome.attempt_span, headers)
        connect = ConnectTiming()
        try:
            async with asyncio.timeout_at(first_byte_deadline):
                upstream = await session.post(
                    ureq.url,
                    data=ureq.body,
                    headers=headers,
                    trace_request_ctx=connect,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s
                    ),
                )
        except aiohttp.ConnectionTimeoutError:
            return self._fail(
                504,
                Kind.UPSTREAM_TIMEOUT,
                "connect_timeout",
                f"Timed out connecting to the upstream provider '{provider}'.",
            )
        except TimeoutError:
            return self._fail(
                504,
                Kind.UPSTREAM_TIMEOUT,
                "first_byte_timeout",
                f"The upstream provider '{provider}' sent no response within {first_byte_s:g} s.",
            )
        except aiohttp.ClientConnectorError:
            return self._fail(
                502,
                Kind.UPSTREAM_UNAVAILABLE,
                "connect_error",
                f"Could not connect to the upstream provider '{provider}'.",
            )
        except (aiohttp.ClientError, OSError):
            return self._fail(
                502,
                Kind.UPSTREAM_ERROR,
                "upstream_reset",
                f"The connection to the upstream provider '{provider}' failed before a response.",
            )
        outcome.upstream_status = upstream.status
        outcome.timings.connect_s = connect.seconds
        outcome.attempt_span.add_event(
            "gen_ai.response_headers", {"http.status_code": upstream.status}
        )
        try:
            status = upstream.status
            if not 200 <= status <= 599:
                # 1xx as a final answer (a 101 would hang the client), or no HTTP status.
                return self._fail(
                    502,
                    Kind.UPSTREAM_ERROR,
                    "upstream_bad_status",
                    f"The upstream provider '{provider}' answered with HTTP status {status}, "
                    "which is not a valid final status.",
                )
            upstream_id = upstream.headers.get(REQUEST_ID_HEADER[self.endpoint.family])
            outcome.upstream_request_id = upstream_id[:128] if upstream_id else None
            content_type = upstream.headers.get("content-type", "")
            if (
                status < 300
                and content_type.startswith("text/event-stream")
                and self.endpoint.observer is not None  # e.g. embeddings never stream
            ):
                if _encoding(upstream) is not None:
                    # Asked for identity; an encoded stream cannot be relayed byte for byte
                    # (nor observed) without inflating it: refused.
                    return self._fail(
                        502,
                        Kind.UPSTREAM_ERROR,
                        "upstream_encoding",
                        f"The upstream provider '{provider}' sent a compressed stream "
                        "although the gateway asked for none.",
                    )
                return await self._stream(
                    request,
                    parsed,
                    upstream,
                    outcome,
                    first_byte_deadline,
                    route,
                    deployment,
                    runtime,
                )
            return await self._buffered(runtime, upstream, outcome, deadline, provider)
        finally:
            upstream.close()

    async def _buffered(
        self,
        runtime: Runtime,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        deadline: float,
        provider: str,
    ) -> web.Response | _Failure:
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
                        return self._fail(
                            502,
                            Kind.UPSTREAM_ERROR,
                            "response_too_large",
                            f"The upstream response is larger than {limit} bytes.",
                            retryable=False,
                        )
        except TimeoutError:
            return self._fail(
                504,
                Kind.UPSTREAM_TIMEOUT,
                "total_timeout",
                f"The upstream provider '{provider}' did not finish within the time limit.",
                retryable=False,
            )
        except (aiohttp.ClientError, OSError):
            return self._fail(
                502,
                Kind.UPSTREAM_ERROR,
                "payload_error",
                f"The upstream provider '{provider}' broke the connection mid-response.",
            )
        status = upstream.status
        encoding = _encoding(upstream)
        body: bytes = bytes(buf)
        del buf
        if encoding is not None:
            decoded = _decode(body, encoding, limit)
            if decoded is None:
                return self._fail(
                    502,
                    Kind.UPSTREAM_ERROR,
                    "upstream_encoding",
                    f"The upstream provider '{provider}' sent a compressed answer "
                    f"({encoding[:32]}) that the gateway cannot decode within its limits.",
                )
            body = decoded
        # Every non-stream body is scrubbed, whatever its status: providers echo keys in
        # error messages, and a misbehaving one may anywhere.
        body = _scrub(body, runtime.secrets)
        headers = _pass_headers(upstream)
        headers["content-type"] = upstream.headers.get("content-type", "application/json")
        if status < 300:
            outcome.status = status
            outcome.bytes_out = len(body)
            outcome.usage = _USAGE_FROM_BODY[self.endpoint.family](body)
            # The whole answer is the "first byte" of a non-stream response.
            outcome.timings.first_upstream_byte = time.perf_counter()
            response = web.Response(status=status, body=body, headers=headers)
            self._stamp(response, outcome)
            _mark_overhead(response, outcome, time.perf_counter())
            return response
        verdict = classify_status(status, upstream.headers, body, time.time())
        if status in KEY_FAULT_STATUSES and verdict.key_action is KeyAction.DISABLE:
            error = _credentials_error(provider, status)
            family = self.endpoint.family
            return _Failure(verdict, lambda rid: gateway_error_response(family, error, rid))
        return _Failure(verdict, lambda _: web.Response(status=status, body=body, headers=headers))

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        upstream: aiohttp.ClientResponse,
        outcome: Outcome,
        first_byte_deadline: float,
        route: Route,
        deployment: Deployment,
        runtime: Runtime,
    ) -> web.StreamResponse | _Failure:
        endpoint = self.endpoint
        provider = deployment.provider.name
        assert endpoint.observer is not None
        observer = endpoint.observer()
        decoder = SSEDecoder()
        # Hold the response until the first event is whole: until then a failure (nothing
        # sent, an error as the first event) is still retryable. Bounded: one event, 64 KiB.
        held = bytearray()
        facts = observer.facts
        first_is_error = False
        try:
            async with asyncio.timeout_at(first_byte_deadline):
                while facts.events == 0 and len(held) < _PEEK_LIMIT:
                    chunk = await upstream.content.readany()
                    if not chunk:
                        break
                    now = time.perf_counter()
                    if not held:
                        outcome.timings.first_upstream_byte = now
                        outcome.attempt_span.add_event("gen_ai.first_byte")
                    held += chunk
                    for event in decoder.feed(chunk):
                        observer.on_event(event, now)
                        facts.last_event_at = now
                        if facts.events == 1:
                            first_is_error = facts.error_type is not None
        except TimeoutError:
            if not held:
                return self._fail(
                    504,
                    Kind.UPSTREAM_TIMEOUT,
                    "first_byte_timeout",
                    f"The upstream provider '{provider}' sent no data within "
                    f"{route.timeouts.first_byte_s:g} s.",
                )
        except SSEError:
            pass  # not decodable as SSE: relay it as it is, observing nothing
        except (aiohttp.ClientError, OSError):
            return self._fail(
                502,
                Kind.UPSTREAM_ERROR,
                "payload_error",
                f"The upstream provider '{provider}' broke the stream before its first event.",
            )
        if not held:
            return self._fail(
                502,
                Kind.UPSTREAM_ERROR,
                "empty_stream",
                f"The upstream provider '{provider}' ended the stream without sending anything.",
            )
        if first_is_error:
            verdict = classify_stream_error(facts.error_type)
            if verdict.retryable:
                kind, status = _STREAM_ERROR_KINDS.get(verdict.reason, (Kind.UPSTREAM_ERROR, 502))
                message = _scrub(
                    (facts.error_message or facts.error_type or "error").encode(), runtime.secrets
                ).decode(errors="replace")
                error = UpstreamFailure(
                    status,
                    kind,
                    f"The upstream provider '{provider}' failed: {message}",
                    reason=verdict.reason,
                )
                family = self.endpoint.family
                return _Failure(verdict, lambda rid: gateway_error_response(family, error, rid))
            # Not worth retrying (the request itself is bad): the client gets the upstream's
            # own error stream.

        headers = _pass_headers(upstream)
        headers["Content-Type"] = upstream.headers.get("content-type", "text/event-stream")
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        self._stamp(response, outcome)
        outcome.facts = facts
        outcome.status = upstream.status
        attempt_span = outcome.attempt_span

        def first_token() -> None:
            # Recorded live, the moment the first content event passes (not at the end).
            assert facts.first_token_at is not None
            attempt_span.add_event("gen_ai.first_token")
            # The attempt's own time to first chunk (the server span has the caller's).
            started = outcome.timings.attempt_started or outcome.started
            attempt_span.set_attribute(
                "gen_ai.response.time_to_first_chunk", facts.first_token_at - started
            )

        _mark_overhead(response, outcome, time.perf_counter())
        await response.prepare(request)
        stripper = UsageStripper() if parsed.inject_usage else None
        metrics = request.app[TELEMETRY].metrics
        active = metrics.active_streams.labels(outcome.model_label)
        active.inc()
        try:
            try:
                # The held first event is scrubbed like any non-stream body (an error event
                # may echo the key); what follows is relayed byte for byte.
                first = _scrub(bytes(held), runtime.secrets)
                if stripper is not None:
                    first = stripper.feed(first)
                if first:
                    await response.write(first)
                outcome.bytes_out = len(first)
                outcome.timings.first_byte_sent = time.perf_counter()
            except ConnectionResetError:
                outcome.outcome = StreamEnd.CLIENT_CANCEL.value
                return response
            del held
            on_first_token: Callable[[], None] | None = first_token
            if facts.first_token_at is not None:
                first_token()
                on_first_token = None
            return await self._relay(
                request,
                upstream,
                response,
                decoder,
                observer,
                route,
                runtime,
                outcome,
                stripper,
                on_first_token,
                provider,
            )
        finally:
            active.dec()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        decoder: SSEDecoder,
        observer: StreamObserver,
        route: Route,
        runtime: Runtime,
        outcome: Outcome,
        stripper: UsageStripper | None,
        on_first_token: Callable[[], None] | None,
        provider: str,
    ) -> web.StreamResponse:
        endpoint = self.endpoint
        facts = observer.facts
        # The relay's watchdog keeps time on the same fine clock as the figures.
        deadline = outcome.started + route.timeouts.total_s

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
                endpoint.family,
                kind,
                message,
                responses=endpoint.is_responses,
                sequence_number=next_sequence_number(observer),
            )

        result = await relay_stream(
            request,
            upstream,
            response,
            decoder,
            observer,
            chunk_s=route.timeouts.chunk_s,
            deadline=deadline,
            keepalive_s=runtime.server.keepalive_comment_s,
            error_event=error_event,
            stripper=stripper,
            on_first_token=on_first_token,
        )
        outcome.outcome = result.end.value
        outcome.bytes_out += result.bytes_out
        if result.end in (StreamEnd.CHUNK_TIMEOUT, StreamEnd.TOTAL_TIMEOUT):
            outcome.span.add_event(
                f"gateway.stream_{result.end.value}",
                {"gateway.events": facts.events, "gateway.limit_s": route.timeouts.chunk_s},
            )
            _log.warning(
                "stream killed",
                reason=result.end.value,
                deployment=outcome.deployment,
                key_id=outcome.key_id,
                caller=outcome.caller,
                events=facts.events,
            )
        if not result.aborted and result.end is not StreamEnd.CLIENT_CANCEL:
            try:
                await response.write_eof()
            except ConnectionResetError:
                outcome.outcome = StreamEnd.CLIENT_CANCEL.value
        return response

    def _fail(
        self, status: int, kind: Kind, reason: str, message: str, *, retryable: bool = True
    ) -> _Failure:
        """A failure the gateway itself describes (connect error, timeout, broken body)."""
        error = UpstreamFailure(status, kind, message, reason=reason)
        family = self.endpoint.family
        return _Failure(
            Verdict(retryable, reason), lambda rid: gateway_error_response(family, error, rid)
        )

    def _stamp(self, response: web.StreamResponse, outcome: Outcome) -> None:
        response.headers.update(outcome.extra_headers)
        if outcome.deployment is not None:
            response.headers["x-gateway-deployment"] = outcome.deployment
        response.headers["x-gateway-attempts"] = str(outcome.attempts)
        # The upstream's id when it gave one (it is what its support asks for), else ours.
        response.headers[REQUEST_ID_HEADER[self.endpoint.family]] = (
            outcome.upstream_request_id or outcome.request_id
        )


_PEEK_LIMIT = 64 * 1024
_USAGE_FROM_BODY: dict[ApiFamily, Callable[[bytes], Usage | None]] = {
    ApiFamily.OPENAI: openai_api.usage_from_body,
    ApiFamily.ANTHROPIC: anthropic_api.usage_from_body,
}
# How a retryable first-event error is told to the client when no attempt is left.
_STREAM_ERROR_KINDS = {
    "first_event_overloaded": (Kind.OVERLOADED, 529),
    "first_event_rate_limited": (Kind.RATE_LIMITED, 429),
}


def _choose(
    route: Route,
    now: float,
    tried: list[set[str]],
    skip: Mapping[int, float],
    *,
    skip_models: set[str] | frozenset[str] = frozenset(),
    untried_only: bool = False,
) -> tuple[int, Deployment, KeyLease] | float | None:
    """The next deployment and key: deployments in order, keys not yet tried in this request
    first (only those, with `untried_only`); a provider backing off, a deployment over its
    budget (`skip`) and one whose upstream model is in `skip_models` are skipped. When nothing
    is usable, the epoch time when something comes back (or None if nothing is blocked, only
    busy)."""
    soonest: float | None = None
    for prefer_untried in (True,) if untried_only else (True, False):
        for index, deployment in enumerate(route.deployments):
            if index in skip or deployment.model in skip_models:
                continue
            pool = deployment.pool
            backoff = pool.provider_blocked_until(now)
            if backoff is not None:
                soonest = backoff if soonest is None else min(soonest, backoff)
                continue
            exclude = frozenset(tried[index]) if prefer_untried else frozenset()
            lease = pool.acquire(now, exclude)
            if lease is not None:
                return index, deployment, lease
            unblock = pool.earliest_unblock(now)
            if unblock is not None:
                soonest = unblock if soonest is None else min(soonest, unblock)
    return soonest


class ConnectTiming:
    """Filled by the HTTP client's trace hooks when an attempt opens a new connection."""

    __slots__ = ("end", "start")

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start if self.start is not None and self.end is not None else 0.0


def _max_tokens(parsed: ParsedRequest) -> int | None:
    for name in parsed.endpoint.cap_fields:
        value = as_int(parsed.body.get(name))
        if value is not None:
            return value
    return None


def _mark_overhead(response: web.StreamResponse, outcome: Outcome, now: float) -> None:
    """Time spent in the gateway up to the first byte sent, upstream time excluded: admission
    (auth, parsing, limits) plus relay (from the first upstream byte to the response)."""
    t = outcome.timings
    if t.admitted is None or t.first_upstream_byte is None:
        return
    overhead = (t.admitted - outcome.started) + (now - t.first_upstream_byte)
    outcome.overhead_ms = overhead * 1000
    response.headers["x-gateway-overhead-ms"] = f"{overhead * 1000:.3f}"


def _finish_attempt_span(
    span: Span, outcome: Outcome, result: web.StreamResponse | _Failure | None
) -> None:
    if not span.is_recording():
        span.end()
        return
    if result is None:
        span.set_attribute("gateway.attempt.outcome", "client_cancel")
        set_error(span, "client_cancel")
    elif isinstance(result, _Failure):
        span.set_attribute("gateway.attempt.outcome", result.verdict.reason)
        set_error(span, result.verdict.reason)
    else:
        facts = outcome.facts
        usage = facts.usage if facts is not None else outcome.usage
        span.set_attributes(
            attrs(
                gateway__attempt__outcome=outcome.outcome,
                gen_ai__response__id=facts.response_id if facts else None,
                gen_ai__response__model=facts.response_model if facts else None,
                gen_ai__usage__input_tokens=usage.input_tokens if usage else None,
                gen_ai__usage__output_tokens=usage.output_tokens if usage else None,
                gen_ai__usage__cache_read__input_tokens=(
                    usage.cache_read_input_tokens if usage else None
                ),
                gateway__events=facts.events if facts else None,
            )
        )
        if facts is not None and facts.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [facts.finish_reason])
        if outcome.outcome not in ("ok",):
            set_error(span, outcome.outcome)
    span.end()


def _finish_server_span(span: Span, outcome: Outcome, now: float) -> None:
    if not span.is_recording():
        span.end()
        return
    t = outcome.timings
    values: dict[str, Any] = attrs(
        http__response__status_code=outcome.status,
        gateway__outcome=outcome.outcome,
        gateway__attempts=outcome.attempts,
        gateway__deployment=outcome.deployment,
        gateway__key_id=outcome.key_id,
        gateway__overhead_ms=outcome.overhead_ms,
    )
    # Where the client's time to first byte went.
    if t.admitted is not None:
        values["gateway.ttft.admission_ms"] = (t.admitted - outcome.started) * 1000
        if t.attempt_started is not None:
            values["gateway.ttft.retries_ms"] = (t.attempt_started - t.admitted) * 1000
    if t.attempt_started is not None and t.first_upstream_byte is not None:
        values["gateway.ttft.upstream_connect_ms"] = t.connect_s * 1000
        values["gateway.ttft.upstream_ttfb_ms"] = (
            t.first_upstream_byte - t.attempt_started - t.connect_s
        ) * 1000
    if t.first_upstream_byte is not None and t.first_byte_sent is not None:
        values["gateway.ttft.relay_ms"] = (t.first_byte_sent - t.first_upstream_byte) * 1000
    facts = outcome.facts
    if facts is not None and facts.first_token_at is not None:
        values["gen_ai.response.time_to_first_chunk"] = facts.first_token_at - outcome.started
    span.set_attributes(values)
    if outcome.outcome not in ("ok", "client_cancel") and (
        outcome.status is None or outcome.status >= 500 or outcome.outcome in _STREAM_ERRORS
    ):
        set_error(span, outcome.outcome)
    span.end()


_STREAM_ERRORS = frozenset(
    {"chunk_timeout", "total_timeout", "truncated", "payload_error", "upstream_error"}
)


def _actual_tokens(outcome: Outcome) -> int | None:
    return used_tokens(outcome.facts.usage if outcome.facts is not None else outcome.usage)


def _over_budget_error(route: Route, wait: float) -> GatewayError:
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        429,
        Kind.RATE_LIMITED,
        f"The upstream capacity configured for the model '{route.name}' is used up "
        f"(provider limits). Retry in {wait:.3f} s.",
        headers={"retry-after": str(seconds), "retry-after-ms": str(math.ceil(wait * 1000))},
    )


def _no_key_error(route: Route, wait: float | None) -> GatewayError:
    if wait is None:
        return GatewayError(
            503,
            Kind.UPSTREAM_UNAVAILABLE,
            f"Every upstream key for the model '{route.name}' is at its concurrency limit.",
            headers={"retry-after": "1"},
        )
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        503,
        Kind.UPSTREAM_UNAVAILABLE,
        f"No upstream key is usable for the model '{route.name}': every key is cooling down "
        f"or disabled, or the provider is backing off. Retry in {seconds} s.",
        headers={"retry-after": str(seconds), "retry-after-ms": str(int(wait * 1000))},
    )


def _log_health(provider: str, change: HealthChange) -> None:
    block = change.block
    fields = {
        "provider": provider,
        "reason": block.reason,
        "seconds": round(max(0.0, block.until - time.time()), 3),
        "strikes": block.strikes,
    }
    if block.state == "disabled":
        _log.error(
            "upstream key disabled", key_id=change.subject, key_fp=change.fingerprint, **fields
        )
    elif block.state == "cooldown":
        _log.warning(
            "upstream key cooling down", key_id=change.subject, key_fp=change.fingerprint, **fields
        )
    else:
        _log.warning("upstream provider backing off", **fields)


def access_log(o: Outcome, now: float) -> None:
    """The outcome sink that writes one JSON access line per request."""
    fields: dict[str, Any] = {
        "request_id": o.request_id,
        "caller": o.caller,
        "model": o.model,
        "deployment": o.deployment,
        "key_id": o.key_id,
        "key_fp": o.key_fp,
        "status": o.status,
        "outcome": o.outcome,
        "stream": o.stream,
        "upstream_status": o.upstream_status,
        "attempts": o.attempts,
        "duration_ms": round((now - o.started) * 1000, 3),
    }
    if o.upstream_request_id is not None:
        fields["upstream_request_id"] = o.upstream_request_id
    if o.trace_id is not None:
        fields["trace_id"] = o.trace_id
        fields["span_id"] = o.span_id
    if o.overhead_ms is not None:
        fields["overhead_ms"] = round(o.overhead_ms, 3)
    if o.retry_reasons:
        fields["retry_reasons"] = o.retry_reasons
    if o.limiter is not None:
        fields["limiter"] = o.limiter
    if o.reconciled is not None:
        fields["reconciled_tokens"] = o.reconciled
    if o.usage is not None:
        fields["input_tokens"] = o.usage.input_tokens
        fields["output_tokens"] = o.usage.output_tokens
    if o.timings.first_upstream_byte is not None:
        fields["ttfb_ms"] = round((o.timings.first_upstream_byte - o.started) * 1000, 3)
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


# Outcome labels of llm_gateway_requests_total: a bounded set (see gateway/metrics.py).
_OUTCOME_LABELS = {
    "ok": "ok",
    "client_cancel": "client_cancel",
    "chunk_timeout": "chunk_timeout",
    "total_timeout": "total_timeout",
    "truncated": "truncated",
    "payload_error": "payload_error",
    "upstream_error": "upstream_error",
    "authentication": "auth_failed",
    "permission": "forbidden",
    "rate_limited": "rate_limited",
    "internal": "internal_error",
    "upstream_unavailable": "upstream_unavailable",
    "limiter_unavailable": "upstream_unavailable",
}


def outcome_label(o: Outcome) -> str:
    """The bounded `outcome` label of a finished request."""
    label = _OUTCOME_LABELS.get(o.outcome)
    if label is not None:
        return label
    status = o.status or 0
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "upstream_unavailable"
    if 400 <= status < 500:
        return "invalid_request"
    return "upstream_error"


def record_metrics(metrics: Metrics, o: Outcome, now: float) -> None:
    """The outcome sink that feeds /metrics (once per request, never per chunk). Model labels
    are configured names only (`unknown` for the rest): callers cannot add series."""
    model = o.model_label
    label = outcome_label(o)
    metrics.requests.labels(model, label).inc()
    if o.attempts == 0 and o.deployment is None:
        return  # answered by the gateway alone: no GenAI operation happened
    provider = o.api
    deployment = o.deployment or ""
    error_type = "" if label in ("ok", "client_cancel") else o.outcome
    metrics.operation_duration.labels(o.operation, provider, model, deployment, error_type).observe(
        now - o.started
    )
    if o.overhead_ms is not None:
        metrics.overhead.labels(model).observe(o.overhead_ms / 1000)
    facts = o.facts
    usage = facts.usage if facts is not None else o.usage
    if usage is not None:
        if usage.input_tokens is not None:
            metrics.token_usage.labels(o.operation, provider, model, "input").observe(
                usage.input_tokens
            )
        if usage.output_tokens is not None:
            metrics.token_usage.labels(o.operation, provider, model, "output").observe(
                usage.output_tokens
            )
    if facts is not None and facts.first_token_at is not None:
        metrics.time_to_first_chunk.labels(o.operation, provider, model, deployment).observe(
            facts.first_token_at - o.started
        )
        last = facts.last_event_at
        chunks = facts.events - (facts.first_token_event or 0) - 1
        if last is not None and chunks > 0:
            metrics.time_per_output_chunk.labels(o.operation, provider, model, deployment).observe(
                (last - facts.first_token_at) / chunks
            )
