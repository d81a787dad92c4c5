"""The request path, as the list of its stages.

    auth       the caller's key or token -> a frozen Caller                    (auth.py)
    edge       body read (bounded), parsed once, routed, tokens estimated       (edge.py)
    admission  `async with`: caller limits admitted, provider budgets charged   (admission.py)
               per attempt, everything settled on exit
    attempts   planner.next -> upstream.attempt -> planner.record               (attempts.py,
                                                                                 upstream.py)
    answer     a whole reply, the stream owner (relay) for a stream, or the     (relay.py,
               last failure rendered in the caller's format                     render.py)
    sinks      access log, metrics, spans: each guarded                         (sinks.py)

Before the client response is prepared, every failure is an ordinary HTTP error in the
caller's API format. After `prepare()` (a stream has started) a failure can only travel
in-band, as one final error event, which only the stream owner writes.
"""

from __future__ import annotations

import asyncio
import random
import time

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace

from gateway.admission import Ticket, admit
from gateway.appkeys import (
    BUDGETS,
    HEDGES,
    HTTP_CLIENT,
    LIMITER,
    OPS,
    OUTCOME_SINKS,
    QUEUE,
    RANDOM,
    RESUME_STORE,
    RUNTIME,
    TELEMETRY,
)
from gateway.attempts import Attempts, Planner, Served
from gateway.auth import authenticate
from gateway.budget import BUDGET_HEADERS
from gateway.config.runtime import Caller, Runtime
from gateway.edge import BodyBudget, Edge, Request
from gateway.errors import GatewayError, UpstreamFailure
from gateway.ops import STREAM_ID_HEADER, new_stream_id
from gateway.providers import WIRE_APIS
from gateway.providers.base import Endpoint
from gateway.relay import StreamOwner
from gateway.render import error_response
from gateway.report import Report, new_request_id
from gateway.serving import close_after_response
from gateway.sinks import finish
from gateway.telemetry import Telemetry, ids, set_error
from gateway.upstream import Failure, Reply, Upstream

# The request's id on the aiohttp request (set by the middleware).
REQUEST_ID = web.RequestKey("request_id", str)


