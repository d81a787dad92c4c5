"""Resumable streams through a real `gateway serve` process: a client that drops a stream gets
the rest, byte-exact, from `GET /v1/streams/{id}?offset=N`; the upstream is drained to its end
and its real usage charged; who may reattach, when, and from where (errors in the caller's API
format); through real nginx; what the memory store costs and what it evicts first.

The truth every byte is checked against is the fake provider's record of what it sent (one
upstream attempt per stream): with no usage stripping in play, the client-visible stream is
exactly those bytes, so `received + rest == record.sent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from gateway.fake import RequestRecord
from tests.support import (
    CALLER_KEY,
    OTHER_CALLER_KEY,
    Fake,
    Served,
    base_config,
    deep_merge,
    nginx_in_front,
    serve_gateway,
)

CHAT = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
MESSAGES = [{"role": "user", "content": "hi"}]
STREAM_ID = re.compile(r"^gs_[A-Za-z0-9_-]{22}$")
ANTHROPIC_VERSION = "2023-06-01"


def oa_auth(key: str = CALLER_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def an_auth(key: str = CALLER_KEY) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}


def resume(**overrides: Any) -> dict[str, Any]:
    """The `resume` section (enabled, memory store) with `overrides`."""
    return {"resume": {"enabled": True, "store": "memory", "ttl_s": 600, **overrides}}


def chat_body(*, usage: bool = True, **extra: Any) -> bytes:
    """A streamed chat completion; `usage`: the caller asks for the usage chunk itself (then
    nothing is injected or stripped, and the stream carries its usage)."""
    body: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES, "stream": True, **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def messages_body(**extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "claude-test", "max_tokens": 900, "messages": MESSAGES, "stream": True, **extra}
    )


def script(chunks: int, gap_ms: float = 0) -> dict[str, str]:
    headers = {"x-fake-chunks": str(chunks)}
    if gap_ms:
        headers["x-fake-gap-ms"] = str(gap_ms)
    return headers


# -- the client side ------------------------------------------------------------------------


@dataclass
class Reattach:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    started: float  # loop.time() when the request was sent (the fake's clock)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"Reattach({self.status}, {len(self.body)} bytes, {self.body[:300]!r})"


async def open_stream(
    session: aiohttp.ClientSession,
    base: str,
    *,
    chunks: int,
    gap_ms: float = 0,
    anthropic: bool = False,
    body: bytes | None = None,
    key: str = CALLER_KEY,
) -> aiohttp.ClientResponse:
    """POST a streamed request and return the response once its headers are in (status 200,
    a well-formed stream id); the caller reads and closes it."""
    if anthropic:
        url, data, headers = base + MESSAGES_PATH, body or messages_body(), an_auth(key)
    else:
        url, data, headers = base + CHAT, body or chat_body(), oa_auth(key)
    resp = await session.post(
        url,
        data=data,
        headers={**headers, "content-type": "application/json", **script(chunks, gap_ms)},
    )
    if resp.status != 200:
        text = await resp.read()
        resp.release()
        raise AssertionError(f"stream answered {resp.status}: {text[:500]!r}")
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert STREAM_ID.match(resp.headers["x-gateway-stream-id"]), resp.headers
    return resp


async def read_events(resp: aiohttp.ClientResponse, events: int, timeout_s: float = 10) -> bytes:
    """Read until at least `events` whole events (blank-line separated) were received; the
    bytes read so far (possibly ending inside a later event)."""
    received = bytearray()
    async with asyncio.timeout(timeout_s):
        while received.count(b"\n\n") < events:
            chunk = await resp.content.readany()
            if not chunk:
                raise AssertionError(f"the stream ended after {bytes(received)!r}")
            received += chunk
    return bytes(received)


async def read_rest(resp: aiohttp.ClientResponse, timeout_s: float = 15) -> bytes:
    async with asyncio.timeout(timeout_s):
        return await resp.content.read()


def drop(resp: aiohttp.ClientResponse) -> None:
    """The client goes away: the connection is closed, not returned to the pool."""
    resp.close()


async def reattach(
    session: aiohttp.ClientSession,
    base: str,
    stream_id: str,
    *,
    offset: int | str | None = None,
    last_event_id: int | str | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 15,
) -> Reattach:
    """`GET /v1/streams/{id}` (with `?offset=` and/or `Last-Event-ID` when given), read to
    its end."""
    params = {} if offset is None else {"offset": str(offset)}
    sent_headers = dict(oa_auth() if headers is None else headers)
    if last_event_id is not None:
        sent_headers["Last-Event-ID"] = str(last_event_id)
    started = asyncio.get_running_loop().time()
    async with (
        asyncio.timeout(timeout_s),
        session.get(f"{base}/v1/streams/{stream_id}", params=params, headers=sent_headers) as resp,
    ):
        body = await resp.read()
        return Reattach(resp.status, resp.headers, body, started)


async def wait_done(record: RequestRecord, timeout_s: float = 15) -> None:
    """Until the fake finished the request one way or the other (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not (record.completed or record.disconnected):
        assert time.monotonic() < deadline, f"the upstream request never ended: {record.outcome}"
        await asyncio.sleep(0.01)


def access(gw: Served) -> list[dict[str, Any]]:
    """The gateway's access-log lines (one per settled request), oldest first."""
    lines = []
    for line in gw.log_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "request":
            lines.append(entry)
    return lines


async def access_lines(gw: Served, n: int, timeout_s: float = 15) -> list[dict[str, Any]]:
    """Until at least `n` requests were logged (i.e. settled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = access(gw)
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"{len(lines)} access lines, expected {n}"
        await asyncio.sleep(0.02)


def line_of(lines: list[dict[str, Any]], stream_id: str) -> dict[str, Any]:
    """The access line of the stream `stream_id`."""
    found = [e for e in lines if e.get("stream_id") == stream_id]
    assert len(found) == 1, f"not one access line has stream_id {stream_id}: {lines}"
    return found[0]


def usage_sent(sent: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens of the usage chunk an OpenAI chat stream carried."""
    for event in sent.split(b"\n\n"):
        if b'"usage":{' in event:
            usage = orjson.loads(event.removeprefix(b"data: "))["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"]
    raise AssertionError("no usage chunk in the upstream's bytes")


def assert_openai_error(reply: Reattach, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply
    error = reply.json()["error"]
    assert isinstance(error, dict) and error.get("message"), reply
    assert "type" not in reply.json() or reply.json()["type"] != "error", reply
    return error


def assert_anthropic_error(reply: Reattach, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply
    body = reply.json()
    assert body["type"] == "error", reply
    assert isinstance(body["error"], dict) and body["error"].get("message"), reply
    assert body["error"].get("type"), reply
    return dict(body["error"])


def same_answer(one: Reattach, other: Reattach) -> bool:
    """The same error body but for the per-request id (Anthropic bodies carry one)."""

    def strip(reply: Reattach) -> Any:
        body = reply.json()
        if isinstance(body, dict):
            body.pop("request_id", None)
        return body

    return one.status == other.status and strip(one) == strip(other)


Serve = Callable[..., contextlib.AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(fake: Fake, tmp_path: Path) -> Serve:
    """`serve(extra, name=...)`: a `gateway serve` process on the base config + `extra`, in
    its own directory under tmp_path."""

    def start(
        extra: dict[str, Any] | None = None, *, name: str = "gw"
    ) -> contextlib.AbstractAsyncContextManager[Served]:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        return serve_gateway(deep_merge(base_config(fake.url), extra or {}), directory)

    return start


# -- 1. a dropped stream, reattached: every byte, one upstream request, drained ------------


async def test_a_dropped_stream_is_reattached_byte_exact(serve: Serve, fake: Fake) -> None:
    async with serve(resume()) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=60, gap_ms=20)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 15)
        drop(resp)
        rest = await reattach(session, gw.url, stream_id, offset=len(received))
        record = fake.provider.records[0]
        await wait_done(record)
        assert rest.status == 200, rest
        assert rest.headers["content-type"].startswith("text/event-stream")
        # The reattach was served while the upstream was still sending (the live tail).
        assert record.ended_at is not None and record.ended_at > rest.started
        assert received + rest.body == bytes(record.sent)
        assert rest.body.rstrip().endswith(b"data: [DONE]")
        assert len(fake.provider.records) == 1  # nothing was retried or re-requested
        assert record.completed and not record.disconnected
        assert record.outcome == "complete"

        lines = await access_lines(gw, 1)
        line = line_of(lines, stream_id)
        assert line["outcome"] == "client_cancel", line
        assert line["drained"] is True and line["drain_outcome"] == "ok", line
        prompt, completion = usage_sent(bytes(record.sent))
        assert (line["input_tokens"], line["output_tokens"]) == (prompt, completion), line
        assert completion == 60

        # Once ended, the whole stream is there from byte 0, and `Last-Event-ID` is `offset`.
        whole = await reattach(session, gw.url, stream_id)
        assert whole.status == 200 and whole.body == bytes(record.sent)
        by_header = await reattach(session, gw.url, stream_id, last_event_id=len(received))
        assert by_header.status == 200 and by_header.body == rest.body


# -- 2. the same through real nginx -----------------------------------------------------------


@pytest.mark.server
async def test_a_dropped_stream_is_reattached_through_nginx(
    serve: Serve, fake: Fake, tmp_path: Path
) -> None:
    async with (
        serve(resume()) as gw,
        nginx_in_front(gw.url, tmp_path / "nginx") as front,
        aiohttp.ClientSession() as session,
    ):
        resp = await open_stream(session, front, chunks=60, gap_ms=20)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 15)
        drop(resp)
        rest = await reattach(session, front, stream_id, offset=len(received))
        record = fake.provider.records[0]
        await wait_done(record)
        assert rest.status == 200, rest
        assert rest.headers["content-type"].startswith("text/event-stream")
        assert record.ended_at is not None and record.ended_at > rest.started
        assert received + rest.body == bytes(record.sent)
        assert len(fake.provider.records) == 1
        assert record.completed and not record.disconnected
        line = line_of(await access_lines(gw, 1), stream_id)
        assert line["outcome"] == "client_cancel" and line["drained"] is True, line
        # And an error answer passes through nginx in the caller's format.
        missing = await reattach(session, front, "gs_" + "A" * 22, offset=0)
        assert_openai_error(missing, 404)


# -- 3. who may reattach, when, and from where ------------------------------------------------


async def test_only_the_same_caller_may_reattach(serve: Serve, fake: Fake) -> None:
    async with serve(resume()) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=30, gap_ms=10)
        oa_id = resp.headers["x-gateway-stream-id"]
        oa_received = await read_events(resp, 5)
        drop(resp)
        resp = await open_stream(session, gw.url, chunks=30, gap_ms=10, anthropic=True)
        an_id = resp.headers["x-gateway-stream-id"]
        an_received = await read_events(resp, 5)
        drop(resp)
        assert oa_id != an_id

        # Another caller: 404, as for an id that does not exist (nothing is given away).
        other = await reattach(session, gw.url, oa_id, offset=0, headers=oa_auth(OTHER_CALLER_KEY))
        assert_openai_error(other, 404)
        other_an = await reattach(
            session, gw.url, an_id, offset=0, headers=an_auth(OTHER_CALLER_KEY)
        )
        error = assert_anthropic_error(other_an, 404)
        assert error["type"] == "not_found_error", other_an
        unknown = await reattach(session, gw.url, "gs_" + "B" * 22, offset=0)
        assert_openai_error(unknown, 404)
        unknown_an = await reattach(session, gw.url, "gs_" + "B" * 22, offset=0, headers=an_auth())
        assert_anthropic_error(unknown_an, 404)
        # In the format of the caller's own credentials, whatever API the stream was: the very
        # answer an unknown id gets (else the format would tell that the id exists).
        styles: tuple[tuple[dict[str, str], Callable[[Reattach, int], object]], ...] = (
            (oa_auth(OTHER_CALLER_KEY), assert_openai_error),
            (an_auth(OTHER_CALLER_KEY), assert_anthropic_error),
        )
        for headers, check in styles:
            nobody = await reattach(session, gw.url, "gs_" + "C" * 22, offset=0, headers=headers)
            check(nobody, 404)
            for stream_id in (oa_id, an_id):
                reply = await reattach(session, gw.url, stream_id, offset=0, headers=headers)
                check(reply, 404)
                assert same_answer(reply, nobody), (headers, stream_id)

        # The owner gets both, in their own format.
        oa_rest = await reattach(session, gw.url, oa_id, offset=len(oa_received))
        an_rest = await reattach(session, gw.url, an_id, offset=len(an_received), headers=an_auth())
        for record in fake.provider.records:
            await wait_done(record)
        oa_record, an_record = fake.provider.records
        assert oa_rest.status == 200 and an_rest.status == 200, (oa_rest, an_rest)
        assert oa_received + oa_rest.body == bytes(oa_record.sent)
        assert an_received + an_rest.body == bytes(an_record.sent)
        assert b"event: message_stop" in an_rest.body
        assert oa_record.completed and an_record.completed
        # The other caller's attempts did not end either stream's life.
        again = await reattach(session, gw.url, an_id, offset=0, headers=an_auth())
        assert again.status == 200 and again.body == bytes(an_record.sent)


