"""Reloads are whole and never drop a stream: 100 streams in flight through a real `gateway
serve` across a good reload (SIGHUP), a rejected one and a file-watch reload. None is broken or
duplicated; requests after the good reload use the new routes; a key at its
`max_concurrent_per_key` cap before the reload is still at its cap after it; keys that only a
restart applies are named in the log and on /status."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from tests.support import (
    CALLER_KEY,
    FALLBACK_KEYS,
    Fake,
    Served,
    base_config,
    deep_merge,
    serve_gateway,
)

OA = {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json"}
MESSAGES = [{"role": "user", "content": "hi"}]
STREAMS = 100
CHUNKS = 80
GAP_MS = 60  # each stream lasts about 5 s: every reload below happens while all are open


def capped(fake_url: str) -> dict[str, Any]:
    """Model `capped`: one key (its own secret, so no other provider's leases count on it),
    at most one request at a time."""
    return {
        "providers": {
            "solo": {
                "api": "openai",
                "base_url": f"{fake_url}/v1",
                "keys": [{"id": "solo-1", "secret": FALLBACK_KEYS[0]}],
                "max_concurrent_per_key": 1,
                "forward_headers": ["x-fake-*"],
            }
        },
        "models": {"capped": [{"provider": "solo", "model": "fake-gpt"}]},
    }


async def stream_body(session: aiohttp.ClientSession, url: str, model: str = "gpt-test") -> bytes:
    headers = {**OA, "x-fake-chunks": str(CHUNKS), "x-fake-gap-ms": str(GAP_MS)}
    body = orjson.dumps({"model": model, "messages": MESSAGES, "stream": True})
    async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def status_code(session: aiohttp.ClientSession, url: str, model: str) -> int:
    body = orjson.dumps({"model": model, "messages": MESSAGES})
    async with session.post(url + "/v1/chat/completions", data=body, headers=OA) as resp:
        await resp.read()
        return resp.status


async def status_data(session: aiohttp.ClientSession, gw: Served) -> dict[str, Any]:
    async with session.get(gw.admin_url + "/status/data", headers=gw.admin_headers) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def wait_reload(
    session: aiohttp.ClientSession, gw: Served, after: float, ok: bool, trigger: str | None = None
) -> dict[str, Any]:
    """/status/data once a reload that started after `after` (unix s) has ended as `ok`."""
    deadline = time.monotonic() + 15
    while True:
        data = await status_data(session, gw)
        last = data["config"]["last_reload"]
        if (
            last is not None
            and last["at"] >= after
            and last["ok"] is ok
            and (trigger is None or last["trigger"] == trigger)
        ):
            return data
        assert time.monotonic() < deadline, data["config"]
        await asyncio.sleep(0.05)


async def in_flight(session: aiohttp.ClientSession, gw: Served, provider: str) -> int:
    async with session.get(gw.admin_url + "/admin/keys", headers=gw.admin_headers) as resp:
        keys = (await resp.json())["providers"][provider]["keys"]
    return sum(int(k["in_flight"]) for k in keys)


def check_whole(body: bytes) -> None:
    """One stream, exactly as generated: every content chunk once, in order, then the end."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]", events[-3:]
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1  # one generation, never two spliced
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == CHUNKS
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_streams_survive_good_bad_and_watched_reloads(fake: Fake, tmp_path: Path) -> None:
    config = deep_merge(base_config(fake.url), capped(fake.url))
    # No connection limit: 101 open streams must not queue the admin requests behind them.
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        serve_gateway(config, tmp_path) as gw,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        written = yaml.safe_load(gw.config.read_text())  # with the ports serve_gateway chose

        def write(update: dict[str, Any]) -> None:
            gw.config.write_text(yaml.safe_dump(deep_merge(written, update)))

        assert await status_code(session, gw.url, "gpt-new") == 404
        # The capped key is held by one stream for the whole test.
        hold = asyncio.create_task(stream_body(session, gw.url, "capped"))
        streams = [asyncio.create_task(stream_body(session, gw.url)) for _ in range(STREAMS)]
        deadline = time.monotonic() + 10
        while await in_flight(session, gw, "solo") < 1 or len(
            (await status_data(session, gw))["streams"]
        ) < min(STREAMS, 50):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await status_code(session, gw.url, "capped") == 503  # at its cap

        # 1. A good reload (SIGHUP): a new model, the file watch turned on, and a key that
        # only a restart applies.
        started = time.time()
        write(
            {
                "models": {"gpt-new": [{"provider": "oa", "model": "fake-gpt"}]},
                "server": {"watch_config": True, "watch_interval_s": 0.2, "backlog": 512},
            }
        )
        gw.proc.send_signal(signal.SIGHUP)
        data = await wait_reload(session, gw, started, True, "sighup")
        assert data["config"]["restart_required"] == ["server.backlog"]
        assert data["live_streams"] == STREAMS + 1
        assert await status_code(session, gw.url, "gpt-new") == 200
        # The cap holds across the reload: the new pool counts the old pool's lease.
        assert await in_flight(session, gw, "solo") == 1
        assert await status_code(session, gw.url, "capped") == 503
        good_hash = data["config"]["hash"]

        # 2. A bad file, rejected whole (SIGHUP; the watch sees it too).
        started = time.time()
        gw.config.write_text("models: [this is: not valid\n")
        gw.proc.send_signal(signal.SIGHUP)
        data = await wait_reload(session, gw, started, False)
        assert data["config"]["last_reload"]["error"]
        assert data["config"]["hash"] == good_hash  # the good config still serves
        assert await status_code(session, gw.url, "gpt-new") == 200

        # 3. The file watch: a good file again, with one more model, and no signal.
        started = time.time()
        write(
            {
                "models": {
                    "gpt-new": [{"provider": "oa", "model": "fake-gpt"}],
                    "gpt-watch": [{"provider": "oa", "model": "fake-gpt"}],
                },
                "server": {"watch_config": True, "watch_interval_s": 0.2, "backlog": 512},
            }
        )
        data = await wait_reload(session, gw, started, True, "watch")
        assert data["config"]["hash"] != good_hash
        assert await status_code(session, gw.url, "gpt-watch") == 200
        assert data["live_streams"] == STREAMS + 1, "a reload ended a stream"
        assert await in_flight(session, gw, "solo") == 1

        bodies = await asyncio.gather(*streams)
        for body in bodies:
            check_whole(body)
        check_whole(await hold)
        # The lease went back to the counter the new pools read: the key is free again.
        assert await in_flight(session, gw, "solo") == 0
        assert await status_code(session, gw.url, "capped") == 200

    log = gw.log_text()
    lines = [orjson.loads(x) for x in log.splitlines() if x.startswith("{")]
    restart = [x for x in lines if x.get("event", "").startswith("config reload: changed keys")]
    assert restart and restart[0]["level"] == "warning"
    assert restart[0]["keys"] == ["server.backlog"]
    assert any(x.get("event") == "config reload rejected" for x in lines)
    outcomes = [x["outcome"] for x in lines if x.get("event") == "request" and x.get("stream")]
    assert outcomes.count("ok") == STREAMS + 1  # the 100 and the held one


async def test_a_reload_keeps_key_health(fake: Fake, tmp_path: Path) -> None:
    """A key disabled before a reload is still disabled after it (health carries over by
    fingerprint, whatever id the new file gives the key)."""
    from tests.support import one_bad_key

    config = deep_merge(base_config(fake.url), one_bad_key(fake.url))
    async with serve_gateway(config, tmp_path) as gw, aiohttp.ClientSession() as session:
        for _ in range(6):
            assert await status_code(session, gw.url, "one-bad-key") == 200
        written = yaml.safe_load(gw.config.read_text())
        renamed = copy.deepcopy(written)
        renamed["providers"]["revoked-one"]["keys"][0]["id"] = "bad-renamed"
        gw.config.write_text(yaml.safe_dump(renamed))
        started = time.time()
        gw.proc.send_signal(signal.SIGHUP)
        await wait_reload(session, gw, started, True)
        async with session.get(gw.admin_url + "/admin/keys", headers=gw.admin_headers) as resp:
            keys = {k["id"]: k for k in (await resp.json())["providers"]["revoked-one"]["keys"]}
        assert keys["bad-renamed"]["state"] == "disabled"
        assert keys["good"]["state"] == "ok"
