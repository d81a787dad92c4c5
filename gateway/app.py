"""`create_app`: the one place that wires routes, middlewares and resources."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import aiohttp
import orjson
from aiohttp import web

from gateway.appkeys import (
    BUDGETS,
    HEDGES,
    HTTP_CLIENT,
    LIMITER,
    OPS,
    OUTCOME_SINKS,
    QUEUE,
    RANDOM,
    RESUME_READERS,
    RESUME_STORE,
    RUNTIME,
    TELEMETRY,
    RuntimeHolder,
)
from gateway.attempts import HedgeStats
from gateway.budget import BudgetTallies
from gateway.config.runtime import Runtime
from gateway.config.schema import GatewayConfig
from gateway.edge import BodyBudget
from gateway.handler import Handler
from gateway.jwtauth import JwtVerifier
from gateway.limits.base import Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.logs import get_logger
from gateway.ops import ConfigState, Ops, file_digest
from gateway.providers import ENDPOINTS
from gateway.queue import CapacityQueue
from gateway.resume.endpoint import resume_handler
from gateway.resume.readers import Readers
from gateway.resume.store import MemoryStore, ReplayStore
from gateway.routes import (
    error_middleware,
    health_handler,
    model_handler,
    models_handler,
)
from gateway.sinks import Sink, access_log, metrics_sink
from gateway.state import HealthStore, MemoryHealthStore, RedisHealthStore
from gateway.telemetry import Telemetry
from gateway.upstream import ConnectTiming

_log = get_logger("gateway")


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


def _client_ctx(runtime: Runtime, timed: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """The upstream HTTP client; `timed`: with the connect-timing hooks (only spans use them:
    aiohttp runs its trace machinery for every request once any hook is configured)."""

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
            trace_configs=[_connect_trace()] if timed else None,
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
    verifier = app[RUNTIME].current.jwt
    if verifier is not None:
        await verifier.start(app[HTTP_CLIENT])
    yield
    # The one in use at the end (a reload may have replaced the first).
    verifier = app[RUNTIME].current.jwt
    if verifier is not None:
        await verifier.close()


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # The exporter's final flush is blocking I/O (up to its timeout when the collector is
    # down): off the event loop.
    await asyncio.to_thread(app[TELEMETRY].shutdown)


async def with_jwt(app: web.Application, old: Runtime, new: Runtime) -> Runtime:
    """`new` with its JWT verifier, ready to be swapped in: the running one when `auth.jwt` is
    unchanged, else a new one that has fetched its keys (the caller closes the old one once
    the swap is done: `retire_jwt`). Raises ValueError for a bad PEM file."""
    config = new.config.auth.jwt
    if config == old.config.auth.jwt:
        return dataclasses.replace(new, jwt=old.jwt)
    verifier = JwtVerifier(config) if config is not None else None
    if verifier is not None:
        await verifier.start(app[HTTP_CLIENT])
    return dataclasses.replace(new, jwt=verifier)


async def retire_jwt(old: Runtime, new: Runtime) -> None:
    """After a swap: close the old runtime's verifier if the new one does not use it."""
    if old.jwt is not None and old.jwt is not new.jwt:
        await old.jwt.close()


def _resume_ctx(config: GatewayConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """The resumable-stream store `resume.store` asks for (one per process)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        resume = config.resume
        store: ReplayStore
        if resume.store == "redis":
            from gateway.resume.redis_store import RedisStore  # noqa: PLC0415

            # A live stream's keys outlive the longest request (a writer that died leaves them).
            longest = max(
                [config.policy.timeouts.total_s]
                + [m.policy.timeouts.total_s or 0 for m in config.models.values()]
            )
            store = RedisStore(
                config.state.redis_url,
                prefix=config.state.key_prefix,
                live_ttl_s=longest + resume.ttl_s,
            )
        else:
            store = MemoryStore(memory_bytes=resume.memory_bytes)
        app[RESUME_STORE] = store
        app[RESUME_READERS] = Readers()
        yield
        await store.close()

    return ctx


async def _draining(app: web.Application) -> None:
    # Shutdown has begun (the listener is closed; open requests drain): not ready any more.
    app[OPS].draining = True


def create_app(
    runtime: Runtime,
    limiter: Limiter | None = None,
    *,
    telemetry: Telemetry | None = None,
    config_state: ConfigState | None = None,
) -> web.Application:
    """The gateway application for `runtime` (swap `app[RUNTIME].current` to reload). With an
    `admin` section, the admin listener runs alongside it (gateway/admin.py)."""
    # Bodies are read by the handlers with the runtime's own bound (413 in the caller's format).
    app = web.Application(middlewares=[error_middleware], client_max_size=2**63)
    jwt_config = runtime.config.auth.jwt
    if runtime.jwt is None and jwt_config is not None:
        runtime = dataclasses.replace(runtime, jwt=JwtVerifier(jwt_config))
    app[RUNTIME] = RuntimeHolder(runtime)
    app[RANDOM] = random.Random()  # noqa: S311  (backoff jitter, not a secret)
    budget = BodyBudget(runtime.server.max_body_bytes_in_flight)
    app[LIMITER] = limiter if limiter is not None else build_limiter(runtime)
    tel = telemetry if telemetry is not None else Telemetry(runtime.telemetry)
    app[TELEMETRY] = tel
    if config_state is None:
        config_state = ConfigState(
            None, time.time(), file_digest(orjson.dumps(runtime.config.model_dump(mode="json")))
        )
    ops = app[OPS] = Ops(config_state)
    queue = app[QUEUE] = CapacityQueue()
    app[HEDGES] = HedgeStats()
    app[BUDGETS] = BudgetTallies()
    # A released key is offered to the queue's waiters first (the counts outlive reloads).
    runtime.in_flight.on_release = queue.offer
    sinks: list[Sink] = [metrics_sink(tel.metrics), ops.window.record]
    if runtime.telemetry.access_log:
        sinks.append(access_log)
    app[OUTCOME_SINKS] = sinks
    app.on_shutdown.append(_draining)
    admin = runtime.config.admin
    if admin is not None:
        # First in, last out: the admin listener answers (/readyz: 503) through the drain.
        from gateway.admin import admin_ctx  # noqa: PLC0415

        app.cleanup_ctx.append(admin_ctx(admin))
    # Order matters: the HTTP client first (the JWKS fetch uses it), torn down last.
    app.cleanup_ctx.append(_client_ctx(runtime, tel.enabled))
    app.cleanup_ctx.append(_resume_ctx(runtime.config))
    app.cleanup_ctx.append(_limiter_ctx(app[LIMITER]))
    app.cleanup_ctx.append(_jwt_ctx)
    app.cleanup_ctx.append(_health_ctx)
    app.cleanup_ctx.append(_telemetry_ctx)
    for endpoint in ENDPOINTS:
        handler = Handler(endpoint, budget, capture_content=tel.capture_content)
        app.router.add_post(endpoint.path, handler.handle)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/v1/models/{model_id}", model_handler)
    app.router.add_get("/healthz", health_handler)
    app.router.add_get("/v1/streams/{stream_id}", resume_handler)
    return app


__all__ = ["create_app"]