async def test_a_stream_expires_ttl_after_its_end(serve: Serve, fake: Fake) -> None:
    async with serve(resume(ttl_s=1)) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=5)
        stream_id = resp.headers["x-gateway-stream-id"]
        body = await read_rest(resp)
        resp.release()
        await access_lines(gw, 1)
        ended = time.monotonic()
        fresh = await reattach(session, gw.url, stream_id, offset=0)
        assert fresh.status == 200 and fresh.body == body == bytes(fake.provider.records[0].sent)
        await asyncio.sleep(max(0.0, ended + 1.5 - time.monotonic()))
        expired = await reattach(session, gw.url, stream_id, offset=0)
        assert_openai_error(expired, 404)


async def test_offsets_past_the_end_at_the_end_and_malformed(serve: Serve, fake: Fake) -> None:
    async with serve(resume()) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=8)
        stream_id = resp.headers["x-gateway-stream-id"]
        body = await read_rest(resp)
        resp.release()
        await access_lines(gw, 1)
        length = len(body)
        assert body == bytes(fake.provider.records[0].sent)

        at_end = await reattach(session, gw.url, stream_id, offset=length)
        assert at_end.status == 200 and at_end.body == b"", at_end
        assert at_end.headers["content-type"].startswith("text/event-stream")
        assert_openai_error(await reattach(session, gw.url, stream_id, offset=length + 1), 416)
        assert_openai_error(await reattach(session, gw.url, stream_id, offset=10**9), 416)
        for bad in (-1, "abc", "1.5"):
            assert_openai_error(await reattach(session, gw.url, stream_id, offset=bad), 400)
        for bad in (-1, "abc"):
            reply = await reattach(session, gw.url, stream_id, last_event_id=bad)
            assert_openai_error(reply, 400)

        # Any offset inside the stream: exactly the bytes after it.
        for offset in (0, 1, length // 3, length - 1):
            reply = await reattach(session, gw.url, stream_id, offset=offset)
            assert reply.status == 200 and reply.body == body[offset:], offset
            by_header = await reattach(session, gw.url, stream_id, last_event_id=offset)
            assert by_header.status == 200 and by_header.body == body[offset:], offset
        past = await reattach(session, gw.url, stream_id, last_event_id=length + 1)
        assert_openai_error(past, 416)


async def test_an_oversize_stream_answers_410_and_still_completes(serve: Serve, fake: Fake) -> None:
    async with serve(resume(max_stream_bytes=1024)) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=80, gap_ms=10)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = bytearray()
        async with asyncio.timeout(10):
            while len(received) <= 4096:  # well past the bound, while still live
                chunk = await resp.content.readany()
                assert chunk, "the stream ended early"
                received += chunk
        live = await reattach(session, gw.url, stream_id, offset=0)
        assert_openai_error(live, 410)
        received += await read_rest(resp)  # the client that stayed gets it all
        resp.release()
        record = fake.provider.records[0]
        await wait_done(record)
        assert record.ended_at is not None and record.ended_at > live.started
        assert bytes(received) == bytes(record.sent)
        assert len(received) > 4096 and record.completed
        await access_lines(gw, 1)
        ended = await reattach(session, gw.url, stream_id, offset=len(received))
        assert_openai_error(ended, 410)


