"""`create_app`: the one place that wires routes, middlewares and resources."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import (
    HTTP_CLIENT,
    OUTCOME_SINKS,
    RANDOM,
    RUNTIME,
    OutcomeSink,
    RuntimeHolder,
)
from gateway.auth import authenticate
from gateway.config.runtime import Runtime
from gateway.errors import GatewayError, Kind
from gateway.logs import get_logger
from gateway.pipeline import Handler, access_log, family_for_path, gateway_error_response
from gateway.providers import ENDPOINTS

_log = get_logger("gateway")

_HTTP_KINDS = {
    404: (Kind.ROUTE_NOT_FOUND, "Unknown path: {path}"),
    405: (Kind.METHOD_NOT_ALLOWED, "Method {method} is not allowed on {path}"),
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every error the handlers did not answer themselves in the caller's format."""
    try:
        return await handler(request)
    except GatewayError as err:
        return gateway_error_response(family_for_path(request.path, request.headers), err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind, template = _HTTP_KINDS.get(exc.status, (Kind.INVALID_REQUEST, "{reason}"))
        message = template.format(
            path=request.path[:200], method=request.method[:16], reason=exc.reason
        )
        return gateway_error_response(
            family_for_path(request.path, request.headers), GatewayError(exc.status, kind, message)
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("unhandled error", path=request.path[:200])
        return gateway_error_response(
            family_for_path(request.path, request.headers),
            GatewayError(500, Kind.INTERNAL, "Internal gateway error."),
        )


async def models_handler(request: web.Request) -> web.Response:
    """`GET /v1/models`: the models this caller may use, in the caller's API format."""
    runtime = request.app[RUNTIME].current
    caller = authenticate(request.headers, runtime)
    routes = runtime.models_for(caller)
    if "anthropic-version" in request.headers:
        data = [
            {
                "type": "model",
                "id": r.name,
                "display_name": r.name,
                "created_at": "1970-01-01T00:00:00Z",
            }
            for r in routes
        ]
        body = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    else:
        body = {
            "object": "list",
            "data": [
                {"id": r.name, "object": "model", "created": 0, "owned_by": "llm-gateway"}
                for r in routes
            ],
        }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def health_handler(request: web.Request) -> web.Response:
    """`GET /healthz`: the process is up and serving (no auth, no upstream calls)."""
    return web.Response(
        body=orjson.dumps({"status": "ok", "version": __version__, "time": time.time()}),
        content_type="application/json",
    )


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
        )
        app[HTTP_CLIENT] = session
        yield
        await session.close()

    return ctx


def create_app(runtime: Runtime) -> web.Application:
    """The gateway application for `runtime` (swap `app[RUNTIME].current` to reload)."""
    # Bodies are read by the handlers with the runtime's own bound (413 in the caller's format).
    app = web.Application(middlewares=[error_middleware], client_max_size=2**63)
    app[RUNTIME] = RuntimeHolder(runtime)
    app[RANDOM] = random.Random()  # noqa: S311  (backoff jitter, not a secret)
    sinks: list[OutcomeSink] = [access_log] if runtime.telemetry.access_log else []
    app[OUTCOME_SINKS] = sinks
    app.cleanup_ctx.append(_client_ctx(runtime))
    for endpoint in ENDPOINTS:
        app.router.add_post(endpoint.path, Handler(endpoint).handle)
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/healthz", health_handler)
    return app


__all__ = ["create_app"]
