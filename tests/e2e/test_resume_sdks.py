"""The official SDKs with gateway.client's resuming transports, through a real `gateway serve`
with resumable streams on: a TCP proxy between the SDK and the gateway cuts the connection
once mid-stream, and the SDK still reads the whole answer, while the upstream ran exactly one
generation to its end (the gateway kept reading it; the reattach was served from its bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from gateway.client import AsyncResumingTransport, ResumingTransport
from gateway.fake import fake_tokens
from tests.support import CALLER_KEY, Fake, Served, base_config, deep_merge, serve_gateway

CHUNKS = 60
# Slow enough that the cut (a few kB in) lands while the upstream is still sending.
SLOW = {"x-fake-chunks": str(CHUNKS), "x-fake-gap-ms": "20"}
TEXT = "".join(fake_tokens(CHUNKS))
CUT_AFTER = 2500  # bytes from the gateway (headers included): past the head, mid-body


class CuttingProxy:
    """A loopback TCP proxy to the gateway that forwards bytes both ways and, once, cuts the
    connection after `cut_after` bytes came from the gateway (both sides closed at once)."""

    def __init__(self, target_port: int, cut_after: int, fake: Fake) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.fake = fake
        self.connections = 0
        self.cut = False
        self.upstream_done_at_cut: list[bool] = []  # the fake's records' `completed` then
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            gw_r, gw_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, gw_w}

        def close_both() -> None:
            for writer in (client_w, gw_w):
                writer.transport.abort()
                self._writers.discard(writer)

        async def to_gateway() -> None:
            with contextlib.suppress(OSError):
                while data := await client_r.read(65536):
                    gw_w.write(data)
                    await gw_w.drain()

        async def to_client() -> None:
            seen = 0
            with contextlib.suppress(OSError):
                while data := await gw_r.read(65536):
                    if not self.cut and seen + len(data) >= self.cut_after:
                        client_w.write(data[: self.cut_after - seen])
                        await client_w.drain()
                        self.cut = True
                        self.upstream_done_at_cut = [
                            r.completed for r in self.fake.provider.records
                        ]
                        return
                    seen += len(data)
                    client_w.write(data)
                    await client_w.drain()

        pipes = [asyncio.ensure_future(to_gateway()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            close_both()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)


@pytest.fixture
async def served(fake: Fake, tmp_path: Path) -> AsyncIterator[Served]:
    config = deep_merge(base_config(fake.url), {"resume": {"enabled": True}})
    async with serve_gateway(config, tmp_path) as gw:
        yield gw


@pytest.fixture
async def proxy(served: Served, fake: Fake) -> AsyncIterator[CuttingProxy]:
    port = int(served.url.rsplit(":", 1)[1])
    async with CuttingProxy(port, CUT_AFTER, fake) as running:
        yield running


async def assert_one_whole_generation(
    fake: Fake, path: str, proxy: CuttingProxy, *, connections: int = 2
) -> None:
    """The cut happened mid-stream, the SDK reattached once (a second connection), and the
    upstream saw one request that ran to its end: the gateway drained it, nobody re-asked."""
    assert proxy.cut, "the proxy never cut: the stream was shorter than CUT_AFTER"
    assert proxy.upstream_done_at_cut == [False], "the cut came after the upstream ended"
    assert proxy.connections == connections, proxy.connections
    deadline = time.monotonic() + 10
    while not all(r.completed or r.disconnected for r in fake.provider.records):
        assert time.monotonic() < deadline, "the upstream request never ended"
        await asyncio.sleep(0.01)
    records = fake.provider.records
    assert [r.path for r in records] == [path]
    assert records[0].completed
    assert not records[0].disconnected


async def test_the_reattach_endpoint_is_served(served: Served) -> None:
    # The gateway side this file relies on: GET /v1/streams/{id} answers (here: unknown id).
    async with httpx2.AsyncClient() as client:
        response = await client.get(
            f"{served.url}/v1/streams/gs_AAAAAAAAAAAAAAAAAAAAAA?offset=0",
            headers={"authorization": f"Bearer {CALLER_KEY}"},
        )
    assert response.status_code == 404
    assert response.json()["error"]["message"]


async def _drain(stream: AsyncIterable[object]) -> None:
    async for _ in stream:
        pass


async def test_openai_sync_sdk_resumes(fake: Fake, proxy: CuttingProxy) -> None:
    def chat() -> str:
        http_client = httpx2.Client(transport=ResumingTransport())
        with openai.OpenAI(
            base_url=f"{proxy.url}/v1", api_key=CALLER_KEY, max_retries=0, http_client=http_client
        ) as client:
            stream = client.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers=SLOW,
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(chat) == TEXT
    await assert_one_whole_generation(fake, "/v1/chat/completions", proxy)


async def test_openai_async_sdk_resumes(fake: Fake, proxy: CuttingProxy) -> None:
    http_client = httpx2.AsyncClient(transport=AsyncResumingTransport())
    async with openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key=CALLER_KEY, max_retries=0, http_client=http_client
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=SLOW,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == TEXT
    await assert_one_whole_generation(fake, "/v1/chat/completions", proxy)


async def test_anthropic_sync_sdk_resumes(fake: Fake, proxy: CuttingProxy) -> None:
    def messages() -> tuple[str, str | None]:
        http_client = httpx2.Client(transport=ResumingTransport())
        with (
            anthropic.Anthropic(
                base_url=proxy.url, api_key=CALLER_KEY, max_retries=0, http_client=http_client
            ) as client,
            client.messages.stream(
                model="claude-test",
                max_tokens=200,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=SLOW,
            ) as stream,
        ):
            text = "".join(stream.text_stream)
            return text, stream.get_final_message().stop_reason

    text, stop_reason = await asyncio.to_thread(messages)
    assert text == TEXT
    assert stop_reason == "end_turn"
    await assert_one_whole_generation(fake, "/v1/messages", proxy)


async def test_anthropic_async_sdk_resumes(fake: Fake, proxy: CuttingProxy) -> None:
    http_client = httpx2.AsyncClient(transport=AsyncResumingTransport())
    async with (
        anthropic.AsyncAnthropic(
            base_url=proxy.url, api_key=CALLER_KEY, max_retries=0, http_client=http_client
        ) as client,
        client.messages.stream(
            model="claude-test",
            max_tokens=200,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=SLOW,
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == TEXT
    assert final.stop_reason == "end_turn"
    await assert_one_whole_generation(fake, "/v1/messages", proxy)


async def test_without_the_transport_the_cut_breaks_the_stream(
    fake: Fake, proxy: CuttingProxy
) -> None:
    # The control: the same cut, a plain client: the SDK raises (its wrapping of the httpx
    # error), no reattach; the gateway still drains the upstream.
    async with openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key=CALLER_KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=SLOW,
        )
        with pytest.raises(openai.APIConnectionError) as caught:
            await _drain(stream)
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    await assert_one_whole_generation(fake, "/v1/chat/completions", proxy, connections=1)