async def test_two_reattaches_at_once_both_get_the_whole_rest(serve: Serve, fake: Fake) -> None:
    async with serve(resume()) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=60, gap_ms=20)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 10)
        drop(resp)
        first, second, from_zero = await asyncio.gather(
            reattach(session, gw.url, stream_id, offset=len(received)),
            reattach(session, gw.url, stream_id, last_event_id=len(received)),
            reattach(session, gw.url, stream_id, offset=0),
        )
        record = fake.provider.records[0]
        await wait_done(record)
        sent = bytes(record.sent)
        assert record.ended_at is not None and record.ended_at > first.started
        for reply in (first, second, from_zero):
            assert reply.status == 200, reply
        assert received + first.body == sent
        assert received + second.body == sent
        assert from_zero.body == sent
        assert len(fake.provider.records) == 1 and record.completed


async def test_injected_ids_count_client_visible_bytes(serve: Serve, fake: Fake) -> None:
    async with serve(resume(inject_ids=True)) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=40, gap_ms=15)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 10)
        drop(resp)
        # An EventSource client resumes from the last id it saw: the end of that event.
        whole_events = received[: received.rindex(b"\n\n") + 2]
        last_id = int(re.findall(rb"^id: (\d+)$", whole_events, flags=re.MULTILINE)[-1])
        assert last_id == len(whole_events)
        rest = await reattach(session, gw.url, stream_id, last_event_id=last_id)
        record = fake.provider.records[0]
        await wait_done(record)
        assert rest.status == 200, rest
        visible = whole_events + rest.body

        # Every event carries one id line: the client-visible bytes up to its end.
        events = visible.split(b"\n\n")
        assert events[-1] == b""
        position = 0
        for event in events[:-1]:
            position += len(event) + 2
            ids = re.findall(rb"^id: (\d+)$", event, flags=re.MULTILINE)
            assert ids == [str(position).encode()], event
        assert position == len(visible)
        # Without the id lines it is the upstream's stream, byte for byte.
        assert re.sub(rb"(?m)^id: \d+\n", b"", visible) == bytes(record.sent)
        assert record.completed and len(fake.provider.records) == 1
        # The stored stream is the visible one, ids included.
        whole = await reattach(session, gw.url, stream_id, offset=0)
        assert whole.status == 200 and whole.body == visible


