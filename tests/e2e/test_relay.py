"""The relay, seen from a raw HTTP client: byte-exact, unbuffered, prompt on disconnect, and
every failure told to the client in its own API format."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.appkeys import OUTCOME_SINKS
from gateway.report import Report
from tests.support import (
    CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    Gateway,
    GatewayFactory,
    base_config,
    deep_merge,
    serve_gateway,
)

CHAT = "/v1/chat/completions"


def chat_body(**extra: object) -> bytes:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body.update(extra)
    return orjson.dumps(body)


def auth(**headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json", **headers}


def capture(gw: Gateway) -> list[Report]:
    outcomes: list[Report] = []
    gw.app[OUTCOME_SINKS].append(lambda o, _now: outcomes.append(o))
    return outcomes


async def test_bytes_equal_over_many_streams_and_random_boundaries(
    gateway: Gateway, fake: Fake
) -> None:
    rng = random.Random(1234)
    async with aiohttp.ClientSession() as session:
        for i in range(40):
            headers = auth(
                **{
                    "x-fake-chunks": str(rng.randint(1, 60)),
                    "x-fake-split-seed": str(rng.randint(0, 10**6)),
                    "x-fake-line-ending": rng.choice(["lf", "crlf", "cr"]),
                }
            )
            path, body = rng.choice(
                [
                    (CHAT, chat_body(stream_options={"include_usage": rng.random() < 0.5})),
                    (
                        "/v1/responses",
                        orjson.dumps({"model": "gpt-test", "input": "x", "stream": True}),
                    ),
                    (
                        "/v1/messages",
                        orjson.dumps(
                            {
                                "model": "claude-test",
                                "max_tokens": 50,
                                "messages": [{"role": "user", "content": "hi"}],
                                "stream": True,
                            }
                        ),
                    ),
                ]
            )
            async with session.post(gateway.url + path, data=body, headers=headers) as resp:
                assert resp.status == 200
                received = bytearray()
                async for piece in resp.content.iter_any():
                    received += piece
            record = fake.provider.records[i]
            assert record.completed
            assert bytes(received) == bytes(record.sent), f"stream {i} differs"


async def test_events_are_not_batched(gateway: Gateway) -> None:
    """With 20 ms between upstream events, each event reaches the client on its own."""
    arrivals: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT,
            data=chat_body(),
            headers=auth(**{"x-fake-chunks": "15", "x-fake-gap-ms": "20"}),
        ) as resp,
    ):
        async for piece in resp.content.iter_any():
            arrivals.append((time.perf_counter(), piece))
    pieces = [p for _, p in arrivals]
    # Every read holds exactly one whole event: nothing was held back and sent together.
    assert all(p.count(b"\n\n") == 1 and p.endswith(b"\n\n") for p in pieces), pieces[:5]
    events = len(pieces)
    assert events == 1 + 15 + 1 + 1  # role, content, finish, [DONE]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    # Generous margins: the order and separation are the claim, not the exact figure.
    assert sum(g >= 0.010 for g in gaps) >= len(gaps) - 2, gaps
    assert max(gaps) < 0.5


async def test_stream_headers(gateway: Gateway, fake: Fake) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + CHAT, data=chat_body(), headers=auth()) as resp:
            await resp.read()
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache"
            assert resp.headers["x-accel-buffering"] == "no"
            assert resp.headers["x-request-id"].startswith("req_")
            assert "content-length" not in resp.headers
    anthropic_body = orjson.dumps(
        {
            "model": "claude-test",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/messages",
            data=anthropic_body,
            headers={"x-api-key": CALLER_KEY, "anthropic-version": "2023-06-01"},
        ) as resp,
    ):
        await resp.read()
        assert resp.headers["request-id"]


async def test_client_disconnect_closes_upstream_promptly(gateway: Gateway, fake: Fake) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.url + CHAT,
            data=chat_body(),
            headers=auth(**{"x-fake-stall-after": "3"}),
        )
        seen = 0
        async for piece in resp.content.iter_any():
            seen += piece.count(b"\n\n")
            if seen >= 4:  # role chunk + 3 content chunks, then the upstream stalls
                break
        closed_at = asyncio.get_running_loop().time()
        resp.close()
    record = fake.provider.records[0]
    for _ in range(100):
        if record.disconnected:
            break
        await asyncio.sleep(0.01)
    assert record.disconnected
    assert record.disconnected_at is not None
    assert record.disconnected_at - closed_at < 0.5


async def test_chunk_timeout_kills_stream_with_error_event(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory({"policy": {"timeouts": {"chunk_s": 0.3}}})
    outcomes = capture(gw)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + CHAT, data=chat_body(), headers=auth(**{"x-fake-stall-after": "2"})
        ) as resp,
    ):
        assert resp.status == 200
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 1 + 2 + 1
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in body
    await asyncio.sleep(0.2)
    assert fake.provider.records[0].disconnected
    assert outcomes[0].outcome == "chunk_timeout"


async def test_truncated_stream_ends_with_error_event(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT, data=chat_body(), headers=auth(**{"x-fake-truncate-after": "3"})
        ) as resp,
    ):
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 1 + 3 + 1
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_error"


async def test_in_band_upstream_error_is_passed_not_doubled(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/messages",
            data=orjson.dumps(
                {
                    "model": "claude-test",
                    "max_tokens": 50,
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                }
            ),
            headers={"x-api-key": CALLER_KEY, "x-fake-error-after": "2"},
        ) as resp,
    ):
        body = await resp.read()
    assert body.count(b"event: error") == 1
    assert b"overloaded_error" in body


async def test_first_byte_timeout_is_a_504_in_caller_format(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"policy": {"timeouts": {"first_byte_s": 0.3}}})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + CHAT, data=chat_body(), headers=auth(**{"x-fake-first-delay-ms": "2000"})
        ) as resp,
    ):
        assert resp.status == 504
        body = await resp.json()
    assert body["error"]["code"] == "upstream_timeout"


async def test_connect_refused_is_a_502(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"providers": {"oa": {"base_url": "http://127.0.0.1:9/v1"}}}  # discard port: refused
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + CHAT, data=chat_body(), headers=auth()) as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
async def test_upstream_4xx_passes_through_unchanged(
    gateway: Gateway, fake: Fake, status: int
) -> None:
    """Caller errors are not retried: status, body and retry-after reach the caller as sent.
    (Retryable statuses such as 429 are the fault matrix's, tests/e2e/test_faults.py.)"""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT,
            data=chat_body(),
            headers=auth(**{"x-fake-status": str(status), "x-fake-retry-after": "7"}),
        ) as resp,
    ):
        body = await resp.read()
        assert resp.status == status
        assert resp.headers["retry-after"] == "7"
        assert resp.headers["x-gateway-attempts"] == "1"
    assert len(fake.provider.records) == 1
    assert body == bytes(fake.provider.records[0].sent)


