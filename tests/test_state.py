"""Key health shared through Redis: what one instance learns about a key, the others skip."""

from __future__ import annotations

import time

import fakeredis
import pytest

from gateway.keypool import KeyPool, UpstreamKey, fingerprint
from gateway.limits.redis import redis_client
from gateway.retry import KeyAction, Verdict
from gateway.state import Block, MemoryHealthStore, RedisHealthStore
from tests.support import RedisServer

REVOKED = Verdict(True, "upstream_401", KeyAction.DISABLE)


def pool(store: object, *secrets: str) -> KeyPool:
    keys = tuple(UpstreamKey(f"k{i}", s, 1, fingerprint(s)) for i, s in enumerate(secrets))
    return KeyPool("openai", keys, health=store)  # type: ignore[arg-type]


def test_memory_store_roundtrip() -> None:
    store = MemoryHealthStore()
    store.put("a", Block("cooldown", 5.0, "r"))
    assert store.get("a") == Block("cooldown", 5.0, "r")
    store.clear("a")
    assert store.get("a") is None


@pytest.mark.parametrize("backend", ["fakeredis", "redis-server"])
async def test_a_key_disabled_on_one_instance_is_skipped_by_another(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "fakeredis":
        server = fakeredis.FakeServer()
        clients = [fakeredis.aioredis.FakeRedis(server=server) for _ in range(2)]
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        clients = [redis_client(redis_server.url, 0.5) for _ in range(2)]
    a, b = (RedisHealthStore(c, key="t:{health}", refresh_s=0.05) for c in clients)
    await a.start()
    await b.start()
    try:
        pool_a = pool(a, "sk-one", "sk-two")
        pool_b = pool(b, "sk-two", "sk-one")  # another instance: other ids and order
        now = time.time()
        pool_a.failed(pool_a.keys[0], REVOKED, now)  # sk-one revoked, seen by instance A
        for _ in range(100):
            if b.get(fingerprint("sk-one")) is not None:
                break
            await _sleep(0.02)
        states = {k.secret: s for k, s, _ in pool_b.key_states(time.time())}
        assert states == {"sk-two": "ok", "sk-one": "disabled"}
        lease = pool_b.acquire(time.time())
        assert lease is not None and lease.key.secret == "sk-two"
    finally:
        await a.close()
        await b.close()
        for c in clients:
            await c.aclose()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