async def test_the_drain_is_bounded_by_the_chunk_timeout(serve: Serve, fake: Fake) -> None:
    """An upstream that goes silent after the client left: the drain ends at chunk_s like a
    watched stream, the upstream is closed, and a reattach gets what the client would have:
    the events, then the gateway's terminal error event."""
    extra = {**resume(), "policy": {"timeouts": {"chunk_s": 0.5}}}
    async with serve(extra) as gw, aiohttp.ClientSession() as session:
        resp = await session.post(
            gw.url + CHAT,
            data=chat_body(),
            headers={**oa_auth(), "content-type": "application/json", "x-fake-stall-after": "3"},
        )
        assert resp.status == 200
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 1 + 3)  # the role chunk and 3 content chunks
        drop(resp)
        rest = await reattach(session, gw.url, stream_id, offset=len(received))
        record = fake.provider.records[0]
        await wait_done(record)
        assert record.disconnected and not record.completed  # closed by the gateway
        assert record.disconnected_at is not None and record.first_byte_at is not None
        assert 0.4 < record.disconnected_at - record.first_byte_at < 3
        assert rest.status == 200, rest
        visible = received + rest.body
        sent = bytes(record.sent)
        assert visible.startswith(sent)
        (terminal,) = [e for e in visible[len(sent) :].split(b"\n\n") if e]
        error = orjson.loads(terminal.removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_timeout", error
        assert b"[DONE]" not in visible
        line = line_of(await access_lines(gw, 1), stream_id)
        assert line["drained"] is True and line["drain_outcome"] == "chunk_timeout", line


async def test_a_draining_stream_keeps_its_concurrency_slot(serve: Serve, fake: Fake) -> None:
    """Charged as if the client had stayed: the slot is held until the drain ends."""
    extra = {
        "tiers": {"t": {"concurrent_streams": 1}},
        "auth": {"default_tier": "t"},
        **resume(),
    }
    async with serve(extra) as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=40, gap_ms=25)
        await read_events(resp, 4)
        drop(resp)
        async with session.post(
            gw.url + CHAT,
            data=chat_body(),
            headers={**oa_auth(), "content-type": "application/json", **script(2)},
        ) as second:
            assert second.status == 429, await second.read()
            assert (await second.json())["error"]["code"] == "rate_limit_exceeded"
        record = fake.provider.records[0]
        await wait_done(record)
        assert record.completed
        await access_lines(gw, 2)  # the drained stream settled: its slot is free again
        third = await open_stream(session, gw.url, chunks=2)
        await read_rest(third)
        third.release()


