"""Replays of every recorded stream, exactly as recorded, and how scripts apply to them."""

from __future__ import annotations

import aiohttp

from gateway.fake import FakeProvider
from tests import fake_support
from tests.fake_support import ANT_HEADERS, RECORDINGS, expected_replay, replay_target

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http


def _replay_cases() -> list[tuple[str, int]]:
    cases: list[tuple[str, int]] = []
    for path in sorted(RECORDINGS.glob("*/*.chunks.jsonl")):
        name = str(path.relative_to(RECORDINGS)).removesuffix(".chunks.jsonl")
        created = path.read_bytes().count(b'"type":"response.created"')
        cases.extend((name, part) for part in range(max(created, 1)))
    return cases


def test_replay_cases_cover_every_recording() -> None:
    names = {name for name, _ in _replay_cases()}
    assert len(names) == 26
    assert sum(1 for _, part in _replay_cases() if part) == 3  # four responses in one file


async def test_every_recording_replays_exactly(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    cases = _replay_cases()
    for name, part in cases:
        path, headers = replay_target(name)
        script = {"x-fake-replay": name, "x-fake-replay-part": str(part)}
        async with http.post(
            url + path, json={"model": "m", "stream": True}, headers={**headers, **script}
        ) as resp:
            assert resp.status == 200, name
            data = await resp.read()
        expected = expected_replay(name, part)
        record = provider.records[-1]
        assert record.sent == expected, (name, part)
        assert data == expected, (name, part)
        assert record.completed
    assert len(provider.records) == len(cases)


async def test_replay_honours_line_ending_and_split_writes(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    name = "anthropic-messages/anthropic-web-fetch-tool.1"  # long non-ASCII text
    headers = {
        **ANT_HEADERS,
        "x-fake-replay": name,
        "x-fake-line-ending": "crlf",
        "x-fake-split-seed": "42",
    }
    pieces: list[bytes] = []
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=headers) as resp:
        async for piece in resp.content.iter_any():
            pieces.append(piece)
    expected = expected_replay(name, 0, b"\r\n")
    record = provider.records[0]
    assert b"".join(pieces) == expected
    assert record.sent == expected
    # 1..64-byte pieces: on average ~32 bytes, far more writes than the 64 events.
    assert record.writes >= len(expected) // 48
    assert record.writes > 5 * 64
    assert len(pieces) > 64


async def test_replay_counts_events_for_truncation(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    name = "anthropic-messages/anthropic-text"
    headers = {**ANT_HEADERS, "x-fake-replay": name, "x-fake-truncate-after": "5"}
    async with http.post(url + "/v1/messages", json={"model": "m"}, headers=headers) as resp:
        data = await resp.read()
    expected = expected_replay(name, 0)
    assert data == b"".join(expected.split(b"\n\n")[i] + b"\n\n" for i in range(5))
    assert provider.records[0].outcome == "truncated"
