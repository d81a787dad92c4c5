"""gateway.client: the resuming transports against a small server speaking the gateway's
resume protocol on a real socket (it cuts the TCP connection where a test tells it to)."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from aiohttp import web

from gateway.client import AsyncResumingTransport, ResumingTransport, _Resume, _Verdict

RECORDINGS = Path(__file__).parent / "data" / "recorded-streams"
KEY = "test-resume-caller-key"
STALL_S = 5.0  # a stall outlasts any read timeout the tests set; a disconnect ends it


# --- The canned streams.


def numbered_stream(events: int = 40) -> bytes:
    """An OpenAI-style SSE body whose events differ in size, then `[DONE]`."""
    parts = [f'data: {{"n":{i},"pad":"{"x" * (i % 7 * 5)}"}}\n\n'.encode() for i in range(events)]
    return b"".join(parts) + b"data: [DONE]\n\n"


def openai_recording() -> tuple[bytes, str]:
    """A real OpenAI chat stream framed as sent, and the text it carries."""
    lines = (RECORDINGS / "openai-chat" / "openai-text.chunks.jsonl").read_bytes().splitlines()
    text = ""
    for line in lines:
        for choice in json.loads(line)["choices"]:
            text += choice["delta"].get("content") or ""
    body = b"".join(b"data: " + line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"
    return body, text


def anthropic_recording() -> tuple[bytes, str]:
    """A real Anthropic messages stream framed as sent, and the text it carries."""
    path = RECORDINGS / "anthropic-messages" / "anthropic-text.chunks.jsonl"
    body, text = b"", ""
    for line in path.read_bytes().splitlines():
        event = json.loads(line)
        body += b"event: " + event["type"].encode() + b"\ndata: " + line + b"\n\n"
        if event["type"] == "content_block_delta":
            text += event["delta"].get("text", "")
    return body, text


BODIES = {"numbers": numbered_stream(), "openai": openai_recording()[0]}
BODIES["anthropic"] = anthropic_recording()[0]


# --- A server speaking the resume protocol.


@dataclass
class Stream:
    body: bytes
    credentials: dict[str, str]
    prefix: str
    cuts: list[int]  # absolute offsets where the connection is cut, each once
    stalls: list[int]  # absolute offsets where the server goes silent, each once
    rst: bool  # cut with a TCP reset (the client sees ReadError), else a FIN
    reattach_statuses: list[int]  # answers to the next reattaches, before serving again
    chunk: int
    wrong_offset: bool  # the reattach answer claims to start elsewhere


@dataclass
class Reattach:
    path: str
    offset: int
    headers: dict[str, str]


@dataclass
class EmulatedGateway:
    """The resume protocol: a stream is served with its id and cut where its request said
    (headers ``x-test-*``), and ``<prefix>/v1/streams/{id}?offset=N`` serves it from N."""

    streams: dict[str, Stream] = field(default_factory=dict)
    reattaches: list[Reattach] = field(default_factory=list)
    originals: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        prefix, _, rest = path.rpartition("/v1/")
        if request.method == "GET" and rest.startswith("streams/"):
            return await self._reattach(request, prefix, rest.removeprefix("streams/"))
        return await self._original(request, prefix)

    async def _original(self, request: web.Request, prefix: str) -> web.StreamResponse:
        payload = await request.json()
        self.originals.append(dict(request.headers))
        h = request.headers
        stream_id = "gs_" + secrets.token_urlsafe(16)
        headers = {} if h.get("x-test-no-id") else {"x-gateway-stream-id": stream_id}
        if not payload.get("stream", True):
            return web.json_response({"ok": True}, headers=headers)
        stream = Stream(
            body=BODIES[h.get("x-test-body", "numbers")],
            credentials={
                name: h[name]
                for name in ("authorization", "x-api-key", "anthropic-version")
                if name in h
            },
            prefix=prefix,
            cuts=_offsets(h.get("x-test-cuts", "")),
            stalls=_offsets(h.get("x-test-stalls", "")),
            rst=h.get("x-test-cut") == "rst",
            reattach_statuses=[int(s) for s in _offsets(h.get("x-test-reattach", ""))],
            chunk=int(h.get("x-test-chunk", "16")),
            wrong_offset=bool(h.get("x-test-wrong-offset")),
        )
        self.streams[stream_id] = stream
        return await self._serve(request, stream, 0, {**headers, "x-test-serving": "original"})

    async def _reattach(self, request: web.Request, prefix: str, sid: str) -> web.StreamResponse:
        offset = int(request.query.get("offset", request.headers.get("last-event-id", "0")))
        self.reattaches.append(Reattach(request.path_qs, offset, dict(request.headers)))
        stream = self.streams.get(sid)
        if (
            stream is None
            or stream.prefix != prefix
            or any(request.headers.get(k) != v for k, v in stream.credentials.items())
        ):
            return _error(404, "unknown stream")
        if stream.reattach_statuses:
            return _error(stream.reattach_statuses.pop(0), "scripted")
        if offset > len(stream.body):
            return _error(416, "offset past the end")
        said = offset + 1 if stream.wrong_offset else offset
        headers = {"x-test-serving": "reattach", "x-gateway-stream-offset": str(said)}
        return await self._serve(request, stream, offset, headers)

    async def _serve(
        self, request: web.Request, stream: Stream, start: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", **headers})
        await resp.prepare(request)
        body, pos = stream.body, start
        try:
            while pos < len(body):
                if stream.stalls and stream.stalls[0] <= pos:
                    stream.stalls.pop(0)
                    await asyncio.sleep(STALL_S)
                if stream.cuts and stream.cuts[0] <= pos:
                    stream.cuts.pop(0)
                    _cut(request, rst=stream.rst)
                    return resp
                end = min(pos + stream.chunk, len(body), *stream.cuts, *stream.stalls)
                await resp.write(body[pos:end])
                pos = end
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp


def _offsets(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "test"}}, status=status)


def _cut(request: web.Request, *, rst: bool) -> None:
    transport = request.transport
    assert transport is not None
    if rst:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ServerThread:
    """The emulated gateway on a loopback port, its own event loop in a thread (so the sync
    clients can block on it)."""

    def __init__(self, gateway: EmulatedGateway) -> None:
        self.gateway = gateway
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="emulated-gateway", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "the emulated gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        assert stop is not None
        self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.gateway.handle)
        runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(EmulatedGateway()) as running:
        yield running


# --- Helpers.

BODY = BODIES["numbers"]
HEADERS = {"authorization": f"Bearer {KEY}"}


def _headers(extra: dict[str, str]) -> dict[str, str]:
    """HEADERS plus `extra`, whose names may be spelt with underscores (x_test_cuts)."""
    return {**HEADERS, **{name.replace("_", "-"): value for name, value in extra.items()}}


def post(client: httpx.Client, url: str, **headers: str) -> httpx.Response:
    request = client.build_request("POST", url, json={"stream": True}, headers=_headers(headers))
    return client.send(request, stream=True)


def read_all(client: httpx.Client, url: str, **headers: str) -> tuple[httpx.Response, bytes]:
    response = post(client, url, **headers)
    try:
        return response, b"".join(response.iter_raw())
    finally:
        response.close()


async def aread_all(
    client: httpx.AsyncClient, url: str, **headers: str
) -> tuple[httpx.Response, bytes]:
    request = client.build_request("POST", url, json={"stream": True}, headers=_headers(headers))
    response = await client.send(request, stream=True)
    try:
        return response, b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()


def sync_client(**options: Any) -> httpx.Client:
    return httpx.Client(transport=ResumingTransport(backoff_s=0, **options))


def async_client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AsyncResumingTransport(backoff_s=0, **options))


def chat_url(server: ServerThread) -> str:
    return f"{server.url}/gw/v1/chat/completions"


# --- Resuming.


@pytest.mark.parametrize("cut", ["fin", "rst"])
def test_a_cut_mid_body_is_resumed(server: ServerThread, cut: str) -> None:
    with sync_client() as client:
        response, body = read_all(client, chat_url(server), x_test_cuts="301", x_test_cut=cut)
    assert body == BODY
    assert response.status_code == 200
    assert response.headers["x-test-serving"] == "original"  # what the SDK sees
    assert len(server.gateway.reattaches) == 1
    if cut == "fin":  # a FIN delivers every byte before it: the offset is the cut exactly
        assert server.gateway.reattaches[0].offset == 301


@pytest.mark.parametrize("cut", ["fin", "rst"])
async def test_a_cut_mid_body_is_resumed_async(server: ServerThread, cut: str) -> None:
    async with async_client() as client:
        response, body = await aread_all(
            client, chat_url(server), x_test_cuts="301", x_test_cut=cut
        )
    assert body == BODY
    assert response.headers["x-test-serving"] == "original"
    assert len(server.gateway.reattaches) == 1


def test_two_cuts(server: ServerThread) -> None:
    with sync_client() as client:
        _, body = read_all(client, chat_url(server), x_test_cuts="100,700")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [100, 700]


async def test_two_cuts_async(server: ServerThread) -> None:
    async with async_client() as client:
        _, body = await aread_all(client, chat_url(server), x_test_cuts="100,700")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [100, 700]


def test_a_cut_at_an_event_boundary_and_one_mid_event(server: ServerThread) -> None:
    boundary = BODY.index(b"\n\n", 200) + 2
    mid = BODY.index(b'"pad"', boundary + 50) + 2
    assert BODY[boundary - 2 : boundary] == b"\n\n"
    with sync_client() as client:
        _, body = read_all(client, chat_url(server), x_test_cuts=f"{boundary},{mid}")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [boundary, mid]


async def test_cuts_one_byte_apart_and_the_last_byte_async(server: ServerThread) -> None:
    # Byte 1, byte 2 and just before the end: a reattach may itself be cut at once.
    last = len(BODY) - 1
    async with async_client() as client:
        _, body = await aread_all(
            client, chat_url(server), x_test_cuts=f"1,2,{last}", x_test_chunk="1"
        )
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [1, 2, last]


def test_the_reattach_carries_the_credentials_offset_and_prefix(server: ServerThread) -> None:
    extra = {
        "x-api-key": "test-anthropic-style-key",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "tools-2024-04-04",
        "x-test-cuts": "250",
    }
    with sync_client() as client:
        _, body = read_all(client, chat_url(server), **extra)
    assert body == BODY
    (reattach,) = server.gateway.reattaches
    stream_id = next(iter(server.gateway.streams))
    assert reattach.path == f"/gw/v1/streams/{stream_id}?offset=250"
    headers = {k.lower(): v for k, v in reattach.headers.items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-api-key"] == "test-anthropic-style-key"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "tools-2024-04-04"
    assert headers["accept-encoding"] == "identity"
    for absent in ("content-type", "content-length", "x-test-cuts"):
        assert absent not in headers


async def test_the_reattach_carries_the_credentials_async(server: ServerThread) -> None:
    async with async_client() as client:
        _, body = await aread_all(client, chat_url(server), x_test_cuts="50")
    assert body == BODY
    (reattach,) = server.gateway.reattaches
    assert reattach.path.startswith("/gw/v1/streams/gs_")
    assert reattach.path.endswith("?offset=50")
    assert {k.lower(): v for k, v in reattach.headers.items()}["authorization"] == f"Bearer {KEY}"


def test_a_stream_without_a_path_prefix(server: ServerThread) -> None:
    with sync_client() as client:
        _, body = read_all(client, f"{server.url}/v1/messages", x_test_cuts="77")
    assert body == BODY
    assert server.gateway.reattaches[0].path.startswith("/v1/streams/gs_")


# --- Failed reattaches.


@pytest.mark.parametrize("status", [404, 410, 416, 401])
def test_a_refused_reattach_raises_the_original_error(server: ServerThread, status: int) -> None:
    with sync_client() as client, pytest.raises(httpx.RemoteProtocolError) as caught:
        read_all(client, chat_url(server), x_test_cuts="300", x_test_reattach=str(status))
    assert len(server.gateway.reattaches) == 1  # refused: never asked again
    assert any(f"answered {status}" in note for note in caught.value.__notes__)


async def test_a_refused_reattach_raises_the_original_error_async(server: ServerThread) -> None:
    async with async_client() as client:
        with pytest.raises(httpx.ReadError):
            await aread_all(
                client, chat_url(server), x_test_cuts="300", x_test_cut="rst", x_test_reattach="404"
            )
    assert len(server.gateway.reattaches) == 1


def test_a_reattach_that_starts_elsewhere_is_refused(server: ServerThread) -> None:
    with sync_client() as client, pytest.raises(httpx.RemoteProtocolError) as caught:
        read_all(client, chat_url(server), x_test_cuts="300", x_test_wrong_offset="1")
    assert len(server.gateway.reattaches) == 1
    assert any("started at byte 301, not 300" in note for note in caught.value.__notes__)


def test_another_callers_reattach_is_refused(server: ServerThread) -> None:
    # The server answers 404 to other credentials; the transport carries the original ones,
    # so this only happens when the stream is gone. Here: ask for it with another key.
    with sync_client() as client:
        _, body = read_all(client, chat_url(server))
        stream_id = next(iter(server.gateway.streams))
        stolen = client.get(
            f"{server.url}/gw/v1/streams/{stream_id}?offset=0",
            headers={"authorization": "Bearer someone-else"},
        )
    assert body == BODY
    assert stolen.status_code == 404


def test_max_resumes_exceeded_raises(server: ServerThread) -> None:
    with sync_client(max_resumes=2) as client, pytest.raises(httpx.RemoteProtocolError) as caught:
        read_all(client, chat_url(server), x_test_cuts="100,200,300,400")
    assert [r.offset for r in server.gateway.reattaches] == [100, 200]
    assert any("max_resumes=2" in note for note in caught.value.__notes__)


async def test_max_resumes_exceeded_raises_async(server: ServerThread) -> None:
    async with async_client(max_resumes=1) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await aread_all(client, chat_url(server), x_test_cuts="100,200")
    assert len(server.gateway.reattaches) == 1


def test_max_resumes_zero_never_reattaches(server: ServerThread) -> None:
    with sync_client(max_resumes=0) as client, pytest.raises(httpx.RemoteProtocolError):
        read_all(client, chat_url(server), x_test_cuts="100")
    assert server.gateway.reattaches == []


def test_a_struggling_gateway_is_retried(server: ServerThread) -> None:
    with httpx.Client(transport=ResumingTransport(backoff_s=0.01)) as client:
        _, body = read_all(client, chat_url(server), x_test_cuts="100", x_test_reattach="503,429")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [100, 100, 100]


async def test_a_struggling_gateway_is_retried_until_max_resumes_async(
    server: ServerThread,
) -> None:
    transport = AsyncResumingTransport(max_resumes=3, backoff_s=0.01)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await aread_all(
                client, chat_url(server), x_test_cuts="100", x_test_reattach="503,503,503,503"
            )
    assert len(server.gateway.reattaches) == 3
    assert any("answered 503" in note for note in caught.value.__notes__)


def test_a_reattach_that_cannot_connect_is_retried_then_gives_up() -> None:
    # The gateway vanished after the cut: every reattach fails to connect.
    gone = EmulatedGateway()
    server = ServerThread(gone).__enter__()
    stopped = False
    got = bytearray()
    try:
        with sync_client(max_resumes=2) as client:
            response = post(client, chat_url(server), x_test_cuts="100")
            chunks = response.iter_raw()
            got += next(chunks)
            while any(stream.cuts for stream in gone.streams.values()):
                time.sleep(0.01)  # until the server has cut (it wrote all 100 bytes)
            server.__exit__()
            stopped = True
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                got.extend(b"".join(_yielded(chunks, got)))
            response.close()
    finally:
        if not stopped:
            server.__exit__()
    assert got == BODY[:100]
    assert any("ConnectError" in note for note in caught.value.__notes__)
    assert any("max_resumes=2" in note for note in caught.value.__notes__)


def _yielded(chunks: Iterator[bytes], into: bytearray) -> Iterator[bytes]:
    """`chunks`, each also added to `into` as it comes (kept when the iteration raises)."""
    for chunk in chunks:
        into.extend(chunk)
        yield b""


# --- Read timeouts.


def test_a_read_timeout_resumes_once(server: ServerThread) -> None:
    with httpx.Client(transport=ResumingTransport(backoff_s=0), timeout=0.5) as client:
        _, body = read_all(client, chat_url(server), x_test_stalls="400")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [400]


async def test_a_read_timeout_with_no_byte_since_the_last_is_raised_async(
    server: ServerThread,
) -> None:
    transport = AsyncResumingTransport(backoff_s=0)
    async with httpx.AsyncClient(transport=transport, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await aread_all(client, chat_url(server), x_test_stalls="400,400")
    assert [r.offset for r in server.gateway.reattaches] == [400]
    assert any("read timeout again" in note for note in caught.value.__notes__)


async def test_read_timeouts_with_progress_between_them_resume_async(
    server: ServerThread,
) -> None:
    transport = AsyncResumingTransport(backoff_s=0)
    async with httpx.AsyncClient(transport=transport, timeout=0.5) as client:
        _, body = await aread_all(client, chat_url(server), x_test_stalls="300,600")
    assert body == BODY
    assert [r.offset for r in server.gateway.reattaches] == [300, 600]


# --- Left alone.


class Recorder(httpx.BaseTransport):
    """A transport that remembers every response it returned, and its stream then."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.responses: list[tuple[httpx.Response, object]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.responses.append((response, response.stream))
        return response

    def close(self) -> None:
        self.inner.close()