# -- 5. a drained stream is charged its real usage --------------------------------------------


TPM = 600  # one token per 0.1 s: the budget refills slowly enough to read the charges exactly
INTERVAL_S = 60 / TPM


@dataclass
class Standing:
    """test-app's token budget as /admin/limits showed it."""

    full_in_s: float  # seconds until the budget is whole again (TAT - now)
    read_at: float  # when it was read: the midpoint of the request (shared monotonic clock)
    window_s: float  # how long the request took (the uncertainty of `read_at`, twice over)
    used: int


async def tpm_standing(gw: Served, session: aiohttp.ClientSession) -> Standing:
    before = time.monotonic()
    async with session.get(gw.admin_url + "/admin/limits/test-app", headers=gw.admin_headers) as r:
        assert r.status == 200
        view = (await r.json())["limits"]["tokens_per_minute"]
    after = time.monotonic()
    return Standing(
        float(view["full_again_in_s"]), (before + after) / 2, after - before, int(view["used"])
    )


async def test_a_drained_stream_is_charged_its_real_usage(serve: Serve, fake: Fake) -> None:
    """Both streams' requests cost the same; the first is dropped early and drained, the
    second read to its end. The token budget's TAT moves by each one's real usage (the GCRA
    refill is undone with the shared monotonic clock: the gateway is another process on this
    machine, and its limiter uses time.monotonic)."""
    extra = {
        "tiers": {"t": {"tokens_per_minute": TPM}},
        "auth": {"default_tier": "t"},
        **resume(),
    }
    # max_tokens 60 keeps the reservation (prompt estimate + 60) inside the budget; the caller
    # did not ask for usage, so the gateway asks upstream and strips it again.
    body = chat_body(usage=False, max_tokens=60)
    async with serve(extra) as gw, aiohttp.ClientSession() as session:
        admitted_from = time.monotonic()
        resp = await open_stream(session, gw.url, chunks=40, gap_ms=20, body=body)
        admitted_by = time.monotonic()
        dropped_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 6)
        drop(resp)
        lines = await access_lines(gw, 1)
        dropped = line_of(lines, dropped_id)
        a = await tpm_standing(gw, session)

        resp = await open_stream(session, gw.url, chunks=40, gap_ms=20, body=body)
        read_fully_id = resp.headers["x-gateway-stream-id"]
        whole = await read_rest(resp)
        resp.release()
        lines = await access_lines(gw, 2)
        b = await tpm_standing(gw, session)
        read_fully = line_of(lines, read_fully_id)

        rest = await reattach(session, gw.url, dropped_id, offset=len(received))

    record_a, record_b = fake.provider.records
    assert record_a.completed and not record_a.disconnected  # drained, not cancelled
    assert record_b.completed
    assert dropped["outcome"] == "client_cancel" and dropped["drained"] is True, dropped
    assert read_fully["outcome"] == "ok", read_fully
    tokens_a = dropped["input_tokens"] + dropped["output_tokens"]
    tokens_b = read_fully["input_tokens"] + read_fully["output_tokens"]
    assert (dropped["input_tokens"], dropped["output_tokens"]) == usage_sent(bytes(record_a.sent))
    assert tokens_a == tokens_b and dropped["output_tokens"] == 40
    reserved = tokens_a - dropped["reconciled_tokens"]
    assert reserved > tokens_a  # the reservation was reconciled down to the real usage
    assert read_fully["reconciled_tokens"] == dropped["reconciled_tokens"]

    # The TAT is the admission time plus every charge so far (the budget stayed in debt).
    # Each bound: half of each timing window plus the rounding of full_again_in_s (1 ms).
    admitted = (admitted_from + admitted_by) / 2
    charged_a = (a.full_in_s + a.read_at - admitted) / INTERVAL_S
    slack_a = ((admitted_by - admitted_from + a.window_s) / 2 + 0.001) / INTERVAL_S
    charged_b = (b.full_in_s - a.full_in_s + b.read_at - a.read_at) / INTERVAL_S
    slack_b = ((a.window_s + b.window_s) / 2 + 0.001) / INTERVAL_S
    print(
        f"\ncharged: dropped {charged_a:.2f} (+-{slack_a:.2f}), read fully {charged_b:.2f} "
        f"(+-{slack_b:.2f}), real usage {tokens_a}"
    )
    assert slack_a < 0.5 and slack_b < 0.5, "timings too loose to tell tokens apart"
    assert abs(charged_a - tokens_a) <= slack_a, (charged_a, tokens_a, slack_a)
    assert abs(charged_b - tokens_b) <= slack_b, (charged_b, tokens_b, slack_b)
    # `used` is the same standing, as a count of tokens not yet refilled.
    assert abs(a.used - a.full_in_s / INTERVAL_S) <= 1, a
    assert abs(b.used - b.full_in_s / INTERVAL_S) <= 1, b

    # The stream the client saw (and the reattach served) had the injected usage stripped.
    assert b"usage" not in received + rest.body and b"usage" not in whole
    events = [e for e in bytes(record_a.sent).split(b"\n\n") if e]
    expected = b"".join(
        e.replace(b',"usage":null', b"") + b"\n\n"
        for e in events
        if not (b'"choices":[]' in e and b'"usage":{' in e)
    )
    assert rest.status == 200 and received + rest.body == expected


