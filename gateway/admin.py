"""The admin listener: a second port for operators and on-call, never for callers.

    GET  /metrics                      Prometheus text (open; a Bearer token is accepted too)
    GET  /healthz                      the process is up
    GET  /readyz                       200 when it should get traffic, else 503 naming why
    GET  /admin/keys                   per provider and key: state, until, reason, in flight
    GET  /admin/streams                the open streams
    POST /admin/streams/{id}/cancel    end one (its client gets the terminal error event)
    GET  /admin/limits/{caller_id}     that caller's tier and what is left of each limit
    GET  /status                       the on-call page (HTML, refreshes itself)
    GET  /status/data                  the page's figures as JSON

Everything but /metrics, /healthz and /readyz needs `admin.token` as `Authorization: Bearer`;
the page may also be opened once as `/status?token=...`, which sets an HttpOnly cookie and
redirects to /status without the token (the cookie is good for GET /status and /status/data
only: a cookie alone never cancels a stream). Answers are JSON, errors too. Nothing here shows
a secret, a caller key or prompt text: keys appear as id and fingerprint.

The listener is started and stopped by the public application (`admin_ctx`), and stopped
last: through a drain, /readyz keeps answering 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.appkeys import LIMITER, OPS, RUNTIME, TELEMETRY
from gateway.config.runtime import Caller, Runtime
from gateway.config.schema import AdminConfig
from gateway.limits.base import Limiter, LimiterUnavailable, LimitSpec
from gateway.limits.budget import NANO, BudgetSpec, BudgetState
from gateway.logs import get_logger
from gateway.ops import Ops
from gateway.report import Outcome
from gateway.routes import refresh_key_metrics
from gateway.status_page import render_status_page

_log = get_logger("gateway.admin")

MAIN_APP = web.AppKey("main_app", web.Application)
_TOKEN = web.AppKey("admin_token_digest", bytes)
_COOKIE = "gateway_admin"
_COOKIE_CONTEXT = b"llm-gateway status cookie v1"
# How long a cancel waits for its stream to end before answering (the stream ends anyway).
_CANCEL_WAIT_S = 5.0
_STATUS_STREAMS = 50
_MAX_ID = 256


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _cookie_value(digest: bytes) -> str:
    """What the status cookie holds: derived from the token, never the token itself."""
    return hmac.new(digest, _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


def _bearer_ok(request: web.Request, digest: bytes) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    offered = hashlib.sha256(token.strip().encode(errors="replace")).digest()
    return hmac.compare_digest(offered, digest)


def _cookie_ok(request: web.Request, digest: bytes) -> bool:
    cookie = request.cookies.get(_COOKIE)
    if cookie is None:
        return False
    offered = cookie.encode(errors="replace")
    return hmac.compare_digest(offered, _cookie_value(digest).encode())


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths open without a token; and those a status cookie opens (GET only).
_OPEN = frozenset({"/metrics", "/healthz", "/readyz"})
_COOKIE_PATHS = frozenset({"/status", "/status/data"})


@web.middleware
async def _auth_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    digest = request.app[_TOKEN]
    path = request.path
    if path in _OPEN:
        return await _answer_errors(request, handler)
    if _bearer_ok(request, digest) or (
        request.method == "GET" and path in _COOKIE_PATHS and _cookie_ok(request, digest)
    ):
        return await _answer_errors(request, handler)
    if path == "/status" and request.method == "GET" and "token" in request.query:
        return _login(request, digest)
    return _error(
        401,
        "unauthorized",
        "This endpoint needs the admin token (Authorization: Bearer <admin.token>).",
    )


async def _answer_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("admin endpoint failed", path=request.path[:200])
        return _error(500, "internal", "Internal error in the admin listener.")


def _login(request: web.Request, digest: bytes) -> web.StreamResponse:
    """`/status?token=...`: a good token becomes a cookie, and the token leaves the URL."""
    offered = hashlib.sha256(request.query["token"].encode(errors="replace")).digest()
    if not hmac.compare_digest(offered, digest):
        return _error(401, "unauthorized", "The admin token is not valid.")
    response = web.HTTPSeeOther("/status")
    response.set_cookie(_COOKIE, _cookie_value(digest), httponly=True, samesite="Strict", path="/")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


# -- the endpoints ------------------------------------------------------------------------------


def _main(request: web.Request) -> web.Application:
    return request.app[MAIN_APP]


async def metrics(request: web.Request) -> web.Response:
    main = _main(request)
    tel = main[TELEMETRY]
    refresh_key_metrics(tel.metrics, main[RUNTIME].current)
    return web.Response(
        body=tel.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "version": __version__, "pid": os.getpid(), "time": time.time()})


async def readiness(main: web.Application) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether this process should get traffic, and each check's verdict."""
    ops: Ops = main[OPS]
    runtime: Runtime = main[RUNTIME].current
    checks: dict[str, dict[str, Any]] = {}
    last = ops.config.last_reload
    detail = f"loaded {time.time() - ops.config.loaded_at:.0f} s ago ({ops.config.digest[:19]})"
    if last is not None and not last.ok:
        detail += "; the last reload was rejected (the config loaded before it serves)"
    checks["config"] = {"ok": True, "detail": detail}
    checks["draining"] = {
        "ok": not ops.draining,
        "detail": "draining: finishing open requests before exit" if ops.draining else "serving",
    }
    checks["limiter"] = await _limiter_check(main[LIMITER])
    now = time.time()
    starved = []
    for name, pool in runtime.pools.items():
        if pool.usable_keys(now) == 0:
            starved.append(name)
    checks["providers"] = {
        "ok": not starved,
        "detail": (
            f"no usable key (all cooling down or disabled): {', '.join(sorted(starved))}"
            if starved
            else f"{len(runtime.pools)} providers, each with a usable key"
        ),
    }
    return all(c["ok"] for c in checks.values()), checks


