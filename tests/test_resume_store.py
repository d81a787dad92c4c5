"""The memory replay store alone: exact bytes from any offset (live and ended), cuts, the
bound, TTLs that differ between streams."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.resume.store import MemoryStore, StreamCut


async def read_all(store: MemoryStore, stream_id: str, offset: int) -> bytes:
    return b"".join([chunk async for chunk in store.read(stream_id, offset)])


async def test_any_offset_gives_exactly_the_rest_live_and_ended() -> None:
    rng = random.Random(7)
    store = MemoryStore(memory_bytes=1 << 20)
    recorder = store.begin("gs_a", "c", "openai", ttl_s=60, max_bytes=1 << 20)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(200)]
    whole = b"".join(chunks)
    offsets = [rng.randrange(len(whole) + 1) for _ in range(20)]
    readers = [asyncio.ensure_future(read_all(store, "gs_a", o)) for o in offsets]
    for chunk in chunks:
        recorder.append(chunk)
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    recorder.end()
    for offset, reader in zip(offsets, readers, strict=True):
        assert await reader == whole[offset:]
    for offset in offsets:  # after the end (compacted into one bytes object)
        assert await read_all(store, "gs_a", offset) == whole[offset:]
    meta = await store.meta("gs_a")
    assert meta is not None and meta.ended and meta.length == len(whole)


async def test_a_cut_stream_ends_its_readers_broken() -> None:
    store = MemoryStore(memory_bytes=1 << 20)
    recorder = store.begin("gs_b", "c", "openai", ttl_s=60, max_bytes=1 << 20)
    recorder.append(b"data: 1\n\ndata: par")
    recorder.end(cut=True)
    got: list[bytes] = []

    async def follow() -> None:
        async for chunk in store.read("gs_b", 0):
            got.append(chunk)

    with pytest.raises(StreamCut):
        await follow()
    assert b"".join(got) == b"data: 1\n\ndata: par"


async def test_the_bound_evicts_the_oldest_ended_first_and_never_a_live_one() -> None:
    store = MemoryStore(memory_bytes=65536)
    live = store.begin("gs_live", "c", "openai", ttl_s=60, max_bytes=1 << 20)
    live.append(b"x" * 10_000)
    for i in range(8):
        rec = store.begin(f"gs_{i}", "c", "openai", ttl_s=60, max_bytes=1 << 20)
        rec.append(b"y" * 10_000)
        rec.end()
    assert store.kept_bytes <= 65536
    kept = [i for i in range(8) if await store.meta(f"gs_{i}") is not None]
    assert kept == list(range(8 - len(kept), 8))  # the newest survive
    assert await store.meta("gs_live") is not None


async def test_expiry_follows_each_streams_own_ttl() -> None:
    store = MemoryStore(memory_bytes=1 << 20)
    long = store.begin("gs_long", "c", "openai", ttl_s=600, max_bytes=1024)
    long.end()
    short = store.begin("gs_short", "c", "openai", ttl_s=0.05, max_bytes=1024)
    short.end()
    time.sleep(0.1)
    assert await store.meta("gs_short") is None
    assert await store.meta("gs_long") is not None


async def test_a_stream_past_its_bound_answers_oversize_and_keeps_nothing() -> None:
    store = MemoryStore(memory_bytes=1 << 20)
    rec = store.begin("gs_big", "c", "openai", ttl_s=60, max_bytes=1024)
    rec.append(b"z" * 1000)
    rec.append(b"z" * 100)
    meta = await store.meta("gs_big")
    assert meta is not None and meta.oversize and store.kept_bytes == 0