# -- 6. what the memory store costs, and what it evicts first ---------------------------------


async def visible_bytes(session: aiohttp.ClientSession, base: str, chunks: int) -> int:
    resp = await open_stream(session, base, chunks=chunks, body=chat_body(max_tokens=chunks))
    body = await read_rest(resp)
    resp.release()
    return len(body)


async def chunks_for(session: aiohttp.ClientSession, base: str, target: int) -> int:
    """The x-fake-chunks that make a visible stream about `target` bytes (measured)."""
    small, large = await visible_bytes(session, base, 10), await visible_bytes(session, base, 30)
    per_chunk = (large - small) / 20
    return max(1, round(10 + (target - small) / per_chunk))


async def run_streams(
    session: aiohttp.ClientSession, base: str, chunks: int, count: int, concurrency: int
) -> list[tuple[str, int]]:
    """`count` streams read to their end, `concurrency` at a time: (stream id, bytes)."""
    gate = asyncio.Semaphore(concurrency)
    body = chat_body(max_tokens=chunks)

    async def one() -> tuple[str, int]:
        async with gate:
            resp = await open_stream(session, base, chunks=chunks, body=body)
            data = await read_rest(resp)
            resp.release()
            return resp.headers["x-gateway-stream-id"], len(data)

    return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.timeout(240)
