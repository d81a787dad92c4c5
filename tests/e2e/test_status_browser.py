"""The status page in headless Chromium against a real `gateway serve`: opened once with the
admin token (which becomes a cookie), it follows live streams as they open and close by
polling, and names every configured key."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.browser import Browser
from tests.support import (
    ADMIN_TOKEN,
    CALLER_KEY,
    Fake,
    base_config,
    require_binary,
    serve_gateway,
)

STREAMS = 5
OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
# 400 chunks 50 ms apart: open for ~20 s unless closed first (the test closes them).
SLOW = {"x-fake-chunks": "400", "x-fake-gap-ms": "50"}
LIVE = "document.getElementById('live-streams').textContent"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with Browser(require_binary("chromium")) as b:
        yield b
    assert not b.js_errors, b.js_errors


async def open_streams(
    session: aiohttp.ClientSession, url: str, stack: contextlib.AsyncExitStack, n: int
) -> list[aiohttp.ClientResponse]:
    """`n` streamed chat completions, each past its first event, held open by `stack`."""
    body = orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )

    async def one() -> aiohttp.ClientResponse:
        resp = await stack.enter_async_context(
            session.post(url + "/v1/chat/completions", data=body, headers={**OA, **SLOW})
        )
        assert resp.status == 200, await resp.text()
        async with asyncio.timeout(10):
            assert await resp.content.readuntil(b"\n\n")
        return resp

    return [await one() for _ in range(n)]


@pytest.mark.server
async def test_status_page_follows_live_streams(
    fake: Fake, tmp_path: Path, browser: Browser
) -> None:
    config = base_config(fake.url)
    key_ids = {k["id"] for p in config["providers"].values() for k in p["keys"]}
    async with serve_gateway(config, tmp_path) as gw:
        # The cookie flow: the token in the address once, then a cookie, the token gone.
        await browser.navigate(f"{gw.admin_url}/status?token={ADMIN_TOKEN}")
        assert await browser.evaluate("location.pathname + location.search") == "/status"
        assert "gateway_admin" not in await browser.evaluate("document.cookie")  # HttpOnly
        # Its own polls of /status/data pass with the cookie alone.
        await browser.wait_for("Number(document.body.dataset.polls) >= 2")
        assert await browser.evaluate("document.getElementById('updated').dataset.stale") is None
        assert await browser.evaluate(LIVE) == "0"
        listed = await browser.evaluate(
            "[...document.querySelectorAll('#keys tr[data-key-id]')].map((r) => r.dataset.keyId)"
        )
        assert set(listed) == key_ids, listed
        for key_id in key_ids:
            selector = json.dumps(f'#keys tr[data-key-id="{key_id}"]')
            row = await browser.evaluate(f"document.querySelector({selector}).textContent")
            assert key_id in row

        async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
            responses = await open_streams(session, gw.url, stack, STREAMS)
            await browser.wait_for(f"{LIVE} === '{STREAMS}'", timeout_s=10)
            rows = await browser.evaluate(
                "[...document.querySelectorAll('#streams tr[data-stream-id]')]"
                ".map((r) => r.textContent)"
            )
            assert len(rows) == STREAMS
            assert all("test-app" in r and "gpt-test" in r for r in rows), rows
            await browser.screenshot(tmp_path / "status-live.png")
            for resp in responses:
                resp.close()
        await browser.wait_for(f"{LIVE} === '0'", timeout_s=10)
        png = (tmp_path / "status-live.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


async def test_status_needs_the_token(fake: Fake, tmp_path: Path) -> None:
    async with serve_gateway(base_config(fake.url), tmp_path) as gw, aiohttp.ClientSession() as s:
        for path in ("/status", "/status/data", "/status?token=not-the-token"):
            async with s.get(gw.admin_url + path, allow_redirects=False) as resp:
                assert resp.status == 401, path
                assert resp.headers["content-type"].startswith("application/json"), path
                body = await resp.json()
                assert "error" in body, body
                assert ADMIN_TOKEN not in await resp.text()
        async with s.get(gw.admin_url + "/status", headers=gw.admin_headers) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/html")
            page = await resp.text()
            assert 'id="live-streams"' in page
        async with s.get(gw.admin_url + "/status/data", headers=gw.admin_headers) as resp:
            assert resp.status == 200
            data = await resp.json()
            assert data["live_streams"] == 0
            assert {k["id"] for k in data["keys"]} == {"oa-1", "oa-2", "an-1"}
