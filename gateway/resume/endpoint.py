"""`GET /v1/streams/{id}?offset=N`: reattach to a resumable stream.

The answer is the stream's client-visible bytes from byte N on (`Last-Event-ID: N` works in
place of `offset`, for EventSource clients), live while the upstream is still sending, then the
end. The caller must be the stream's own (same API key id or JWT subject); anyone else, an
unknown id and an expired one get the same 404, in the format of the caller's own credentials
(nothing tells another caller that the id exists, or which API it speaks). The owner's answers
are in the stream's API format. An offset past the bytes relayed is a 416 (while the stream is
live, after waiting briefly for a shared store to catch up with the writer: its appends reach
Redis a moment after they reach the client); a stream that outgrew `resume.max_stream_bytes` a
410.
"""

from __future__ import annotations

import asyncio
import re
import time

from aiohttp import web

from gateway.appkeys import RESUME_READERS, RESUME_STORE, RUNTIME, TELEMETRY
from gateway.auth import authenticate
from gateway.errors import GatewayError, Kind
from gateway.handler import REQUEST_ID
from gateway.logs import get_logger
from gateway.ops import STREAM_ID_HEADER
from gateway.providers import WIRE_APIS, caller_api
from gateway.providers.base import ApiFamily
from gateway.render import error_response
from gateway.resume.store import ReplayStore, StreamCut

_log = get_logger("gateway.resume")
_ID = re.compile(r"^gs_[A-Za-z0-9_-]{16,64}$")
_MAX_OFFSET = 1 << 40
# How long a reattach past the bytes a shared store has waits for the writer's appends.
_CATCH_UP_S = 2.0
_NOT_FOUND = "No resumable stream has this id for this caller (it may have expired)."


def _offset(request: web.Request) -> int:
    raw = request.query.get("offset")
    if raw is None:
        raw = request.headers.get("Last-Event-ID", "0")
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 13 or int(raw) > _MAX_OFFSET:
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            "offset (or Last-Event-ID) must be a byte count: a whole number >= 0.",
            param="offset",
        )
    return int(raw)


async def resume_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    runtime = app[RUNTIME].current
    metrics = app[TELEMETRY].metrics
    stream_id = request.match_info["stream_id"]
    family = caller_api(request.path, request.headers)
    if not runtime.config.resume.enabled:
        raise GatewayError(404, Kind.STREAM_NOT_FOUND, "Resumable streams are not enabled here.")
    caller = await authenticate(request.headers, runtime, runtime.jwt)
    offset = _offset(request)
    store = app[RESUME_STORE]
    meta = await store.meta(stream_id) if _ID.match(stream_id) else None
    request_id = request.get(REQUEST_ID) or ""

    def refuse(status: int, kind: Kind, message: str, result: str) -> web.Response:
        metrics.child(metrics.stream_resumes, result).inc()
        return error_response(family, GatewayError(status, kind, message), request_id)

    if meta is None or meta.caller != caller.id:
        return refuse(404, Kind.STREAM_NOT_FOUND, _NOT_FOUND, "not_found")
    family = ApiFamily(meta.family)
    deadline = time.monotonic() + _CATCH_UP_S
    while offset > meta.length and not meta.ended and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        meta = await store.meta(stream_id) or meta
    if meta.oversize:
        return refuse(
            410,
            Kind.GONE,
            "This stream outgrew the gateway's resume buffer (resume.max_stream_bytes) and "
            "cannot be resumed.",
            "gone",
        )
    if offset > meta.length:
        return refuse(
            416,
            Kind.RANGE,
            f"offset {offset} is past the {meta.length} bytes this stream has relayed.",
            "range",
        )
    readers = app[RESUME_READERS]
    resume = runtime.config.resume
    if (
        readers.per_stream.get(stream_id, 0) >= resume.max_readers_per_stream
        or readers.per_caller.get(caller.id, 0) >= resume.max_readers_per_caller
    ):
        metrics.child(metrics.stream_resumes, "busy").inc()
        return error_response(
            family,
            GatewayError(
                429,
                Kind.RATE_LIMITED,
                "Too many reattaches open at once for this stream or this caller "
                "(resume.max_readers_per_stream / max_readers_per_caller).",
                headers={"retry-after": "1"},
            ),
            request_id,
        )
    metrics.child(metrics.stream_resumes, "ok").inc()
    with readers.open(stream_id, caller.id):
        return await _replay(request, store, stream_id, offset, family, request_id, caller.id)


async def _replay(
    request: web.Request,
    store: ReplayStore,
    stream_id: str,
    offset: int,
    family: ApiFamily,
    request_id: str,
    caller_id: str,
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            STREAM_ID_HEADER: stream_id,
            "x-gateway-stream-offset": str(offset),
            WIRE_APIS[family].request_id_header: request_id,
        },
    )
    await response.prepare(request)
    started = time.perf_counter()
    sent = 0
    try:
        async for data in store.read(stream_id, offset):
            await response.write(data)
            sent += len(data)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away again: it may reattach once more
    except StreamCut:
        # The first connection saw this stream break (or its bytes are gone): so does this one.
        if request.transport is not None:
            request.transport.abort()
    finally:
        _log.info(
            "stream reattached",
            stream_id=stream_id,
            caller=caller_id,
            offset=offset,
            bytes_out=sent,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            request_id=request_id,
        )
    return response