def _send(transport: httpx.BaseTransport, url: str, **headers: str) -> httpx.Response:
    body = json.dumps({"stream": headers.pop("stream", "1") == "1"}).encode()
    request = httpx.Request("POST", url, content=body, headers=_headers(headers))
    return transport.handle_request(request)


def test_a_non_stream_answer_is_untouched(server: ServerThread) -> None:
    recorder = Recorder()
    with ResumingTransport(recorder) as transport:
        response = _send(transport, chat_url(server), stream="0")
        assert "x-gateway-stream-id" in response.headers  # not a stream: not wrapped all the same
        assert (response, response.stream) == recorder.responses[0]
        response.read()
    assert response.json() == {"ok": True}


def test_a_stream_without_the_header_is_untouched(server: ServerThread) -> None:
    recorder = Recorder()
    with ResumingTransport(recorder) as transport:
        response = _send(transport, chat_url(server), x_test_no_id="1")
        assert (response, response.stream) == recorder.responses[0]
        assert response.read() == BODY
    with sync_client() as client, pytest.raises(httpx.RemoteProtocolError):
        read_all(client, chat_url(server), x_test_no_id="1", x_test_cuts="100")
    assert server.gateway.reattaches == []


def test_a_stream_with_the_header_is_wrapped(server: ServerThread) -> None:
    recorder = Recorder()
    with ResumingTransport(recorder) as transport:
        response = _send(transport, chat_url(server))
        assert response is recorder.responses[0][0]
        assert response.stream is not recorder.responses[0][1]
        assert response.read() == BODY


