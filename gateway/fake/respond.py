"""Answering one request on the wire as its script says: the scripted head (delays, resets,
raw and error statuses), JSON bodies, and event streams with their scripted endings.

Every function takes the `Exchange` and records on its `RequestRecord` what was sent and how
the answer ended; a client that goes away is reported through ``Exchange.disconnected``.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.fake.errors import ErrorAnswer
from gateway.fake.records import Outcome, RequestRecord, key_echo
from gateway.fake.script import STALL_CAP_S, FakeScript
from gateway.fake.wire import StreamPlan, Wire
from gateway.fake.writer import Writer, compressed


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request being answered, and what answering it reports to the provider."""

    request: web.Request
    wire: Wire
    record: RequestRecord
    # Whether RequestRecord.sent keeps the body bytes (FakeProvider.record_sent).
    keep_sent: bool
    # The provider's bookkeeping: the client went away; a record changed (wakes waiters).
    disconnected: Callable[[RequestRecord], None]
    changed: Callable[[], None]

    @property
    def headers(self) -> dict[str, str]:
        """The headers every answer carries: the request id, named as the wire names it."""
        name = "x-request-id" if self.wire == "openai" else "request-id"
        return {name: self.record.request_id}


def finish(record: RequestRecord, outcome: Outcome) -> None:
    """Record that the script was carried out, ending as ``outcome``."""
    record.completed = True
    record.outcome = outcome


def abort(ex: Exchange) -> None:
    """Reset the connection at once (outcome ``reset``)."""
    transport = ex.request.transport
    if transport is not None:
        transport.abort()
    finish(ex.record, "reset")


async def scripted_head(ex: Exchange) -> web.StreamResponse | None:
    """Carry out what the script does before (or instead of) a normal answer.

    Sleeps ``headers_delay_ms``, then carries out the first of ``reset_before_headers``,
    ``raw_status`` and ``status``. Returns the response when one of those answered, else
    None (the caller answers normally).
    """
    script = ex.record.script
    if script.headers_delay_ms:
        await asyncio.sleep(script.headers_delay_ms / 1000)
    if script.reset_before_headers:
        abort(ex)
        return web.Response(status=500)  # never sent: the connection is gone
    if script.raw_status is not None:
        return await send_raw(ex, script.raw_status)
    if script.status is not None:
        answer = ErrorAnswer.scripted(script, script.status, key_echo(ex.record))
        return await send_error(ex, answer)
    return None


async def send_error(ex: Exchange, answer: ErrorAnswer) -> web.StreamResponse:
    """Answer with an error status, its body in the route's wire format."""
    payload = answer.body(ex.wire, ex.record.request_id)
    return await send_json(ex, answer.status, payload, {**ex.headers, **answer.headers})


async def serve_body(ex: Exchange, payload: bytes) -> web.StreamResponse:
    """Answer with the JSON ``payload`` (status 200) once the scripted head allows it.

    A non-stream answer has no chunks to count: any stall hangs before the headers.
    """
    scripted = await scripted_head(ex)
    if scripted is not None:
        return scripted
    if ex.record.script.stall_after is not None:
        await asyncio.sleep(STALL_CAP_S)
    return await send_json(ex, 200, payload, ex.headers, scripted=True)


