"""The body writer: compression of bodies and of streams, event by event, to the end of the
encoding."""

from __future__ import annotations

import gzip
import json
import zlib

import aiohttp
import openai

from gateway.fake import FakeProvider, fake_tokens
from tests import fake_support
from tests.fake_support import ANT_HEADERS, CHAT_BODY, OAI_HEADERS

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
http = fake_support.http
oai = fake_support.oai


async def test_gzip_non_stream_body_and_deflate_error_status(
    oai: openai.AsyncOpenAI, url: str, provider: FakeProvider
) -> None:
    completion = await oai.chat.completions.create(
        model="fake-gpt@content_encoding=gzip", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "".join(fake_tokens(8))
    sent = bytes(provider.records[0].sent)
    assert sent.startswith(b"\x1f\x8b")
    assert json.loads(gzip.decompress(sent))["choices"][0]["message"]["content"] == "".join(
        fake_tokens(8)
    )

    headers = {
        **OAI_HEADERS,
        "Accept-Encoding": "identity",
        "x-fake-content-encoding": "deflate",
        "x-fake-status": "429",
    }
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers) as resp,
    ):
        assert resp.status == 429
        assert resp.headers["Content-Encoding"] == "deflate"
        data = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(data)
    assert provider.records[1].headers["accept-encoding"] == "identity"
    assert data == provider.records[1].sent
    assert json.loads(zlib.decompress(data))["error"]["code"] == "rate_limit_exceeded"


async def test_compressed_stream_is_flushed_event_by_event(
    url: str, provider: FakeProvider
) -> None:
    body = {**CHAT_BODY, "model": "fake-gpt@chunks=3,gap_ms=30,content_encoding=gzip"}
    arrivals: list[bytes] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(
            url + "/v1/chat/completions",
            json={**body, "stream": True},
            headers={**OAI_HEADERS, "Accept-Encoding": "identity"},
        ) as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        async for piece in resp.content.iter_any():
            arrivals.append(piece)
    assert b"".join(arrivals) == provider.records[0].sent
    decoder = zlib.decompressobj(wbits=31)
    decoded = [decoder.decompress(piece) for piece in arrivals]
    # Every read decodes on its own into whole events (or is the gzip trailer alone).
    assert all(d == b"" or d.endswith(b"\n\n") for d in decoded)
    assert decoded[0].startswith(b"data: {")
    assert sum(1 for d in decoded if d) >= 4  # six events 30 ms apart; margin for merges
    assert decoder.eof  # the encoding was finished
    text = b"".join(decoded)
    assert text.count(b"\n\n") == 6  # role, 3 content, finish, [DONE]
    assert text.endswith(b"data: [DONE]\n\n")


async def test_compressed_stream_endings_finish_the_encoding(
    http: aiohttp.ClientSession, url: str, provider: FakeProvider
) -> None:
    body = {"model": "fake-claude@chunks=3", "max_tokens": 10, "stream": True, "messages": []}
    cases = (
        ({"x-fake-content-encoding": "deflate", "x-fake-error-after": "1"}, "error_event"),
        ({"x-fake-content-encoding": "gzip", "x-fake-truncate-after": "2"}, "truncated"),
    )
    for script, outcome in cases:
        async with http.post(
            url + "/v1/messages", json=body, headers={**ANT_HEADERS, **script}
        ) as resp:
            assert resp.headers["Content-Encoding"] == script["x-fake-content-encoding"]
            plain = await resp.read()  # aiohttp decodes it by default
        record = provider.records[-1]
        assert record.outcome == outcome
        decoder = zlib.decompressobj(wbits=47)  # zlib or gzip, by header
        assert decoder.decompress(bytes(record.sent)) == plain
        assert decoder.eof
    assert plain.count(b"event: content_block_delta") == 2