async def test_upstream_key_rejection_never_reaches_the_caller(
    gateway: Gateway, fake: Fake
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT,
            data=chat_body(),
            headers=auth(
                **{
                    "x-fake-status": "401",
                    "x-fake-error-message": f"Incorrect API key provided: {UPSTREAM_KEYS[0]}"
                    f" {UPSTREAM_KEYS[1]}",
                }
            ),
        ) as resp,
    ):
        body = await resp.read()
        assert resp.status == 503  # both keys rejected: both disabled
    for key in UPSTREAM_KEYS:
        assert key.encode() not in body
    assert orjson.loads(body)["error"]["code"] == "upstream_unavailable"


async def test_upstream_error_bodies_are_scrubbed_of_keys(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + CHAT,
            data=chat_body(),
            headers=auth(
                **{
                    "x-fake-status": "400",
                    "x-fake-error-message": f"bad request for {UPSTREAM_KEYS[0]}{UPSTREAM_KEYS[1]}",
                }
            ),
        ) as resp,
    ):
        body = await resp.read()
    assert resp.status == 400
    assert b"sk-test-upstream" not in body
    assert b"[redacted]" in body


async def test_a_slow_client_slows_the_upstream_read_and_loses_nothing(
    fake: Fake, tmp_path: Path
) -> None:
    """Backpressure end to end: while the client reads nothing, the gateway (a real `gateway
    serve`) stops reading the upstream instead of buffering the stream in its memory (what is
    in flight waits in the sockets' kernel buffers, which RSS does not count); once the client
    reads again, every byte arrives, in order."""
    config = deep_merge(
        base_config(fake.url),
        {"policy": {"timeouts": {"chunk_s": 30, "total_s": 120}, "max_tokens_cap": None}},
    )
    chunks = 250_000  # ~38 MB of events: more than the gateway could hide in a read buffer
    async with (
        serve_gateway(config, tmp_path) as gw,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session,
    ):
        before = gw.rss_bytes()
        resp = await session.post(
            gw.url + "/v1/chat/completions",
            data=chat_body(stream=True, max_tokens=10**6),
            headers=auth(**{"x-fake-chunks": str(chunks)}),
        )
        assert resp.status == 200
        record = (await fake.provider.wait_for_records(1))[0]
        # The client reads nothing for a while; the fake writes as long as sockets take it.
        await asyncio.sleep(3)
        paused_sent = len(record.sent)
        paused_growth = gw.rss_bytes() - before
        size = 0
        async for piece in resp.content.iter_any():
            size += len(piece)
    assert record.completed
    total = len(record.sent)
    print(
        f"while paused: fake sent {paused_sent / 1e6:.1f} of {total / 1e6:.1f} MB, "
        f"gateway RSS +{paused_growth / 2**20:.1f} MiB"
    )
    assert paused_growth < 16 * 2**20  # not the stream (the relay holds at most 64 KiB)
    assert size == total  # every byte, once the client reads again