async def send_json(
    ex: Exchange,
    status: int,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    scripted: bool = False,
) -> web.StreamResponse:
    """Send a JSON answer, compressed under ``content_encoding``.

    ``scripted`` (the 200 of a non-stream answer) also honours ``first_delay_ms``,
    ``split_seed`` and ``truncate_after``.
    """
    record = ex.record
    script = record.script
    payload = compressed(payload, script.content_encoding)
    resp = await _start_json(ex, status, len(payload), headers)
    if scripted and script.first_delay_ms:
        await asyncio.sleep(script.first_delay_ms / 1000)
    writer = Writer(resp, record, script.split_seed if scripted else None, keep=ex.keep_sent)
    if scripted and script.truncate_after is not None:
        # Without chunks to count, a truncated JSON answer is half its body, then a reset:
        # with a Content-Length, no clean ending is possible.
        try:
            await writer.write(payload[: len(payload) // 2])
        except ConnectionError:
            ex.disconnected(record)
            return resp
        abort(ex)
        return resp
    try:
        await writer.write(payload)
        await resp.write_eof()
    except ConnectionError:
        ex.disconnected(record)
        return resp
    finish(record, "complete" if status < 400 else "error_status")
    return resp


async def _start_json(
    ex: Exchange, status: int, length: int, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Send the head of a JSON answer of ``length`` body bytes."""
    encoding = ex.record.script.content_encoding
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type = "application/json"
    resp.content_length = length
    if encoding is not None:
        resp.headers["Content-Encoding"] = encoding
    await resp.prepare(ex.request)
    ex.record.status = status
    return resp


# ---- raw statuses -------------------------------------------------------------------------


async def send_raw(ex: Exchange, status: int) -> web.StreamResponse:
    """Write ``raw_status`` as raw HTTP/1.1 on the transport (see `FakeScript.raw_status`).

    Returns a response aiohttp can never send: the transport is closing (a final status)
    or gone (the client left a held 1xx), so aiohttp treats it as a disconnect.
    """
    transport = ex.request.transport
    if transport is None or transport.is_closing():
        ex.disconnected(ex.record)
        return web.Response(status=500)
    if status < 200:
        await _hold_informational(ex, transport, status)
        return web.Response(status=500)
    answer = ErrorAnswer.scripted(ex.record.script, status, key_echo(ex.record))
    fields = {**ex.headers, **answer.headers}
    bad = _line_break_in(fields)
    if bad is not None:
        return await send_error(ex, bad)
    _write_final(ex, transport, answer, fields)
    return web.Response(status=500)


async def _hold_informational(ex: Exchange, transport: asyncio.Transport, status: int) -> None:
    """Send a 1xx head alone, then hold the connection: no final response ever follows."""
    if status == 101:
        head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        head += b"Upgrade: websocket\r\n\r\n"
    else:
        head = f"HTTP/1.1 {status} {_reason(status)}\r\n\r\n".encode()
    transport.write(head)
    ex.record.status = status
    ex.changed()
    # No final response follows; the client going away cancels this sleep.
    await asyncio.sleep(STALL_CAP_S)
    transport.close()
    finish(ex.record, "stall_timeout")


def _line_break_in(fields: Mapping[str, str]) -> ErrorAnswer | None:
    """The 400 for a scripted header value that would break the raw head, if any."""
    for name, value in fields.items():
        if "\r" in value or "\n" in value:
            param = name.replace("-", "_")
            return ErrorAnswer(
                400, f"fake provider: script parameter '{param}': CR or LF in {value!r}"
            )
    return None


def _write_final(
    ex: Exchange, transport: asyncio.Transport, answer: ErrorAnswer, fields: Mapping[str, str]
) -> None:
    """Write a final raw status with its error body, then close (outcome ``error_status``)."""
    record = ex.record
    status = answer.status
    body = answer.body(ex.wire, record.request_id)
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in fields.items()),
        "connection: close",
    ]
    record.first_byte_at = asyncio.get_running_loop().time()
    transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    record.status = status
    record.writes += 1
    if ex.keep_sent:
        record.sent += body
    # close(), not abort(): the buffered response is flushed first.
    transport.close()
    finish(record, "error_status")


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"


# ---- streams ------------------------------------------------------------------------------


async def serve_stream(ex: Exchange, plan: StreamPlan | None) -> web.StreamResponse:
    """Stream ``plan`` once the scripted head allows it, ending as the script says.

    ``plan`` is None only when a scripted status answers instead.
    """
    scripted = await scripted_head(ex)
    if scripted is not None:
        return scripted
    assert plan is not None
    resp, writer = await _open_stream(ex)
    try:
        outcome = await _play(ex.record.script, plan, writer)
        if outcome == "reset":
            abort(ex)
            return resp
        await writer.finish()
        await resp.write_eof()
    except ConnectionError:
        ex.disconnected(ex.record)
        return resp
    finish(ex.record, outcome)
    return resp


async def _open_stream(ex: Exchange) -> tuple[web.StreamResponse, Writer]:
    """Send the head of an event stream; return the response and its writer."""
    script = ex.record.script
    headers = {**ex.headers, "Cache-Control": "no-cache"}
    if script.content_encoding is not None:
        headers["Content-Encoding"] = script.content_encoding
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(ex.request)
    ex.record.status = 200
    writer = Writer(
        resp, ex.record, script.split_seed, keep=ex.keep_sent, encoding=script.content_encoding
    )
    return resp, writer


async def _play(script: FakeScript, plan: StreamPlan, writer: Writer) -> Outcome:
    """Write the plan's events, timed as scripted, up to the scripted ending; return it.

    ``reset`` means the connection is to be aborted; any other ending is written but for
    the end of the encoding and of the body.
    """
    if script.first_delay_ms:
        await asyncio.sleep(script.first_delay_ms / 1000)
    gap = script.gap_ms / 1000
    content = 0
    for written, event in enumerate(plan.events):
        if written and gap:
            await asyncio.sleep(gap)
        ending = _ending(script, content)
        if ending == "stall_timeout":
            await asyncio.sleep(STALL_CAP_S)
            return "stall_timeout"
        if ending == "error_event":
            for payload in plan.error(written):
                await writer.write(payload)
            return "error_event"
        if ending is not None:
            return ending
        if event.terminal and script.omit_done:
            continue
        await writer.write(event.payload)
        if event.content:
            content += 1
    return "complete"


def _ending(script: FakeScript, content: int) -> Outcome | None:
    """The ending due once ``content`` chunks were written: the first of stall, error and
    truncation, or None."""
    if script.stall_after is not None and content >= script.stall_after:
        return "stall_timeout"
    if script.error_after is not None and content >= script.error_after:
        return "error_event"
    if script.truncate_after is not None and content >= script.truncate_after:
        return "reset" if script.truncate_mode == "reset" else "truncated"
    return None
