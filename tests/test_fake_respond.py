"""Answering as scripted: truncation, stalls, disconnects, timing, line endings, raw statuses,
omitted end markers and padded events, seen on a real socket."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import urllib.parse
from typing import Any

import aiohttp
import pytest

from gateway.fake import FakeProvider, fake_tokens
from tests import fake_support
from tests.fake_support import (
    ANT_HEADERS,
    ANTHROPIC_KEY,
    CHAT_BODY,
    OAI_HEADERS,
    expected_replay,
    replay_target,
    sse_data,
)

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http


async def test_truncate_reset_is_a_payload_error(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-truncate-after": "3", "x-fake-truncate-mode": "reset"}
    body = {**CHAT_BODY, "stream": True}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert provider.records[0].outcome == "reset"
    assert provider.records[0].sent.count(b"data: ") == 4

    clean = {**OAI_HEADERS, "x-fake-truncate-after": "3"}
    async with http.post(url + "/v1/chat/completions", json=body, headers=clean) as resp:
        data = await resp.read()
    assert data == provider.records[1].sent
    assert data.count(b"data: ") == 4
    assert not data.endswith(b"[DONE]\n\n")


async def test_stall_then_client_disconnect_is_recorded(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@stall_after=2", "stream": True}
    resp = await http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS)
    try:
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        for _ in range(3):  # role chunk and two content chunks, then the stall
            await resp.content.readuntil(b"\n\n")
        (record,) = provider.records
        assert provider.open_streams == 1
        assert not record.disconnected
    finally:
        resp.close()
    await provider.wait_until(lambda: record.disconnected, timeout=1.0)
    assert record.outcome == "disconnected"
    assert record.disconnected_at is not None
    assert not record.completed
    assert provider.open_streams == 0
    assert provider.stats()["disconnects"] == 1


async def test_disconnect_during_headers_delay_is_recorded(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-headers-delay-ms": "5000"}
    request = asyncio.ensure_future(
        http.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers)
    )
    (record,) = await provider.wait_for_records(1, timeout=1.0)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await provider.wait_until(lambda: record.disconnected, timeout=1.0)
    assert record.status == 0
    assert record.sent == b""


async def test_cr_line_endings_on_a_generated_stream(http: aiohttp.ClientSession, url: str) -> None:
    body = {"model": "fake-claude@chunks=2,line_ending=cr", "stream": True, "messages": []}
    async with http.post(url + "/v1/messages", json=body, headers=ANT_HEADERS) as resp:
        data = await resp.read()
    assert b"\n" not in data
    assert data.count(b"\r\r") == 8  # message_start, ping, block start, 2 deltas, stop, delta, stop
    assert data.startswith(b"event: message_start\rdata: {")


async def test_gap_keeps_events_apart(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@chunks=3,gap_ms=30,first_delay_ms=30", "stream": True}
    arrivals: list[bytes] = []
    async with http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS) as resp:
        async for piece in resp.content.iter_any():
            arrivals.append(piece)
    # Six events 30 ms apart arrive in separate reads, not batched; a margin of two merges
    # keeps a loaded machine from flaking. Timing figures belong in the benchmarks.
    assert b"".join(arrivals) == provider.records[0].sent
    assert len(arrivals) >= 4
    record = provider.records[0]
    assert record.first_byte_at is not None
    assert record.first_byte_at > record.started_at


async def _raw_request(
    url: str, path: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send one HTTP/1.1 request on a plain socket, to see exactly what comes back."""
    target = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(target.hostname, target.port)
    payload = json.dumps(body).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    return reader, writer


def _split_response(data: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines)
    return status, fields, body