async def test_a_thousand_kept_streams_cost_at_most_twice_their_bytes(
    serve: Serve, fake: Fake
) -> None:
    extra = {**resume(memory_bytes=256 * 1024 * 1024), "telemetry": {"access_log": False}}
    connector = aiohttp.TCPConnector(limit=50)
    async with serve(extra) as gw, aiohttp.ClientSession(connector=connector) as session:
        chunks = await chunks_for(session, gw.url, 10 * 1024)
        assert 8 * 1024 <= await visible_bytes(session, gw.url, chunks) <= 12 * 1024
        deadline = time.monotonic() + 180
        await run_streams(session, gw.url, chunks, 200, 50)  # warm-up: first-use growth
        await asyncio.sleep(0.5)
        before = gw.rss_bytes()
        started = time.monotonic()
        kept = await run_streams(session, gw.url, chunks, 1000, 50)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
        after = gw.rss_bytes()
        assert time.monotonic() < deadline
        total = sum(n for _, n in kept)
        growth = after - before
        print(
            f"\n1000 kept streams of {total / 1000 / 1024:.1f} KiB ({chunks} chunks) in "
            f"{elapsed:.1f} s: RSS +{growth / 2**20:.1f} MiB for {total / 2**20:.1f} MiB kept "
            f"({growth / total:.2f}x)"
        )
        assert growth <= 2 * total, (growth, total)
        # They are all kept: each answers 200 (nothing) at its end, and a few in full.
        statuses = await asyncio.gather(
            *(reattach(session, gw.url, sid, offset=n) for sid, n in kept)
        )
        assert [r.status for r in statuses] == [200] * len(kept)
        assert all(r.body == b"" for r in statuses)
        for sid, n in (kept[0], kept[500], kept[-1]):
            whole = await reattach(session, gw.url, sid, offset=0)
            assert whole.status == 200 and len(whole.body) == n


