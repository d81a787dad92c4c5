"""Real nginx, with deploy/nginx/gateway.conf, in front of the gateway: chunks still arrive one
by one, and big bodies and errors pass through."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import CALLER_KEY, Gateway, nginx_in_front


@pytest.fixture
async def nginx(gateway: Gateway, tmp_path: Path) -> AsyncIterator[str]:
    async with nginx_in_front(gateway.url, tmp_path) as url:
        yield url


def _headers(**extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json", **extra}


async def test_chunks_arrive_one_by_one_through_nginx(nginx: str) -> None:
    body = orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    arrivals: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            nginx + "/v1/chat/completions",
            data=body,
            headers=_headers(**{"x-fake-chunks": "12", "x-fake-gap-ms": "40"}),
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for piece in resp.content.iter_any():
            arrivals.append((time.perf_counter(), piece))
    pieces = [p for _, p in arrivals]
    assert len(pieces) == 1 + 12 + 1 + 1, pieces[:3]
    assert all(p.count(b"\n\n") == 1 for p in pieces)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert sum(g >= 0.020 for g in gaps) >= len(gaps) - 2, gaps


async def test_large_body_and_errors_pass_through_nginx(nginx: str) -> None:
    big = "x" * (2 * 1024 * 1024)  # over the test gateway's 1 MiB limit, under nginx's 32 MiB
    async with aiohttp.ClientSession() as session:
        async with session.post(
            nginx + "/v1/chat/completions",
            data=io.BytesIO(
                orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": big}]})
            ),
            headers=_headers(),
        ) as resp:
            assert resp.status == 413
            error = (await resp.json())["error"]
        assert error["code"] == "request_too_large"
        async with session.post(
            nginx + "/v1/chat/completions",
            data=orjson.dumps(
                {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
            ),
            headers=_headers(),
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"