async def test_a_stream_without_the_header_is_untouched_async(server: ServerThread) -> None:
    async with async_client() as client:
        with pytest.raises(httpx.ReadError):
            await aread_all(
                client, chat_url(server), x_test_no_id="1", x_test_cuts="100", x_test_cut="rst"
            )
    assert server.gateway.reattaches == []


def test_a_malformed_stream_id_is_not_followed() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream", "x-gateway-stream-id": "../../admin"}
        return httpx.Response(200, headers=headers, content=b"data: 1\n\n")

    inner = httpx.MockTransport(answer)
    request = httpx.Request("POST", "http://gateway.test/v1/chat/completions", json={})
    response = ResumingTransport(inner).handle_request(request)
    assert isinstance(response.stream, httpx.ByteStream)  # the mock's own, not wrapped


# --- Closing.


class _Tracked(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream) -> None:
        self.inner = inner
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.inner)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class Tracking(Recorder):
    """A transport whose response streams remember being closed."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[_Tracked] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = tracked = _Tracked(response.stream)
        self.streams.append(tracked)
        return response


def test_closing_closes_the_current_response(server: ServerThread) -> None:
    tracking = Tracking()
    with httpx.Client(transport=ResumingTransport(tracking, backoff_s=0)) as client:
        response = post(client, chat_url(server), x_test_cuts="100", x_test_chunk="10")
        got = b""
        for chunk in response.iter_raw():
            got += chunk
            if len(got) > 200:
                break
        response.close()
    assert got == BODY[: len(got)]
    original, reattach = tracking.streams
    assert original.closed  # when the break was noticed
    assert reattach.closed  # by response.close()


class _AsyncTracked(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


class AsyncTracking(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.streams: list[_AsyncTracked] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        tracked = _AsyncTracked(response.stream)
        self.streams.append(tracked)
        response.stream = tracked
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_closing_closes_the_current_response_async(server: ServerThread) -> None:
    tracking = AsyncTracking()
    transport = AsyncResumingTransport(tracking, backoff_s=0)
    async with httpx.AsyncClient(transport=transport) as client:
        request = client.build_request(
            "POST", chat_url(server), json={}, headers=_headers({"x_test_cuts": "100"})
        )
        response = await client.send(request, stream=True)
        got = b""
        async for chunk in response.aiter_raw():
            got += chunk
            if len(got) > 200:
                break
        await response.aclose()
    assert got == BODY[: len(got)]
    assert [s.closed for s in tracking.streams] == [True, True]


def test_the_backoff_starts_at_zero_grows_and_resets() -> None:
    request = httpx.Request("POST", "http://gw.test/p/v1/messages", headers={"x-api-key": "k"})
    plan = _Resume(request, httpx.URL("http://gw.test/p/v1/streams/gs_x"), 4, 0.5)
    plan.received(10)
    delays = []
    for answer in (503, 502):
        attempt = plan.next_try()
        assert attempt is not None
        delays.append(attempt[0])
        assert plan.answered(httpx.Response(answer)) is _Verdict.RETRY
    attempt = plan.next_try()
    assert attempt is not None
    delays.append(attempt[0])
    ok = httpx.Response(200, headers={"content-type": "text/event-stream"})
    assert plan.answered(ok) is _Verdict.ACCEPT
    attempt = plan.next_try()  # a later break: immediate again
    assert attempt is not None
    delays.append(attempt[0])
    assert delays == [0.0, 0.5, 1.0, 0.0]
    assert str(attempt[1].url) == "http://gw.test/p/v1/streams/gs_x?offset=10"
    assert attempt[1].headers["x-api-key"] == "k"
    assert plan.next_try() is None  # four in all


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        ResumingTransport(max_resumes=-1)
    with pytest.raises(ValueError, match="negative"):
        AsyncResumingTransport(backoff_s=-0.1)


# --- The official SDKs.


def _cuts(body: bytes) -> str:
    # Mid-event both: a third of the way in plus a few bytes, and two thirds.
    return f"{len(body) // 3 + 5},{2 * len(body) // 3 + 11}"


def test_openai_sdk_stream_is_resumed(server: ServerThread) -> None:
    body, text = openai_recording()
    client = openai.OpenAI(
        base_url=f"{server.url}/gw/v1",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(transport=ResumingTransport(backoff_s=0)),
    )
    with client:
        stream = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-test-body": "openai", "x-test-cuts": _cuts(body)},
        )
        got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert got == text
    assert len(server.gateway.reattaches) == 2


async def test_openai_async_sdk_stream_is_resumed(server: ServerThread) -> None:
    body, text = openai_recording()
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/gw/v1",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=AsyncResumingTransport(backoff_s=0)),
    )
    async with client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={
                "x-test-body": "openai",
                "x-test-cuts": _cuts(body),
                "x-test-cut": "rst",
            },
        )
        got = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert got == text
    assert len(server.gateway.reattaches) == 2


def test_anthropic_sdk_stream_is_resumed(server: ServerThread) -> None:
    body, text = anthropic_recording()
    client = anthropic.Anthropic(
        base_url=f"{server.url}/gw",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(transport=ResumingTransport(backoff_s=0)),
    )
    with (
        client,
        client.messages.stream(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-test-body": "anthropic", "x-test-cuts": _cuts(body)},
        ) as stream,
    ):
        got = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert got == text
    assert final.stop_reason is not None
    # The SDK's credentials (its version sends the key as a bearer token) and API version.
    original = {k.lower(): v for k, v in server.gateway.originals[0].items()}
    assert "anthropic-version" in original
    for reattach in server.gateway.reattaches:
        carried = {k.lower(): v for k, v in reattach.headers.items()}
        for name in ("authorization", "x-api-key", "anthropic-version"):
            assert carried.get(name) == original.get(name)
    assert len(server.gateway.reattaches) == 2


async def test_anthropic_async_sdk_stream_is_resumed(server: ServerThread) -> None:
    body, text = anthropic_recording()
    client = anthropic.AsyncAnthropic(
        base_url=f"{server.url}/gw",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=AsyncResumingTransport(backoff_s=0)),
    )
    async with (
        client,
        client.messages.stream(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-test-body": "anthropic", "x-test-cuts": _cuts(body)},
        ) as stream,
    ):
        got = "".join([delta async for delta in stream.text_stream])
    assert got == text
    assert len(server.gateway.reattaches) == 2