async def _limiter_check(limiter: Limiter) -> dict[str, Any]:
    ping = getattr(limiter, "ping", None)
    if ping is None:
        return {"ok": True, "detail": f"{limiter.name} (in this process)", "backend": limiter.name}
    ok = bool(await ping())
    return {
        "ok": ok,
        "detail": "redis answers" if ok else "redis does not answer",
        "backend": limiter.name,
    }


async def readyz(request: web.Request) -> web.Response:
    ready, checks = await readiness(_main(request))
    return _json({"ready": ready, "checks": checks}, 200 if ready else 503)


def key_table(runtime: Runtime, now: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, pool in runtime.pools.items():
        for view in pool.key_views(now):
            rows.append({"provider": name, **view})
    return rows


async def admin_keys(request: web.Request) -> web.Response:
    runtime = _main(request)[RUNTIME].current
    now = time.time()
    providers: dict[str, Any] = {}
    for name, pool in runtime.pools.items():
        backoff = pool.provider_blocked_until(now)
        providers[name] = {
            "strategy": pool.strategy,
            "max_concurrent_per_key": pool.max_concurrent_per_key,
            "backoff_until": round(backoff, 3) if backoff is not None else None,
            "keys": pool.key_views(now),
        }
    return _json({"time": round(now, 3), "providers": providers})


async def admin_streams(request: web.Request) -> web.Response:
    streams = _main(request)[OPS].streams
    return _json({"count": len(streams), "streams": streams.views()})


async def admin_cancel(request: web.Request) -> web.Response:
    stream_id = request.match_info["stream_id"][:_MAX_ID]
    streams = _main(request)[OPS].streams
    live = streams.get(stream_id)
    if live is None:
        return _error(404, "not_found", "No open stream has this id (it may have ended).")
    if not live.owner.stop(Outcome.OPERATOR_CANCEL):
        return _error(409, "already_ending", "This stream is already ending.")
    _log.warning(
        "stream cancelled by operator",
        stream_id=stream_id,
        caller=live.caller,
        model=live.model,
        deployment=live.deployment,
    )
    ended = await streams.wait_ended(stream_id, _CANCEL_WAIT_S)
    return _json({"id": stream_id, "cancelled": True, "ended": ended}, 200 if ended else 202)


async def admin_limits(request: web.Request) -> web.Response:
    main = _main(request)
    runtime: Runtime = main[RUNTIME].current
    caller_id = request.match_info["caller_id"][:_MAX_ID]
    caller, source = _caller(main, runtime, caller_id, request.query.get("tier"))
    if caller is None:
        return _error(404, "not_found", "No API key has this caller id, and JWT is not configured.")
    open_here = sum(1 for s in main[OPS].streams if s.caller == caller_id)
    body: dict[str, Any] = {
        "caller": caller_id,
        "source": source,
        "tier": caller.tier,
        "models": sorted(caller.models) if caller.models is not None else None,
        "open_streams_this_instance": open_here,
        "limits": None,
    }
    spec = caller.limits
    if spec is not None:
        standing = await main[LIMITER].peek(caller_id, spec)
        body["backend"] = standing.backend
        body["degraded"] = standing.degraded
        body["limits"] = _limit_views(spec, standing.usage)
    budget = caller.budget
    body["budgets"] = None
    if budget is not None:
        try:
            state = await main[LIMITER].budget(caller_id, budget, 0, 0)  # reads, charges nothing
        except LimiterUnavailable:
            body["budgets"] = {"unavailable": True}
        else:
            body["budgets"] = _budget_views(budget, state)
    return _json(body)


def _budget_views(spec: BudgetSpec, state: BudgetState) -> dict[str, Any]:
    """Each budget set: limit, used, remaining, the window (UTC) and when it is whole again.
    Costs in currency units, as configured."""
    windows = state.windows
    spec = spec.scaled(state.divisor)  # the local fallback's share while Redis is down
    views: dict[str, Any] = {
        "backend": state.backend,
        "degraded": state.degraded,
        "day": windows.day,
        "month": windows.month,
    }
    for name, limit, used, ends, cost in (
        ("tokens_per_day", spec.tokens_per_day, state.tokens_day, windows.day_end, False),
        ("tokens_per_month", spec.tokens_per_month, state.tokens_month, windows.month_end, False),
        ("cost_per_day", spec.cost_per_day, state.cost_day, windows.day_end, True),
        ("cost_per_month", spec.cost_per_month, state.cost_month, windows.month_end, True),
    ):
        if limit is None:
            continue
        scale = NANO if cost else 1
        views[name] = {
            "limit": limit / scale if cost else limit,
            "used": used / scale if cost else used,
            "remaining": max(0, limit - used) / scale if cost else max(0, limit - used),
            "spent": used >= limit,
            "whole_again_in_s": round(ends - state.now, 3),
        }
    return views


def _caller(
    main: web.Application, runtime: Runtime, caller_id: str, tier: str | None
) -> tuple[Caller | None, str]:
    digest = runtime.digests.get(caller_id)
    if digest is not None:
        return runtime.callers[digest], "api_key"
    if runtime.jwt is None:
        return None, ""
    # A JWT subject: its tier comes with each token; `?tier=` asks about one (default: the
    # configured default tier).
    from gateway.config.runtime import make_caller  # noqa: PLC0415

    name = tier or runtime.default_tier
    return make_caller(caller_id, runtime.tiers.get(name) if name else None, None), "jwt"


def _limit_views(spec: LimitSpec, usage: tuple[Any, ...]) -> dict[str, Any]:
    views: dict[str, Any] = {}
    names = {
        "rpm": "requests_per_minute",
        "tpm": "tokens_per_minute",
        "concurrency": "concurrent_streams",
        "requests": "concurrent_requests",
    }
    for u in usage:
        view: dict[str, Any] = {"limit": u.limit, "remaining": u.remaining}
        if u.name in ("rpm", "tpm"):
            view["used"] = u.limit - u.remaining
            view["full_again_in_s"] = round(u.reset_s, 3)
        else:
            view["open"] = u.limit - u.remaining
        views[names[u.name]] = view
    return views


async def status_data(main: web.Application) -> dict[str, Any]:
    ops: Ops = main[OPS]
    runtime: Runtime = main[RUNTIME].current
    limiter: Limiter = main[LIMITER]
    ready, checks = await readiness(main)
    now = time.time()
    models = ops.window.summary()
    limiter_check = checks["limiter"]
    return {
        "generated_at": round(now, 3),
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(now - ops.started, 1),
        "ready": ready,
        "draining": ops.draining,
        "checks": checks,
        "live_streams": len(ops.streams),
        "requests_per_s": round(sum(m["requests"] for m in models) / ops.window.window_s, 3),
        "window_s": ops.window.window_s,
        "models": models,
        "keys": key_table(runtime, now),
        "limiter": {
            "backend": limiter.name,
            "healthy": limiter_check["ok"],
            "detail": limiter_check["detail"],
            "degraded_decisions": getattr(limiter, "degraded_decisions", 0),
            "redis_errors": getattr(limiter, "redis_errors", 0),
        },
        "config": ops.config.view(),
        "streams": ops.streams.views(_STATUS_STREAMS),
    }


async def status(request: web.Request) -> web.Response:
    data = await status_data(_main(request))
    return web.Response(
        text=render_status_page(data),
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            # Inline script and style only: nothing is loaded from anywhere.
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            ),
        },
    )


async def status_json(request: web.Request) -> web.Response:
    return _json(await status_data(_main(request)))


def create_admin_app(main: web.Application, config: AdminConfig) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware], client_max_size=64 * 1024)
    app[MAIN_APP] = main
    app[_TOKEN] = hashlib.sha256(config.token.get_secret_value().encode()).digest()
    if main[RUNTIME].current.telemetry.prometheus:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/keys", admin_keys)
    app.router.add_get("/admin/streams", admin_streams)
    app.router.add_post("/admin/streams/{stream_id}/cancel", admin_cancel)
    app.router.add_get("/admin/limits/{caller_id}", admin_limits)
    app.router.add_get("/status", status)
    app.router.add_get("/status/data", status_json)
    return app


def admin_ctx(
    config: AdminConfig,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context of the public app: the admin listener runs while the app does, and is
    closed after the public app's drain."""

    async def ctx(main: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(
            create_admin_app(main, config), access_log=None, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        main[OPS].admin_url = f"http://{host}:{port}"
        yield
        await runner.cleanup()

    return ctx


__all__ = ["admin_ctx", "create_admin_app", "readiness", "status_data"]