class Handler:
    """The aiohttp handler of one endpoint."""

    def __init__(self, endpoint: Endpoint, budget: BodyBudget, *, capture_content: bool) -> None:
        self.endpoint = endpoint
        self.api = WIRE_APIS[endpoint.family]
        self.edge = Edge(endpoint, budget, capture_content=capture_content)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = request.app
        runtime = app[RUNTIME].current  # this request's snapshot, to its end
        tel = app[TELEMETRY]
        report = self._report(request, tel)
        # Log lines written while handling this request carry its trace ids.
        token = otel_context.attach(trace.set_span_in_context(report.span))
        try:
            caller = await self._authenticate(request, runtime, report, tel)
            req = await self.edge.accept(request, runtime, caller, report)
            retry_redis_s = runtime.config.state.retry_redis_after_s
            async with admit(app[LIMITER], req, report, tel, retry_redis_s) as ticket:
                upstream = Upstream(app[HTTP_CLIENT], tel, runtime)
                queue = runtime.config.policy.queue
                attempts = Attempts(
                    req,
                    upstream,
                    tel,
                    report,
                    queue=app[QUEUE] if queue.max_wait_s > 0 else None,
                    max_queue=queue.max_length,
                    hedges=app[HEDGES],
                )
                planner = self._planner(req, report, app[RANDOM])
                planner.queue_s = queue.max_wait_s
                result = await attempts.run(planner, ticket.charge_provider)
                return await self._answer(request, result, req, report, runtime, ticket)
        except GatewayError as err:
            return self._refused(request, err, report)
        except asyncio.CancelledError:
            report.cancelled()
            report.span.add_event("gateway.client_cancel")
            raise
        except Exception:
            # A bug: the middleware answers 500 and logs it; the outcome must not say "ok".
            report.outcome = "internal"
            report.status = report.status if report.facts is not None else 500
            raise
        finally:
            sinks = app[OUTCOME_SINKS]
            finish(report, time.perf_counter(), sinks)
            otel_context.detach(token)

    def _report(self, request: web.Request, tel: Telemetry) -> Report:
        endpoint = self.endpoint
        span = tel.server_span(f"{request.method} {endpoint.path}", request.headers)
        trace_id, span_id = ids(span)
        return Report(
            started=time.perf_counter(),
            started_loop=asyncio.get_running_loop().time(),
            request_id=request.get(REQUEST_ID) or new_request_id(),
            operation=endpoint.operation,
            api=endpoint.family.value,
            span=span,
            trace_id=trace_id,
            span_id=span_id,
        )

    @staticmethod
    async def _authenticate(
        request: web.Request, runtime: Runtime, report: Report, tel: Telemetry
    ) -> Caller:
        span = tel.child(report.span, "gateway.auth")
        try:
            caller = await authenticate(request.headers, runtime, runtime.jwt)
        except GatewayError as err:
            set_error(span, "authentication_failed", err.message)
            raise
        finally:
            span.end()
        report.caller = caller.id
        return caller

    @staticmethod
    def _planner(req: Request, report: Report, rng: random.Random) -> Planner:
        # No attempt starts later than deadline_s (or total_s) after the request began.
        policy, timeouts = req.route.retry, req.route.timeouts
        elapsed = time.perf_counter() - report.started
        deadline = time.time() - elapsed + min(policy.deadline_s, timeouts.total_s)
        return Planner(req.route, deadline, rng)

    async def _answer(
        self,
        request: web.Request,
        result: Served | Failure,
        req: Request,
        report: Report,
        runtime: Runtime,
        ticket: Ticket,
    ) -> web.StreamResponse:
        if isinstance(result, Failure):
            return self._failed(result, report)
        answer = result.result
        try:
            if isinstance(answer, Reply):
                ticket.answered_by(result.step.deployment, None)
                response: web.StreamResponse = self._reply(answer, report)
            else:
                # No attempt follows a committed stream: the caller's body (a long prompt) need
                # not stay in memory for as long as the stream lasts.
                req.parsed.body.clear()
                response = web.StreamResponse(status=answer.status, headers=answer.headers)
                self._stamp(response, report)
                stream_id = report.stream_id = new_stream_id()
                response.headers[STREAM_ID_HEADER] = stream_id
                mark_overhead(response, report)
                resume = runtime.config.resume
                recorder = None
                if resume.enabled:
                    recorder = request.app[RESUME_STORE].begin(
                        stream_id,
                        req.caller.id,
                        self.endpoint.family.value,
                        ttl_s=resume.ttl_s,
                        max_bytes=resume.max_stream_bytes,
                    )
                owner = StreamOwner(
                    request,
                    answer,
                    req,
                    report,
                    stream_id=stream_id,
                    streams=request.app[OPS].streams,
                    recorder=recorder,
                    inject_ids=resume.enabled and resume.inject_ids,
                    meter=ticket.answered_by(
                        result.step.deployment, answer.facts, request.app[BUDGETS]
                    ),
                )
                keepalive_s = runtime.server.keepalive_comment_s
                await owner.deliver(response, request.app[TELEMETRY], keepalive_s)
        except BaseException:
            result.close(report, abandoned=True)
            raise
        result.close(report)
        return response

    def _reply(self, reply: Reply, report: Report) -> web.Response:
        report.answered(reply.status, "ok")
        report.bytes_out = len(reply.body)
        report.usage = reply.usage
        response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        self._stamp(response, report)
        mark_overhead(response, report)
        return response

    def _failed(self, failure: Failure, report: Report) -> web.Response:
        """The last attempt's failure, as the caller gets it (no attempt follows)."""
        request_id = report.upstream_request_id or report.request_id
        response = error_response(self.endpoint.family, failure.answer, request_id)
        self._stamp(response, report)
        report.answered(response.status, failure.verdict.reason)
        return response

    def _refused(self, request: web.Request, err: GatewayError, report: Report) -> web.Response:
        """An error of the gateway's own, before any answer (auth, limits, no key, ...)."""
        reason = err.reason if isinstance(err, UpstreamFailure) else err.kind.name.lower()
        report.answered(err.status, reason)
        response = error_response(self.endpoint.family, err, report.request_id)
        if err.close:
            close_after_response(request)
        if report.attempts:
            response.headers["x-gateway-attempts"] = str(report.attempts)
        for name in BUDGET_HEADERS:  # what is left of the caller's budgets, refused or not
            if name in report.extra_headers and name not in response.headers:
                response.headers[name] = report.extra_headers[name]
        return response

    def _stamp(self, response: web.StreamResponse, report: Report) -> None:
        response.headers.update(report.extra_headers)
        if report.deployment is not None:
            response.headers["x-gateway-deployment"] = report.deployment
        response.headers["x-gateway-attempts"] = str(report.attempts)
        # The upstream's id when it gave one (it is what its support asks for), else ours.
        response.headers[self.api.request_id_header] = (
            report.upstream_request_id or report.request_id
        )


def mark_overhead(response: web.StreamResponse, report: Report) -> None:
    """Time spent in the gateway up to the first byte sent, upstream time excluded: admission
    (auth, parsing, limits) plus relay (from the first upstream byte to the response)."""
    t = report.timings
    if t.admitted is None or t.first_upstream_byte is None:
        return
    overhead = (t.admitted - report.started) + (time.perf_counter() - t.first_upstream_byte)
    report.overhead_ms = overhead * 1000
    response.headers["x-gateway-overhead-ms"] = f"{overhead * 1000:.3f}"
