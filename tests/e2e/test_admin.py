"""The admin listener through a real `gateway serve` process: who may see what, and that each
endpoint reports the state real events left (a key disabled by an upstream 401, a stream open
at the fake, a cancel, limits being spent, a drain, Redis going away and coming back)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.bench.servers import RedisServer
from tests.support import (
    ADMIN_TOKEN,
    CALLER_KEY,
    Fake,
    Served,
    base_config,
    deep_merge,
    one_bad_key,
    sensitive_strings,
    serve_gateway,
)

OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
AN = {"x-api-key": CALLER_KEY, "anthropic-version": "2023-06-01"}
MESSAGES = [{"role": "user", "content": "hi"}]
TOKEN_ONLY = (
    ("GET", "/admin/keys"),
    ("GET", "/admin/streams"),
    ("POST", "/admin/streams/gs_x/cancel"),
    ("GET", "/admin/limits/test-app"),
    ("GET", "/status"),
    ("GET", "/status/data"),
    ("GET", "/admin/nothing-here"),
)


@pytest.fixture
def serve(fake: Fake, tmp_path: Path) -> Any:
    def start(extra: dict[str, Any] | None = None) -> Any:
        return serve_gateway(deep_merge(base_config(fake.url), extra or {}), tmp_path)

    return start


async def admin_get(gw: Served, path: str, *, token: bool = True) -> tuple[int, Any]:
    headers = gw.admin_headers if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.admin_url + path, headers=headers) as resp,
    ):
        body = await resp.read()
        assert resp.headers["content-type"].startswith("application/json"), body[:200]
        return resp.status, orjson.loads(body)


async def admin_post(gw: Served, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.admin_url + path, headers=gw.admin_headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


def no_secrets(*bodies: object) -> None:
    text = "\n".join(b if isinstance(b, str) else orjson.dumps(b).decode() for b in bodies)
    for secret in sensitive_strings():
        assert secret not in text


class OpenStream:
    """A streamed chat completion held open at the fake (slow chunks), read as it comes."""

    def __init__(self, session: aiohttp.ClientSession, resp: aiohttp.ClientResponse) -> None:
        self.session = session
        self.resp = resp
        self.id = resp.headers["x-gateway-stream-id"]
        self.received = b""

    async def read_until(self, marker: bytes, timeout_s: float = 10) -> bytes:
        async with asyncio.timeout(timeout_s):
            while marker not in self.received:
                chunk = await self.resp.content.readany()
                if not chunk:
                    break
                self.received += chunk
        return self.received

    async def read_to_end(self, timeout_s: float = 10) -> bytes:
        async with asyncio.timeout(timeout_s):
            self.received += await self.resp.content.read()
        return self.received


@contextlib.asynccontextmanager
async def open_stream(
    gw: Served, *, chunks: int = 200, gap_ms: int = 50, anthropic: bool = False
) -> AsyncIterator[OpenStream]:
    fake = {"x-fake-chunks": str(chunks), "x-fake-gap-ms": str(gap_ms)}
    if anthropic:
        url = gw.url + "/v1/messages"
        body: dict[str, Any] = {
            "model": "claude-test",
            "max_tokens": 900,
            "messages": MESSAGES,
            "stream": True,
        }
        headers = {**AN, **fake}
    else:
        url = gw.url + "/v1/chat/completions"
        body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
        headers = {**OA, **fake}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=orjson.dumps(body), headers=headers) as resp,
    ):
        assert resp.status == 200
        yield OpenStream(session, resp)


async def test_the_token_guards_everything_but_metrics_health_and_readiness(serve: Any) -> None:
    async with serve() as gw, aiohttp.ClientSession() as session:
        for method, path in TOKEN_ONLY:
            for headers in ({}, {"Authorization": "Bearer not-the-admin-token-at-all"}):
                async with session.request(method, gw.admin_url + path, headers=headers) as resp:
                    assert resp.status == 401, (method, path)
                    body = await resp.json()
                    assert body["error"]["code"] == "unauthorized"
        for path in ("/metrics", "/healthz", "/readyz"):
            async with session.get(gw.admin_url + path) as resp:
                assert resp.status == 200, path
        # With the token, an unknown admin path is a JSON 404.
        status, body = await admin_get(gw, "/admin/nothing-here")
        assert status == 404 and body["error"]["code"] == "not_found"
        # The public port has neither the admin endpoints nor /metrics.
        for path in ("/metrics", "/admin/keys", "/status", "/readyz"):
            async with session.get(gw.url + path, headers=gw.admin_headers) as resp:
                assert resp.status == 404, path
        # The admin token is no caller key.
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps({"model": "gpt-test", "messages": MESSAGES}),
            headers={"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"},
        ) as resp:
            assert resp.status == 401


async def test_the_status_cookie_opens_the_page_but_never_cancels(serve: Any) -> None:
    # unsafe: aiohttp's jar keeps no cookies of IP-address hosts otherwise (browsers do).
    jar = aiohttp.CookieJar(unsafe=True)
    async with serve() as gw, aiohttp.ClientSession(cookie_jar=jar) as session:
        url = gw.admin_url + "/status"
        async with session.get(url, params={"token": "wrong-token-wrong-token"}) as resp:
            assert resp.status == 401
        async with session.get(url, params={"token": ADMIN_TOKEN}, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["location"] == "/status"  # the token leaves the address bar
            cookie = resp.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert ADMIN_TOKEN not in cookie
        async with session.get(url) as resp:  # the cookie jar has it now
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/html")
            page = await resp.text()
            assert 'id="live-streams"' in page
        async with session.get(gw.admin_url + "/status/data") as resp:
            assert resp.status == 200
            data = await resp.json()
            assert data["live_streams"] == 0
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/streams/gs_x/cancel")):
            async with session.request(method, gw.admin_url + path) as resp:
                assert resp.status == 401, path
        no_secrets(page, data)


async def test_keys_show_a_key_disabled_by_an_upstream_401(serve: Any, fake: Fake) -> None:
    async with serve(one_bad_key(fake.url)) as gw, aiohttp.ClientSession() as session:
        status, before = await admin_get(gw, "/admin/keys")
        assert status == 200
        keys = {k["id"]: k for k in before["providers"]["revoked-one"]["keys"]}
        assert keys["bad"]["state"] == "ok" and keys["bad"]["until"] is None
        # The first attempt lands on `bad` or `good`; until `bad` is tried, ask again.
        for _ in range(6):
            async with session.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "one-bad-key", "messages": MESSAGES}),
                headers=OA,
            ) as resp:
                assert resp.status == 200
            _, after = await admin_get(gw, "/admin/keys")
            keys = {k["id"]: k for k in after["providers"]["revoked-one"]["keys"]}
            if keys["bad"]["state"] != "ok":
                break
        bad = keys["bad"]
        assert bad["state"] == "disabled"
        assert bad["reason"] == "upstream_401"
        assert bad["until"] > time.time() + 200  # disable_s is 300 by default
        assert bad["fingerprint"].startswith("fp_")
        assert keys["good"]["state"] == "ok" and keys["good"]["in_flight"] == 0
        for provider in after["providers"].values():
            for key in provider["keys"]:
                assert set(key) >= {"id", "fingerprint", "state", "until", "reason", "in_flight"}
        # /metrics says the same; /status/data too.
        async with session.get(gw.admin_url + "/metrics") as resp:
            text = await resp.text()
        assert (
            'llm_gateway_upstream_key_state{gen_ai_provider_name="revoked-one",key_id="bad",'
            'state="disabled"} 1.0' in text
        )
        _, data = await admin_get(gw, "/status/data")
        row = next(k for k in data["keys"] if k["id"] == "bad")
        assert row["state"] == "disabled" and row["provider"] == "revoked-one"
        no_secrets(before, after, text, data)


async def test_streams_show_an_open_stream_and_a_cancel_ends_it_in_band(serve: Any) -> None:
    async with serve() as gw:
        async with open_stream(gw) as stream:
            await stream.read_until(b'"content"')
            await asyncio.sleep(0.2)  # a few content chunks (the first may be the role's)
            status, listed = await admin_get(gw, "/admin/streams")
            assert status == 200 and listed["count"] == 1
            (view,) = listed["streams"]
            assert view["id"] == stream.id
            assert stream.id.startswith("gs_") and len(stream.id) >= 24
            assert view["caller"] == "test-app"
            assert view["model"] == "gpt-test"
            assert view["deployment"] == "oa/fake-gpt"
            assert view["key_id"] in {"oa-1", "oa-2"}
            assert view["ttft_ms"] is not None and view["ttft_ms"] > 0
            assert view["events"] >= 1 and view["bytes"] > 0
            assert abs(view["started_at"] - time.time()) < 10
            await asyncio.sleep(0.3)
            _, later = await admin_get(gw, "/admin/streams")
            assert later["streams"][0]["events"] > view["events"]
            assert later["streams"][0]["bytes"] > view["bytes"]

            status, cancelled = await admin_post(gw, f"/admin/streams/{stream.id}/cancel")
            assert status == 200
            assert cancelled == {"id": stream.id, "cancelled": True, "ended": True}
            body = await stream.read_to_end()
        # The client got every event whole, then the gateway's terminal event, then the end.
        events = [e for e in body.split(b"\n\n") if e.strip()]
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "cancelled_by_operator"
        assert last["error"]["type"] == "server_error"
        assert b"[DONE]" not in body
        for event in events[:-1]:
            assert orjson.loads(event.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
        _, after = await admin_get(gw, "/admin/streams")
        assert after == {"count": 0, "streams": []}
        (line,) = await gw.access_lines(1)
        assert line["outcome"] == "operator_cancel"
        assert line["status"] == 200
        # Unknown and already-ended ids: 404.
        for stream_id in (stream.id, "gs_unknown"):
            status, body404 = await admin_post(gw, f"/admin/streams/{stream_id}/cancel")
            assert status == 404 and body404["error"]["code"] == "not_found"


async def test_a_cancelled_anthropic_stream_ends_with_an_anthropic_error_event(
    serve: Any,
) -> None:
    async with serve() as gw:
        async with open_stream(gw, anthropic=True) as stream:
            await stream.read_until(b"content_block_delta")
            status, _ = await admin_post(gw, f"/admin/streams/{stream.id}/cancel")
            assert status == 200
            body = await stream.read_to_end()
        last = body.rstrip(b"\n").split(b"\n\n")[-1]
        name, data = last.split(b"\n", 1)
        assert name == b"event: error"
        error = orjson.loads(data.removeprefix(b"data: "))
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "cancelled_by_operator" in error["error"]["message"]
        assert b"message_stop" not in body


async def test_limits_report_what_the_caller_has_spent(serve: Any) -> None:
    tiers = {
        "tiers": {
            "small": {
                "requests_per_minute": 10,
                "tokens_per_minute": 100000,
                "concurrent_streams": 3,
            }
        },
        "auth": {"default_tier": "small"},
    }
    async with serve(tiers) as gw, aiohttp.ClientSession() as session:
        status, fresh = await admin_get(gw, "/admin/limits/test-app")
        assert status == 200
        assert fresh["tier"] == "small" and fresh["source"] == "api_key"
        limits = fresh["limits"]
        assert limits["requests_per_minute"]["remaining"] == 10
        assert limits["concurrent_streams"] == {"limit": 3, "remaining": 3, "open": 0}
        for _ in range(4):
            async with session.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "gpt-test", "messages": MESSAGES}),
                headers=OA,
            ) as resp:
                assert resp.status == 200
        async with open_stream(gw) as stream:
            await stream.read_until(b'"content"')
            _, spent = await admin_get(gw, "/admin/limits/test-app")
        rpm = spent["limits"]["requests_per_minute"]
        assert rpm["remaining"] == 5 and rpm["used"] == 5  # 4 requests and the stream
        assert spent["limits"]["concurrent_streams"]["open"] == 1
        assert spent["open_streams_this_instance"] == 1
        assert spent["limits"]["tokens_per_minute"]["used"] > 0
        status, missing = await admin_get(gw, "/admin/limits/nobody")
        assert status == 404 and missing["error"]["code"] == "not_found"


async def test_limits_read_from_redis(serve: Any, redis_server: RedisServer) -> None:
    extra = {
        "tiers": {"small": {"requests_per_minute": 10, "concurrent_requests": 4}},
        "auth": {"default_tier": "small"},
        "state": {"backend": "redis", "redis_url": redis_server.url},
    }
    async with serve(extra) as gw, aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps({"model": "gpt-test", "messages": MESSAGES}),
                headers=OA,
            ) as resp:
                assert resp.status == 200
        status, body = await admin_get(gw, "/admin/limits/test-app")
        assert status == 200 and body["backend"] == "redis" and body["degraded"] is False
        assert body["limits"]["requests_per_minute"]["remaining"] == 7
        assert body["limits"]["concurrent_requests"]["open"] == 0


async def test_readyz_turns_503_within_100_ms_of_sigterm_while_a_stream_drains(
    serve: Any,
) -> None:
    async with serve({"server": {"drain_timeout_s": 10}}) as gw:
        status, ready = await admin_get(gw, "/readyz", token=False)
        assert status == 200 and ready["ready"] is True
        assert set(ready["checks"]) == {"config", "draining", "limiter", "providers"}
        async with open_stream(gw, chunks=40, gap_ms=50) as stream:
            await stream.read_until(b'"content"')
            sent = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            async with aiohttp.ClientSession() as session:
                while True:
                    async with session.get(gw.admin_url + "/readyz") as resp:
                        if resp.status == 503:
                            flipped = time.monotonic() - sent
                            body = await resp.json()
                            break
                    assert time.monotonic() - sent < 1
            assert flipped < 0.1, flipped
            assert body["ready"] is False and body["checks"]["draining"]["ok"] is False
            # The stream drains to its end, whole.
            received = await stream.read_to_end(timeout_s=15)
            assert received.rstrip().endswith(b"data: [DONE]")
        await asyncio.to_thread(gw.proc.wait, 10)
        assert gw.proc.returncode == 0


async def test_readyz_follows_redis_down_and_back(serve: Any, redis_server: RedisServer) -> None:
    extra = {
        "state": {"backend": "redis", "redis_url": redis_server.url},
        "tiers": {"small": {"requests_per_minute": 1000}},
        "auth": {"default_tier": "small"},
    }
    async with serve(extra) as gw:
        status, body = await admin_get(gw, "/readyz", token=False)
        assert status == 200 and body["checks"]["limiter"]["ok"] is True
        redis_server.stop()
        status, body = await admin_get(gw, "/readyz", token=False)
        assert status == 503
        assert body["checks"]["limiter"]["ok"] is False
        assert body["checks"]["draining"]["ok"] is True
        _, data = await admin_get(gw, "/status/data")
        assert data["limiter"]["healthy"] is False and data["ready"] is False
        await asyncio.to_thread(redis_server.start)
        deadline = time.monotonic() + 10
        while True:
            status, body = await admin_get(gw, "/readyz", token=False)
            if status == 200:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        assert body["checks"]["limiter"]["ok"] is True


async def test_readyz_names_a_provider_without_a_usable_key(serve: Any, fake: Fake) -> None:
    extra = one_bad_key(fake.url)
    extra["providers"]["revoked-one"]["keys"] = extra["providers"]["revoked-one"]["keys"][:1]
    async with serve(extra) as gw, aiohttp.ClientSession() as session:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps({"model": "one-bad-key", "messages": MESSAGES}),
            headers=OA,
        ) as resp:
            assert resp.status >= 500
        status, body = await admin_get(gw, "/readyz", token=False)
        assert status == 503
        assert body["checks"]["providers"]["ok"] is False
        assert "revoked-one" in body["checks"]["providers"]["detail"]
