"""Resumable streams kept in Redis: a stream started on one gateway instance and dropped is
reattached on another while it is still live, and the live tail follows the writer's appends
to the last byte.

Two `gateway serve` processes (each in its own directory) share one real redis-server (the
`redis_server` fixture), both in front of the in-process fake provider.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.bench.servers import RedisServer
from tests.e2e.test_resume import (
    access_lines,
    an_auth,
    assert_anthropic_error,
    assert_openai_error,
    chat_body,
    line_of,
    oa_auth,
    open_stream,
    read_events,
    read_rest,
    reattach,
    resume,
    wait_done,
)
from tests.support import (
    OTHER_CALLER_KEY,
    Fake,
    Served,
    base_config,
    deep_merge,
    serve_gateway,
)

pytestmark = pytest.mark.server


def redis_config(fake: Fake, redis: RedisServer, **resume_overrides: Any) -> dict[str, Any]:
    return deep_merge(
        base_config(fake.url),
        {
            "state": {"backend": "redis", "redis_url": redis.url},
            **resume(store="redis", **resume_overrides),
        },
    )


@contextlib.asynccontextmanager
async def two_instances(
    config: dict[str, Any], tmp_path: Path
) -> AsyncIterator[tuple[Served, Served]]:
    """Two `gateway serve` processes on `config`, each in its own directory."""
    async with contextlib.AsyncExitStack() as stack:
        pair = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            pair.append(await stack.enter_async_context(serve_gateway(config, directory)))
        yield pair[0], pair[1]


@pytest.mark.timeout(90)
async def test_a_stream_started_on_one_instance_is_reattached_live_on_another(
    fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = redis_config(fake, redis_server)
    async with two_instances(config, tmp_path) as (a, b), aiohttp.ClientSession() as session:
        resp = await open_stream(session, a.url, chunks=60, gap_ms=50)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 10)
        # The drop happens on A; B serves the reattach, following A's appends through Redis.
        resp.close()
        rest = await reattach(session, b.url, stream_id, offset=len(received), timeout_s=30)
        record = fake.provider.records[0]
        await wait_done(record)
        assert rest.status == 200, rest
        assert rest.headers["content-type"].startswith("text/event-stream")
        # Served while the upstream was still sending: B tailed a live stream.
        assert record.ended_at is not None and record.ended_at > rest.started + 1.0
        assert received + rest.body == bytes(record.sent)
        assert rest.body.rstrip().endswith(b"data: [DONE]")
        assert len(fake.provider.records) == 1
        assert record.completed and not record.disconnected

        line = line_of(await access_lines(a, 1), stream_id)
        assert line["outcome"] == "client_cancel" and line["drained"] is True, line
        assert line["output_tokens"] == 60

        # Ended: both instances serve it whole, and only to its caller.
        for inst in (a, b):
            whole = await reattach(session, inst.url, stream_id, offset=0)
            assert whole.status == 200 and whole.body == bytes(record.sent), inst.url
            at_end = await reattach(session, inst.url, stream_id, offset=len(record.sent))
            assert at_end.status == 200 and at_end.body == b""
            past = await reattach(session, inst.url, stream_id, offset=len(record.sent) + 1)
            assert_openai_error(past, 416)
            other = await reattach(
                session, inst.url, stream_id, offset=0, headers=oa_auth(OTHER_CALLER_KEY)
            )
            assert_openai_error(other, 404)


@pytest.mark.timeout(90)
async def test_an_anthropic_stream_and_two_readers_across_instances(
    fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = redis_config(fake, redis_server)
    async with two_instances(config, tmp_path) as (a, b), aiohttp.ClientSession() as session:
        resp = await open_stream(session, b.url, chunks=40, gap_ms=40, anthropic=True)
        stream_id = resp.headers["x-gateway-stream-id"]
        received = await read_events(resp, 6)
        resp.close()
        # Two readers at once, one on each instance (B wrote it), both live.
        on_a, on_b = await asyncio.gather(
            reattach(session, a.url, stream_id, offset=len(received), headers=an_auth()),
            reattach(session, b.url, stream_id, last_event_id=len(received), headers=an_auth()),
        )
        record = fake.provider.records[0]
        await wait_done(record)
        assert record.ended_at is not None and record.ended_at > on_a.started
        for reply in (on_a, on_b):
            assert reply.status == 200, reply
            assert received + reply.body == bytes(record.sent)
        assert b"event: message_stop" in on_a.body
        assert record.completed and len(fake.provider.records) == 1
        wrong = await reattach(
            session, a.url, stream_id, offset=0, headers=an_auth(OTHER_CALLER_KEY)
        )
        assert_anthropic_error(wrong, 404)


@pytest.mark.timeout(60)
async def test_redis_kept_streams_expire_and_oversize_ones_answer_410(
    fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = redis_config(fake, redis_server, ttl_s=1, max_stream_bytes=2048)
    async with two_instances(config, tmp_path) as (a, b), aiohttp.ClientSession() as session:
        short = await open_stream(session, a.url, chunks=1, body=chat_body(usage=False))
        short_id = short.headers["x-gateway-stream-id"]
        short_body = await read_rest(short)
        short.release()
        assert len(short_body) <= 2048, "the short stream must fit the bound"
        long = await open_stream(session, a.url, chunks=60)
        long_id = long.headers["x-gateway-stream-id"]
        long_body = await read_rest(long)
        long.release()
        await access_lines(a, 2)
        ended = asyncio.get_running_loop().time()
        assert long_body == bytes(fake.provider.records[1].sent)  # the client that stayed

        fresh = await reattach(session, b.url, short_id, offset=0)
        assert fresh.status == 200 and fresh.body == short_body, fresh
        assert_openai_error(await reattach(session, b.url, long_id, offset=0), 410)

        await asyncio.sleep(max(0.0, ended + 1.5 - asyncio.get_running_loop().time()))
        for inst in (a, b):
            assert_openai_error(await reattach(session, inst.url, short_id, offset=0), 404)


@pytest.mark.timeout(90)
async def test_a_reattach_at_once_on_another_instance_is_never_refused(
    fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The client counts the bytes it received; the writer's appends reach Redis a moment
    later. A reattach on the other instance right away (the old connection not even closed
    yet, as after a network change) must still get the rest, not a 416: a live stream has
    no end to be past yet."""
    config = redis_config(fake, redis_server)
    answers: list[int] = []
    async with two_instances(config, tmp_path) as (a, b), aiohttp.ClientSession() as session:
        for i in range(20):
            resp = await open_stream(session, a.url, chunks=200, gap_ms=2)
            stream_id = resp.headers["x-gateway-stream-id"]
            received = await read_events(resp, 30)
            rest = await reattach(session, b.url, stream_id, offset=len(received))
            resp.close()
            answers.append(rest.status)
            record = fake.provider.records[i]
            await wait_done(record)
            if rest.status == 200:
                assert received + rest.body == bytes(record.sent)
    assert answers == [200] * 20, answers
