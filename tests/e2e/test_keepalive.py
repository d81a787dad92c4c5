"""Keep-alive comments during upstream silence: they reach the client, only between events,
and they never hide a dead upstream from the chunk timeout."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support import CALLER_KEY, UPSTREAM_KEYS, Fake, GatewayFactory

KEEPALIVE = b": keep-alive\n\n"
BODY = orjson.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
)


async def read_timed(url: str, headers: dict[str, str]) -> list[tuple[float, bytes]]:
    pieces: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=BODY, headers={"authorization": f"Bearer {CALLER_KEY}", **headers}
        ) as resp:
            assert resp.status == 200
            async for piece in resp.content.iter_any():
                pieces.append((time.perf_counter(), piece))
    return pieces


async def test_keepalives_fill_silence_between_events(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory({"server": {"keepalive_comment_s": 0.15}})
    pieces = await read_timed(
        gw.url + "/v1/chat/completions", {"x-fake-chunks": "3", "x-fake-gap-ms": "500"}
    )
    body = b"".join(p for _, p in pieces)
    assert body.count(KEEPALIVE) >= 6  # ~3 per 500 ms gap, 5 gaps
    # Without the comments, exactly the upstream's bytes.
    assert body.replace(KEEPALIVE, b"") == bytes(fake.provider.records[0].sent)
    # Every comment arrives on its own, at an event boundary.
    text = body
    for event in [e for e in text.split(b"\n\n") if e]:
        assert event == b": keep-alive" or event.startswith(b"data: ")


async def test_no_keepalive_inside_a_half_written_event(
    gateway_factory: GatewayFactory,
) -> None:
    """An upstream that stops in the middle of an event: no comment may be spliced in."""
    half = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"con'
    rest = b'tent":"hi"},"finish_reason":null}]}\n\ndata: [DONE]\n\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        )
        await resp.write(half)
        await asyncio.sleep(0.8)
        await resp.write(rest)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        gw = await gateway_factory(
            {
                "server": {"keepalive_comment_s": 0.1},
                "providers": {
                    "oa": {
                        "base_url": str(server.make_url("/v1")),
                        "keys": [{"id": "k", "secret": UPSTREAM_KEYS[0]}],
                    }
                },
            }
        )
        pieces = await read_timed(gw.url + "/v1/chat/completions", {})
    finally:
        await server.close()
    body = b"".join(p for _, p in pieces)
    assert KEEPALIVE not in body
    assert body.endswith(b"data: [DONE]\n\n")


async def test_keepalives_do_not_postpone_the_chunk_timeout(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(
        {"server": {"keepalive_comment_s": 0.1}, "policy": {"timeouts": {"chunk_s": 0.6}}}
    )
    started = time.perf_counter()
    pieces = await read_timed(gw.url + "/v1/chat/completions", {"x-fake-stall-after": "2"})
    elapsed = time.perf_counter() - started
    body = b"".join(p for _, p in pieces)
    assert body.count(KEEPALIVE) >= 3
    last = [e for e in body.split(b"\n\n") if e][-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"
    assert elapsed < 3  # killed at chunk_s, not kept alive by its own comments


async def test_keepalive_off(gateway_factory: GatewayFactory, fake: Fake) -> None:
    gw = await gateway_factory({"server": {"keepalive_comment_s": 0}})
    pieces = await read_timed(
        gw.url + "/v1/chat/completions", {"x-fake-chunks": "2", "x-fake-gap-ms": "300"}
    )
    assert KEEPALIVE not in b"".join(p for _, p in pieces)
