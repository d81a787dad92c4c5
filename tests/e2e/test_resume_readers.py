"""Reattaches are bounded: per stream and per caller, on each instance (each follows a live
tail, and with Redis holds a connection): past the bound a 429 in the caller's format."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from tests.support import CALLER_KEY, GatewayFactory

OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
BODY = orjson.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
)


async def test_reattaches_past_the_bounds_get_429(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"resume": {"enabled": True, "max_readers_per_stream": 2, "max_readers_per_caller": 3}}
    )
    slow = {**OA, "x-fake-chunks": "40", "x-fake-gap-ms": "50"}
    async with aiohttp.ClientSession() as session:
        first = await session.post(gw.url + "/v1/chat/completions", data=BODY, headers=slow)
        second = await session.post(gw.url + "/v1/chat/completions", data=BODY, headers=slow)
        ids = [first.headers["x-gateway-stream-id"], second.headers["x-gateway-stream-id"]]
        await first.content.readany()

        async def reattach(stream_id: str) -> aiohttp.ClientResponse:
            return await session.get(f"{gw.url}/v1/streams/{stream_id}?offset=0", headers=OA)

        followers = [await reattach(ids[0]), await reattach(ids[0])]
        assert [r.status for r in followers] == [200, 200]
        await asyncio.gather(*(r.content.readany() for r in followers))
        busy = await reattach(ids[0])  # a third reader of one stream
        assert busy.status == 429
        error = (await busy.json())["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert "max_readers_per_stream" in error["message"]
        third = await reattach(ids[1])  # the caller's third reader: still within its bound
        assert third.status == 200
        await third.content.readany()
        fourth = await reattach(ids[1])  # its fourth: over the caller's bound
        assert fourth.status == 429
        for r in (*followers, third):
            r.close()
        await asyncio.sleep(0.1)
        again = await reattach(ids[0])  # the bound counts open readers only
        assert again.status == 200
        again.close()
        first.close()
        second.close()