async def test_the_memory_bound_evicts_the_oldest_ended_streams_first(
    serve: Serve, fake: Fake
) -> None:
    bound = 65536
    async with serve(resume(memory_bytes=bound)) as gw, aiohttp.ClientSession() as session:
        chunks = await chunks_for(session, gw.url, 10 * 1024)
        # The oldest stream of all stays live (slow) while a dozen ~10 KB ones come and go.
        live = await open_stream(session, gw.url, chunks=40, gap_ms=60)
        live_id = live.headers["x-gateway-stream-id"]
        live_received = await read_events(live, 3)
        ended = await run_streams(session, gw.url, chunks, 12, 1)  # one after the other
        sizes = [n for _, n in ended]
        assert sum(sizes) > 1.5 * bound

        live_rest = await reattach(session, gw.url, live_id, offset=0)
        statuses = []
        for sid, n in ended:
            reply = await reattach(session, gw.url, sid, offset=0)
            statuses.append(reply.status)
            if reply.status == 200:
                assert len(reply.body) == n
            else:
                assert_openai_error(reply, 404)
        kept = statuses.count(200)
        # Evicted oldest first: a run of 404s, then the newest ones kept (within the bound).
        assert statuses == [404] * (12 - kept) + [200] * kept, statuses
        assert 2 <= kept < 12, statuses
        assert sum(sizes[12 - kept :]) <= bound
        # The live stream, older than all of them, was not evicted before them.
        live_record = fake.provider.records[2]  # after the two probes
        await wait_done(live_record)
        assert live_rest.status == 200, live_rest
        assert live_rest.body == bytes(live_record.sent)
        assert live_received + await read_rest(live) == bytes(live_record.sent)
        live.release()


# -- 7. resume disabled: a drop still closes the upstream at once -----------------------------


async def test_without_resume_a_drop_closes_the_upstream_at_once(serve: Serve, fake: Fake) -> None:
    async with serve() as gw, aiohttp.ClientSession() as session:
        resp = await open_stream(session, gw.url, chunks=60, gap_ms=20)
        await read_events(resp, 5)
        closed_at = asyncio.get_running_loop().time()
        drop(resp)
        record = fake.provider.records[0]
        await wait_done(record)
        assert record.disconnected and not record.completed
        assert record.disconnected_at is not None
        assert record.disconnected_at - closed_at < 0.5
        line = (await access_lines(gw, 1))[0]
        assert line["outcome"] == "client_cancel"
        assert line.get("drained") in (None, False), line
        stream_id = resp.headers["x-gateway-stream-id"]
        assert (await reattach(session, gw.url, stream_id, offset=0)).status == 404
