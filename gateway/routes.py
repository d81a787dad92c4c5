"""The gateway's small endpoints (model lists, health) and the middleware that gives
every request an id and answers every error a handler did not answer itself."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import RUNTIME
from gateway.auth import authenticate
from gateway.config.runtime import Runtime
from gateway.errors import GatewayError, Kind
from gateway.handler import REQUEST_ID
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.providers import WIRE_APIS, caller_api
from gateway.render import error_response
from gateway.report import new_request_id

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
    family = caller_api(request.path, request.headers)
    try:
        response = await handler(request)
    except GatewayError as err:
        return error_response(family, err, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind, template = _HTTP_KINDS.get(exc.status, (Kind.INVALID_REQUEST, "{reason}"))
        message = template.format(
            path=request.path[:200], method=request.method[:16], reason=exc.reason
        )
        return error_response(family, GatewayError(exc.status, kind, message), request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("unhandled error", path=request.path[:200], request_id=request_id)
        error = GatewayError(500, Kind.INTERNAL, "Internal gateway error.")
        return error_response(family, error, request_id)
    if not response.prepared:
        response.headers.setdefault(WIRE_APIS[family].request_id_header, request_id)
    return response


async def models_handler(request: web.Request) -> web.Response:
    """`GET /v1/models`: the models this caller may use through the API it speaks (the
    Anthropic SDK is offered only models /v1/messages serves, the OpenAI SDK only those of
    the OpenAI API), in that API's list format."""
    runtime = request.app[RUNTIME].current
    caller = await authenticate(request.headers, runtime, runtime.jwt)
    family = caller_api(request.path, request.headers)
    names = [r.name for r in runtime.models_for(caller) if r.family is family]
    return _json(WIRE_APIS[family].model_list(names))


async def model_handler(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}`: one model in the caller's API format; 404 in that format for an
    id it may not use, does not exist, or is served through the other API."""
    runtime = request.app[RUNTIME].current
    caller = await authenticate(request.headers, runtime, runtime.jwt)
    family = caller_api(request.path, request.headers)
    model_id = request.match_info["model_id"]
    route = runtime.routes.get(model_id)
    if route is None or not caller.may_use(model_id) or route.family is not family:
        raise GatewayError(
            404,
            Kind.NOT_FOUND,
            f"The model '{model_id[:256]}' does not exist or you do not have access to it.",
            param="model",
        )
    return _json(WIRE_APIS[family].model_object(route.name))


async def health_handler(request: web.Request) -> web.Response:
    """`GET /healthz`: the process is up and serving (no auth, no upstream calls)."""
    return _json({"status": "ok", "version": __version__, "pid": os.getpid(), "time": time.time()})


def refresh_key_metrics(metrics: Metrics, runtime: Runtime) -> None:
    """Key pool states and in-flight counts, read at scrape time (the admin listener's
    /metrics)."""
    now = time.time()
    for name, pool in runtime.pools.items():
        for key, state, in_flight in pool.key_states(now):
            for candidate in ("ok", "cooldown", "disabled"):
                metrics.child(metrics.key_state, name, key.id, candidate).set(
                    1 if candidate == state else 0
                )
            metrics.child(metrics.key_in_flight, name, key.id).set(in_flight)


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")
