"""Shared fixtures: the fake provider and the gateway, each on a real loopback socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.fake import FakeProvider, start_fake_provider
from tests.support import (
    ACCEPTED_KEYS,
    RECORDINGS,
    Fake,
    Gateway,
    GatewayFactory,
    RedisServer,
    base_config,
    deep_merge,
    require_binary,
    start_gateway,
)


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    provider = FakeProvider(keys=set(ACCEPTED_KEYS), recordings_dir=RECORDINGS)
    runner, url = await start_fake_provider(provider)
    yield Fake(provider, url)
    await runner.cleanup()


@pytest.fixture
async def gateway_factory(fake: Fake) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def factory(extra: dict[str, Any] | None = None, tracer_provider: Any = None) -> Gateway:
        config = deep_merge(base_config(fake.url), extra or {})
        runner, gw = await start_gateway(config, tracer_provider=tracer_provider)
        runners.append(runner)
        return gw

    yield factory
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server for this test (skips without the binary, unless CI requires it)."""
    server = RedisServer(require_binary("redis-server"), tmp_path)
    server.start()
    yield server
    server.stop()
