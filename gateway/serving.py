"""The HTTP server around the application: listener, connection bounds, and the answer to
requests too malformed to reach any handler.

aiohttp answers a request it cannot parse (a header line over its limit, too many headers, a
bad request line) before the application sees it, as `text/plain` that echoes the first 100
bytes of the offending line, and it logs the exception with that line. For a gateway that
line is usually `Authorization: Bearer <key>`. `GatewayRequestHandler` answers such requests
with a JSON error both SDKs parse and logs only the error's class.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.appkeys import OPS
from gateway.logs import get_logger
from gateway.render import malformed_request
from gateway.report import new_request_id

_log = get_logger("gateway")

# aiohttp's default bound on one header line; raised to fit the configured token size.
DEFAULT_FIELD_BYTES = 8190
# Room for the header name, "Bearer " and whitespace around a token of the configured size.
_HEADER_OVERHEAD = 256


def header_field_limit(max_token_bytes: int) -> int:
    """aiohttp's per-header bound for a gateway that accepts tokens of `max_token_bytes`."""
    return max(DEFAULT_FIELD_BYTES, max_token_bytes + _HEADER_OVERHEAD)


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering unparseable requests in JSON without echoing
    or logging what the client sent."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too many headers" in str(exc.message).lower()
        ):
            status = 431
            text = (
                "A request header (or the request line) is larger than this gateway accepts, "
                f"or there are too many headers (limit {self.max_field_size} bytes a header)."
            )
        else:
            status = 400
            text = "The request is not valid HTTP/1.1."
        request_id = new_request_id()
        # The exception's text holds the start of the offending line: never logged.
        _log.warning(
            "malformed request", status=status, error=type(exc).__name__, request_id=request_id
        )
        return malformed_request(status, text, request_id)

    def close_after_response(self) -> None:
        """Close this connection as soon as the current response is sent, without reading
        (lingering over) the rest of an unfinished request body first: for a body that
        trickled past its time limit, that rest may never come."""
        self._lingering_time = 0.0


def close_after_response(request: web.BaseRequest) -> None:
    """See `GatewayRequestHandler.close_after_response` (a no-op on other servers)."""
    protocol = request.protocol
    if isinstance(protocol, GatewayRequestHandler):
        protocol.close_after_response()


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are `GatewayRequestHandler`s."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside the application; only the protocol factory differs.
        server.__class__ = _GatewayServer
        return server


def make_runner(
    app: web.Application,
    *,
    keepalive_timeout_s: float,
    max_field_size: int,
    shutdown_timeout_s: float = 60.0,
    **kwargs: Any,
) -> GatewayRunner:
    """The runner `gateway serve` and the tests use: handler cancellation on client
    disconnect, no aiohttp access log (the gateway writes its own), the connection bounds."""
    return GatewayRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=keepalive_timeout_s,
        max_field_size=max_field_size,
        shutdown_timeout=shutdown_timeout_s,
        **kwargs,
    )


async def serve(
    runner: GatewayRunner,
    host: str,
    port: int,
    *,
    backlog: int,
    reuse_port: bool,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain (open requests get the runner's shutdown
    timeout) and clean up."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    await runner.setup()
    ops = runner.app[OPS]

    def on_stop() -> None:
        ops.draining = True  # /readyz answers 503 from this moment (the admin listener stays)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    try:
        site = web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port or None)
        await site.start()
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
