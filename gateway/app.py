"""`create_app`: the one place that wires routes, middlewares and resources."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import aiohttp
import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import (
    BODY_BUDGET,
    HTTP_CLIENT,
    JWT,
    LIMITER,
    OUTCOME_SINKS,
    RANDOM,
    RUNTIME,
    TELEMETRY,
    JwtHolder,
    OutcomeSink,
    RuntimeHolder,
)
from gateway.auth import authenticate
from gateway.config.runtime import Route, Runtime
from gateway.config.schema import GatewayConfig, JwtConfig
from gateway.edge import BodyBudget
from gateway.errors import ApiFamily, GatewayError, Kind
from gateway.jwtauth import JwtVerifier
from gateway.limits.base import Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.logs import get_logger
from gateway.pipeline import (
    REQUEST_ID,
    REQUEST_ID_HEADER,
    ConnectTiming,
    Handler,
    access_log,
    family_for_path,
    gateway_error_response,
    new_request_id,
    record_metrics,
)
from gateway.providers import ENDPOINTS
from gateway.state import HealthStore, MemoryHealthStore, RedisHealthStore
from gateway.telemetry import Telemetry

_log = get_logger("gateway")

_HTTP_KINDS = {
    404: (Kind.ROUTE_NOT_FOUND, "Unknown path: {path}"),
    405: (Kind.METHOD_NOT_ALLOWED, "Method {method} is not allowed on {path}"),
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give every request an id (every answer carries it, in the header its caller's SDK
    reads), and render every error the handlers did not answer themselves in the caller's
    format."""
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    family = family_for_path(request.path, request.headers)
    try:
        response = await handler(request)
    except GatewayError as err:
        return gateway_error_response(family, err, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind, template = _HTTP_KINDS.get(exc.status, (Kind.INVALID_REQUEST, "{reason}"))
        message = template.format(
            path=request.path[:200], method=request.method[:16], reason=exc.reason
        )
        return gateway_error_response(family, GatewayError(exc.status, kind, message), request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("unhandled error", path=request.path[:200], request_id=request_id)
        return gateway_error_response(
            family, GatewayError(500, Kind.INTERNAL, "Internal gateway error."), request_id
        )
    if not response.prepared:
        header = REQUEST_ID_HEADER[family]
        if header not in response.headers:
            response.headers[header] = request_id
    return response


def _anthropic_model(route: Route) -> dict[str, object]:
    return {
        "type": "model",
        "id": route.name,
        "display_name": route.name,
        "created_at": "1970-01-01T00:00:00Z",
    }


def _openai_model(route: Route) -> dict[str, object]:
    return {"id": route.name, "object": "model", "created": 0, "owned_by": "llm-gateway"}


def _wants_anthropic(request: web.Request) -> bool:
    # The Anthropic SDK sends anthropic-version on every request; the OpenAI SDK never does.
    return "anthropic-version" in request.headers


async def models_handler(request: web.Request) -> web.Response:
    """`GET /v1/models`: the models this caller may use through the API it speaks (the
    Anthropic SDK is offered only models /v1/messages serves, the OpenAI SDK only those of
    the OpenAI API), in that API's list format."""
    runtime = request.app[RUNTIME].current
    caller = await authenticate(request.headers, runtime, request.app[JWT].current)
    anthropic = _wants_anthropic(request)
    family = ApiFamily.ANTHROPIC if anthropic else ApiFamily.OPENAI
    routes = [r for r in runtime.models_for(caller) if r.family is family]
    body: dict[str, object]
    if anthropic:
        data = [_anthropic_model(r) for r in routes]
        body = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    else:
        body = {"object": "list", "data": [_openai_model(r) for r in routes]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def model_handler(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`: one model in the caller's API format; 404 in that format for an
    id it may not use, does not exist, or is served through the other API."""
    runtime = request.app[RUNTIME].current
    caller = await authenticate(request.headers, runtime, request.app[JWT].current)
    anthropic = _wants_anthropic(request)
    family = ApiFamily.ANTHROPIC if anthropic else ApiFamily.OPENAI
    model_id = request.match_info["model_id"]
    route = runtime.routes.get(model_id)
    if route is None or not caller.may_use(model_id) or route.family is not family:
        raise GatewayError(
            404,
            Kind.NOT_FOUND,
            f"The model '{model_id[:256]}' does not exist or you do not have access to it.",
            param="model",
        )
    body = _anthropic_model(route) if anthropic else _openai_model(route)
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def health_handler(request: web.Request) -> web.Response:
    """`GET /healthz`: the process is up and serving (no auth, no upstream calls)."""
    return web.Response(
        body=orjson.dumps(
            {"status": "ok", "version": __version__, "pid": os.getpid(), "time": time.time()}
        ),
        content_type="application/json",
    )


def _connect_trace() -> aiohttp.TraceConfig:
    """Times new upstream connections (the `upstream_connect` part of the TTFT split)."""
    config = aiohttp.TraceConfig()

    async def start(_s: object, ctx: SimpleNamespace, _p: object) -> None:
        timing = ctx.trace_request_ctx
        if isinstance(timing, ConnectTiming):
            timing.start = time.perf_counter()

    async def end(_s: object, ctx: SimpleNamespace, _p: object) -> None:
        timing = ctx.trace_request_ctx
        if isinstance(timing, ConnectTiming):
            timing.end = time.perf_counter()

    config.on_connection_create_start.append(start)
    config.on_connection_create_end.append(end)
    return config


def _client_ctx(runtime: Runtime) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=runtime.server.max_upstream_connections,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        # auto_decompress off: bytes are relayed as received (we ask for identity anyway).
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
            trace_configs=[_connect_trace()],
        )
        app[HTTP_CLIENT] = session
        yield
        await session.close()

    return ctx


def build_state(config: GatewayConfig) -> tuple[HealthStore, Limiter]:
    """Key health and the limiter the `state` config asks for (created once per process; a
    reload keeps both). With Redis they share one client."""
    state = config.state
    if state.backend != "redis":
        return MemoryHealthStore(), MemoryLimiter()
    from gateway.limits.redis import RedisLimiter, redis_client  # noqa: PLC0415

    client = redis_client(state.redis_url, state.socket_timeout_s)
    limiter = RedisLimiter(
        state.redis_url,
        prefix=state.key_prefix,
        socket_timeout_s=state.socket_timeout_s,
        fail_open=state.on_redis_error == "fail_open",
        instances=state.instances,
        retry_redis_after_s=state.retry_redis_after_s,
        client=client,
    )
    health = RedisHealthStore(
        client, key=f"{state.key_prefix}:{{health}}", timeout_s=state.socket_timeout_s * 2
    )
    return health, limiter


def build_limiter(runtime: Runtime) -> Limiter:
    """A limiter for `runtime` when the caller built none (tests, embedding)."""
    return build_state(runtime.config)[1]


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    health = app[RUNTIME].current.health
    if isinstance(health, RedisHealthStore):
        await health.start()
        yield
        await health.close()
    else:
        yield


def _limiter_ctx(limiter: Limiter) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await limiter.close()

    return ctx


async def _jwt_ctx(app: web.Application) -> AsyncIterator[None]:
    # After the HTTP client context: the JWKS is fetched with the app's client session.
    verifier = app[JWT].current
    if verifier is not None:
        await verifier.start(app[HTTP_CLIENT])
    yield
    # The one in use at the end (a reload may have replaced the first).
    verifier = app[JWT].current
    if verifier is not None:
        await verifier.close()


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format (key pool states are read at scrape time)."""
    telemetry = request.app[TELEMETRY]
    metrics = telemetry.metrics
    runtime = request.app[RUNTIME].current
    now = time.time()
    for name, pool in runtime.pools.items():
        for key, state, in_flight in pool.key_states(now):
            for candidate in ("ok", "cooldown", "disabled"):
                metrics.key_state.labels(name, key.id, candidate).set(
                    1 if candidate == state else 0
                )
            metrics.key_in_flight.labels(name, key.id).set(in_flight)
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # The exporter's final flush is blocking I/O (up to its timeout when the collector is
    # down): off the event loop.
    await asyncio.to_thread(app[TELEMETRY].shutdown)


async def swap_jwt(app: web.Application, config: JwtConfig | None) -> None:
    """Put a verifier for `config` in service (a reload changed `auth.jwt`). The new one has
    fetched its keys before it takes over; the old one is closed after. Raises ValueError for
    a bad PEM file, before anything changes."""
    holder = app[JWT]
    new = JwtVerifier(config) if config is not None else None
    if new is not None:
        await new.start(app[HTTP_CLIENT])
    old, holder.current = holder.current, new
    if old is not None:
        await old.close()


def create_app(
    runtime: Runtime,
    limiter: Limiter | None = None,
    *,
    telemetry: Telemetry | None = None,
) -> web.Application:
    """The gateway application for `runtime` (swap `app[RUNTIME].current` to reload)."""
    # Bodies are read by the handlers with the runtime's own bound (413 in the caller's format).
    app = web.Application(middlewares=[error_middleware], client_max_size=2**63)
    app[RUNTIME] = RuntimeHolder(runtime)
    app[RANDOM] = random.Random()  # noqa: S311  (backoff jitter, not a secret)
    app[BODY_BUDGET] = BodyBudget(runtime.server.max_body_bytes_in_flight)
    app[LIMITER] = limiter if limiter is not None else build_limiter(runtime)
    jwt_config = runtime.config.auth.jwt
    app[JWT] = JwtHolder(JwtVerifier(jwt_config) if jwt_config is not None else None)
    tel = telemetry if telemetry is not None else Telemetry(runtime.telemetry)
    app[TELEMETRY] = tel
    sinks: list[OutcomeSink] = [functools.partial(record_metrics, tel.metrics)]
    if runtime.telemetry.access_log:
        sinks.append(access_log)
    app[OUTCOME_SINKS] = sinks
    # Order matters: the HTTP client first (the JWKS fetch uses it), torn down last.
    app.cleanup_ctx.append(_client_ctx(runtime))
    app.cleanup_ctx.append(_limiter_ctx(app[LIMITER]))
    app.cleanup_ctx.append(_jwt_ctx)
    app.cleanup_ctx.append(_health_ctx)
    app.cleanup_ctx.append(_telemetry_ctx)
    for endpoint in ENDPOINTS:
        app.router.add_post(endpoint.path, Handler(endpoint).handle)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/v1/models/{model_id}", model_handler)
    app.router.add_get("/healthz", health_handler)
    if runtime.telemetry.prometheus:
        app.router.add_get("/metrics", metrics_handler)
    return app


__all__ = ["create_app"]