async def test_raw_101_holds_the_connection_until_the_client_goes_away(
    url: str, provider: FakeProvider
) -> None:
    headers = {**OAI_HEADERS, "x-fake-raw-status": "101"}
    reader, writer = await _raw_request(
        url, "/v1/chat/completions", headers, {**CHAT_BODY, "stream": True}
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head == (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        (record,) = provider.records
        assert (record.status, record.outcome, record.completed) == (101, "pending", False)
        # Nothing else comes: no final response and no close.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        assert provider.open_streams == 1
    finally:
        writer.close()
        await writer.wait_closed()
    await provider.wait_until(lambda: record.disconnected, timeout=2.0)
    assert record.outcome == "disconnected"
    assert record.sent == b""
    assert provider.open_streams == 0
    assert provider.stats()["by_status"] == {"101": 1}


async def test_raw_other_1xx_is_sent_alone_then_held(url: str, provider: FakeProvider) -> None:
    for status, line in ((103, b"HTTP/1.1 103 Early Hints"), (100, b"HTTP/1.1 100 Continue")):
        body = {"model": f"fake-claude@raw_status={status}", "max_tokens": 5, "messages": []}
        reader, writer = await _raw_request(url, "/v1/messages", ANT_HEADERS, body)
        try:
            assert await reader.readuntil(b"\r\n\r\n") == line + b"\r\n\r\n"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.2)
            record = provider.records[-1]
            assert record.status == status
            assert not record.completed
        finally:
            writer.close()
            await writer.wait_closed()
        await provider.wait_until(lambda rec=record: rec.disconnected, timeout=2.0)
        assert record.outcome == "disconnected"


async def test_raw_final_status_sends_an_error_body_and_closes(
    url: str, provider: FakeProvider
) -> None:
    reader, writer = await _raw_request(
        url, "/v1/chat/completions", OAI_HEADERS, {**CHAT_BODY, "model": "fake-gpt@raw_status=600"}
    )
    try:
        data = await reader.read()  # up to the end of the stream: the fake closes
    finally:
        writer.close()
        await writer.wait_closed()
    status, fields, body = _split_response(data)
    assert status == b"HTTP/1.1 600 Unknown Status"
    assert fields[b"content-type"] == b"application/json"
    assert int(fields[b"content-length"]) == len(body)
    assert fields[b"connection"] == b"close"
    assert fields[b"x-request-id"].startswith(b"req_")
    assert json.loads(body) == {
        "error": {"message": "Error.", "type": "server_error", "param": None, "code": None}
    }
    record = provider.records[0]
    assert (record.status, record.outcome, record.completed) == (600, "error_status", True)
    assert record.sent == body

    headers = {**ANT_HEADERS, "x-fake-retry-after": "3", "x-fake-echo-key": "1"}
    body_in = {"model": "fake-claude@raw_status=999", "max_tokens": 5, "messages": []}
    reader, writer = await _raw_request(url, "/v1/messages", headers, body_in)
    try:
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status, fields, body = _split_response(data)
    assert status == b"HTTP/1.1 999 Unknown Status"
    assert fields[b"retry-after"] == b"3"
    answer = json.loads(body)
    assert answer["error"] == {
        "type": "api_error",
        "message": f"Error. (api key: {ANTHROPIC_KEY})",
    }
    assert answer["request_id"] == fields[b"request-id"].decode()
    assert provider.records[1].outcome == "error_status"


async def test_raw_final_statuses_parse_in_a_strict_client(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    for status in (200, 503, 600):
        headers = {**OAI_HEADERS, "x-fake-raw-status": str(status), "x-fake-status": "429"}
        body = {**CHAT_BODY, "stream": True}
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == status  # raw_status wins over status
            assert resp.headers["Content-Type"] == "application/json"
            error = (await resp.json())["error"]
        assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
        assert provider.records[-1].status == status
    async with http.post(
        url + "/v1/chat/completions",
        json=CHAT_BODY,
        headers={**OAI_HEADERS, "x-fake-raw-status": "99"},
    ) as resp:
        assert resp.status == 400
        assert "'raw_status'" in (await resp.json())["error"]["message"]


async def test_omit_done_ends_cleanly_without_the_end_marker(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    chat = {
        **CHAT_BODY,
        "model": "fake-gpt@chunks=2,omit_done=1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(url + "/v1/chat/completions", json=chat, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert b"[DONE]" not in data
    events = sse_data(data)
    assert len(events) == 5  # role, 2 content, finish, usage
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 2
    assert provider.records[-1].outcome == "complete"

    completions = {"model": "fake-gpt@chunks=2,omit_done=1", "prompt": "Hi", "stream": True}
    async with http.post(url + "/v1/completions", json=completions, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert b"[DONE]" not in data
    assert sse_data(data)[-1]["choices"][0]["finish_reason"] == "stop"

    messages = {"model": "fake-claude@chunks=2,omit_done=1", "max_tokens": 9, "stream": True}
    async with http.post(
        url + "/v1/messages", json={**messages, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        data = await resp.read()
    assert b"message_stop" not in data
    assert data.endswith(b"\n\n")
    assert sse_data(data)[-1]["type"] == "message_delta"

    responses = {"model": "fake-gpt@chunks=2,omit_done=1", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    kinds = [e["type"] for e in sse_data(data)]
    assert kinds[-1] == "response.output_item.done"
    assert "response.completed" not in kinds
    assert provider.records[-1].outcome == "complete"

    for name, marker in (
        ("openai-chat/openai-text", b"data: [DONE]\n\n"),
        ("anthropic-messages/anthropic-text", b"event: message_stop\n"),
    ):
        path, headers = replay_target(name)
        script = {"x-fake-replay": name, "x-fake-omit-done": "true"}
        async with http.post(url + path, json={"model": "m"}, headers={**headers, **script}) as r:
            data = await r.read()
        expected = expected_replay(name, 0)
        cut = expected.rindex(marker)
        assert data == expected[:cut], name


async def test_event_bytes_pads_the_first_content_event(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    size = 1_000_000
    body = {**CHAT_BODY, "model": f"fake-gpt@chunks=3,event_bytes={size}", "stream": True}
    reads: list[bytes] = []
    async with http.post(url + "/v1/chat/completions", json=body, headers=OAI_HEADERS) as resp:
        async for piece in resp.content.iter_any():
            reads.append(piece)
    data = b"".join(reads)
    events = [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    big = events[1]
    assert len(big) == size
    assert big.count(b"\n") == 2  # one data: line and the blank line
    content = json.loads(big.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
    assert content == fake_tokens(1)[0] + "x" * (len(content) - len(fake_tokens(1)[0]))
    assert [len(e) < 1000 for e in events] == [True, False, True, True, True, True]
    # Written in pieces of at most 64 KiB, and read in many reads.
    record = provider.records[0]
    assert record.writes >= math.ceil(size / 65536) + 5
    start = len(events[0])
    offsets = list(itertools.accumulate(len(r) for r in reads))
    reads_in_event = sum(
        1
        for end, r in zip(offsets, reads, strict=True)
        if end > start and end - len(r) < start + size
    )
    assert reads_in_event >= 2


async def test_event_bytes_per_api_and_below_the_natural_size(
    http: aiohttp.ClientSession, url: str
) -> None:
    size = 100_000
    body = {"model": f"fake-claude@line_ending=crlf,event_bytes={size}", "stream": True}
    async with http.post(
        url + "/v1/messages", json={**body, "max_tokens": 5, "messages": []}, headers=ANT_HEADERS
    ) as resp:
        data = await resp.read()
    events = [e + b"\r\n\r\n" for e in data.split(b"\r\n\r\n")[:-1]]
    deltas = [e for e in events if e.startswith(b"event: content_block_delta")]
    assert [len(e) for e in deltas][:1] == [size]
    assert all(len(e) < 1000 for e in deltas[1:])

    responses = {"model": f"fake-gpt@event_bytes={size}", "input": "Hi", "stream": True}
    async with http.post(url + "/v1/responses", json=responses, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    events = [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    delta = next(e for e in events if e.startswith(b"event: response.output_text.delta"))
    assert len(delta) == size
    final = sse_data(events[-1])[0]
    assert final["type"] == "response.completed"
    assert len(final["response"]["output"][0]["content"][0]["text"]) > size - 1000

    tool = {**CHAT_BODY, "model": f"fake-gpt@tool=1,event_bytes={size}", "stream": True}
    async with http.post(url + "/v1/chat/completions", json=tool, headers=OAI_HEADERS) as resp:
        data = await resp.read()
    assert len(data.split(b"\n\n")[1]) + 2 == size

    small = {**CHAT_BODY, "model": "fake-gpt@chunks=2,event_bytes=10", "stream": True}
    async with http.post(url + "/v1/chat/completions", json=small, headers=OAI_HEADERS) as resp:
        events_small = sse_data(await resp.read())
    assert [e["choices"][0]["delta"].get("content") for e in events_small[1:3]] == fake_tokens(2)
