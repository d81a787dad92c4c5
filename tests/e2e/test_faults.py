"""The fault matrix: the fake provider scripted per attempt, each case with its exact
client-visible outcome and the exact number of upstream attempts. In every case the content
the client received comes from exactly one upstream attempt (never two mixed)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.appkeys import OUTCOME_SINKS
from gateway.fake import RequestRecord
from gateway.report import Report
from tests.support import (
    CALLER_KEY,
    FALLBACK_KEYS,
    REVOKED_KEYS,
    UPSTREAM_KEYS,
    Fake,
    Gateway,
    GatewayFactory,
)

FAULTS_CONFIG: dict[str, Any] = {
    "providers": {
        "oa-b": {
            "api": "openai",
            "base_url": "PLACEHOLDER",
            "keys": [{"id": "b-1", "secret": FALLBACK_KEYS[0]}],
            "forward_headers": ["x-fake-*"],
        },
        "dead": {
            "api": "openai",
            "base_url": "http://127.0.0.1:9/v1",  # discard port: connection refused
            "keys": [{"id": "dead-1", "secret": "sk-test-dead-0000"}],
        },
        "revoked-one": {
            "api": "openai",
            "base_url": "PLACEHOLDER",
            "keys": [
                {"id": "bad", "secret": REVOKED_KEYS[0]},
                {"id": "good", "secret": UPSTREAM_KEYS[0]},
            ],
            "forward_headers": ["x-fake-*"],
        },
        "revoked-all": {
            "api": "openai",
            "base_url": "PLACEHOLDER",
            "keys": [
                {"id": "bad-1", "secret": REVOKED_KEYS[0]},
                {"id": "bad-2", "secret": REVOKED_KEYS[1]},
            ],
            "forward_headers": ["x-fake-*"],
            "disable_s": 300,
        },
    },
    "models": {
        "with-fallback": [
            {"provider": "oa", "model": "fake-gpt"},
            {"provider": "oa-b", "model": "fake-gpt-b"},
        ],
        "dead-first": [
            {"provider": "dead", "model": "x"},
            {"provider": "oa", "model": "fake-gpt"},
        ],
        "one-bad-key": [{"provider": "revoked-one", "model": "fake-gpt"}],
        "all-bad-keys": [{"provider": "revoked-all", "model": "fake-gpt"}],
    },
    "policy": {
        "timeouts": {"first_byte_s": 0.4, "chunk_s": 0.4},
        "retry": {
            "max_attempts": 3,
            "base_delay_ms": 5,
            "max_delay_ms": 20,
            "max_retry_after_s": 5,
        },
    },
}


@dataclass
class Result:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    records: list[RequestRecord]
    outcome: Report
    elapsed: float


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, fake: Fake) -> Gateway:
    config = orjson.loads(
        orjson.dumps(FAULTS_CONFIG).replace(b"PLACEHOLDER", fake.url.encode() + b"/v1")
    )
    return await gateway_factory(config)


_session = 0


async def call(
    gw: Gateway,
    fake: Fake,
    plan: Sequence[dict[str, Any]],
    *,
    model: str = "gpt-test",
    path: str = "/v1/chat/completions",
    stream: bool = True,
) -> Result:
    global _session
    _session += 1
    session_id = f"s{_session}"
    outcomes: list[Report] = []
    sink = lambda o, _now: outcomes.append(o)  # noqa: E731
    gw.app[OUTCOME_SINKS].append(sink)
    if path == "/v1/messages":
        body = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        auth = {"x-api-key": CALLER_KEY}
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {CALLER_KEY}"}
    body["stream"] = stream
    headers = {
        **auth,
        "x-fake-plan": orjson.dumps(list(plan)).decode(),
        "x-fake-session": session_id,
        "x-fake-chunks": "5",
    }
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gw.url + path, data=orjson.dumps(body), headers=headers
            ) as resp:
                received = bytearray()
                try:
                    async for piece in resp.content.iter_any():
                        received += piece
                except aiohttp.ClientPayloadError:
                    received += b"<cut>"
                status, resp_headers = resp.status, resp.headers.copy()
    finally:
        gw.app[OUTCOME_SINKS].remove(sink)
    elapsed = time.perf_counter() - started
    records = [r for r in fake.provider.records if r.session == session_id]
    assert len(outcomes) == 1
    return Result(status, resp_headers, bytes(received), records, outcomes[0], elapsed)


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def single_source(result: Result, *, gateway_error_event: bool) -> RequestRecord:
    """The one upstream attempt whose bytes the client's stream content is a prefix of."""
    content = result.body
    if gateway_error_event:
        last = events(content)[-1] + b"\n\n"
        assert content.endswith(last)
        content = content[: -len(last)]
    assert content, "the client got no content"
    sources = [r for r in result.records if bytes(r.sent).startswith(content)]
    assert len(sources) == 1, "content from zero or several attempts"
    return sources[0]


def assert_attempts(result: Result, n: int) -> None:
    assert len(result.records) == n
    assert result.outcome.attempts == n
    assert result.headers["x-gateway-attempts"] == str(n)


async def test_connect_refused_fails_over_to_the_next_deployment(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{}], model="dead-first")
    assert result.status == 200
    assert result.outcome.attempts == 2  # the dead one, then the fake
    assert len(result.records) == 1
    assert result.headers["x-gateway-deployment"] == "oa/fake-gpt"
    assert single_source(result, gateway_error_event=False) is result.records[0]
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert result.outcome.retry_reasons == ["connect_error"]


async def test_reset_before_headers_then_success(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"reset_before_headers": True}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    assert single_source(result, gateway_error_event=False) is result.records[1]
    assert result.outcome.retry_reasons == ["upstream_reset"]


async def test_429_with_retry_after_then_success_on_another_key(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 429, "retry_after": "30"}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    keys = [r.api_key for r in result.records]
    assert keys[0] != keys[1]  # the rate-limited key cools down; the other key serves
    assert result.elapsed < 5  # no sleeping through the 30 s: another key was there
    assert single_source(result, gateway_error_event=False) is result.records[1]
    # The cooled-down key is skipped by the next request too.
    again = await call(gw, fake, [{}])
    assert again.status == 200
    assert again.records[0].api_key == keys[1]


async def test_429_on_every_key_long_retry_after_is_a_503(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 429, "retry_after": "120"}])
    assert result.status == 503
    assert_attempts(result, 2)  # each key once, then no usable key
    assert 118 <= int(result.headers["retry-after"]) <= 120
    error = orjson.loads(result.body)["error"]
    assert error["code"] == "upstream_unavailable"
    assert "cooling down" in error["message"]


async def test_429_on_every_key_short_retry_after_waits_then_passes_429(
    gw: Gateway, fake: Fake
) -> None:
    result = await call(gw, fake, [{"status": 429, "retry_after_ms": "150"}])
    assert result.status == 429  # the budget of 3 attempts is spent: the upstream's answer
    assert_attempts(result, 3)
    assert result.headers["retry-after-ms"] == "150"
    assert orjson.loads(result.body)["error"]["code"] == "rate_limit_exceeded"
    assert result.elapsed >= 0.15  # it waited for a cooldown to end before the 3rd attempt


async def test_500_then_success(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 500}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    assert single_source(result, gateway_error_event=False) is result.records[1]


async def test_non_retryable_400_is_not_retried(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 400}, {}])
    assert result.status == 400
    assert_attempts(result, 1)
    assert result.body == bytes(result.records[0].sent)


async def test_529_storm_backs_off_and_passes_the_last_answer(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 529}], model="claude-test", path="/v1/messages")
    assert result.status == 529
    assert_attempts(result, 3)
    body = orjson.loads(result.body)
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    # Overload is the provider's, not the key's: the key is still in rotation.
    pool = gw.runtime.pools["an"]
    assert [state for _, state, _ in pool.key_states(time.time())] == ["ok"]


async def test_first_byte_stall_then_success_on_next_key(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"first_delay_ms": 3000}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    assert result.records[0].api_key != result.records[1].api_key
    assert single_source(result, gateway_error_event=False) is result.records[1]
    assert result.outcome.retry_reasons == ["first_byte_timeout"]
    await fake.provider.wait_until(lambda: result.records[0].disconnected, timeout=2)


async def test_headers_stall_then_success(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"headers_delay_ms": 3000}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    assert single_source(result, gateway_error_event=False) is result.records[1]


async def test_stall_mid_stream_is_killed_at_chunk_s(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"stall_after": 3}, {}])
    assert result.status == 200
    assert_attempts(result, 1)  # committed: never retried
    got = events(result.body)
    assert len(got) == 1 + 3 + 1
    error = orjson.loads(got[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout"
    assert b"[DONE]" not in result.body
    assert single_source(result, gateway_error_event=True) is result.records[0]
    assert result.outcome.outcome == "chunk_timeout"
    await fake.provider.wait_until(lambda: result.records[0].disconnected, timeout=2)


async def test_truncated_stream_without_done(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"truncate_after": 3}, {}])
    assert result.status == 200
    assert_attempts(result, 1)
    got = events(result.body)
    assert len(got) == 1 + 3 + 1
    assert orjson.loads(got[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    assert single_source(result, gateway_error_event=True) is result.records[0]
    assert result.outcome.outcome == "truncated"


async def test_truncated_by_reset_mid_stream(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"truncate_after": 2, "truncate_mode": "reset"}, {}])
    assert result.status == 200
    assert_attempts(result, 1)
    assert result.outcome.outcome == "payload_error"
    assert single_source(result, gateway_error_event=True) is result.records[0]


async def test_in_band_error_as_first_event_is_retried(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"error_after": 0}, {}])
    assert result.status == 200
    assert_attempts(result, 2)
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in result.body
    assert single_source(result, gateway_error_event=False) is result.records[1]
    assert result.outcome.retry_reasons == ["first_event_error"]


async def test_in_band_overload_first_event_on_every_attempt_is_a_529(
    gw: Gateway, fake: Fake
) -> None:
    result = await call(gw, fake, [{"error_after": 0}], model="claude-test", path="/v1/messages")
    assert result.status == 529
    assert_attempts(result, 3)
    assert orjson.loads(result.body)["error"]["type"] == "overloaded_error"


async def test_in_band_error_after_n_chunks_is_terminal(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"error_after": 3}, {}])
    assert result.status == 200
    assert_attempts(result, 1)
    got = events(result.body)
    assert len(got) == 1 + 3 + 1
    assert b"[DONE]" not in result.body
    # The upstream's own error event, passed through, not doubled by the gateway.
    assert result.body == bytes(result.records[0].sent)
    assert result.outcome.outcome == "upstream_error"


async def test_401_on_one_key_disables_it_and_the_next_key_serves(
    gw: Gateway, fake: Fake, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await call(gw, fake, [{}], model="one-bad-key")
    assert result.status == 200
    assert_attempts(result, 2)
    assert [r.api_key for r in result.records] == [REVOKED_KEYS[0], UPSTREAM_KEYS[0]]
    assert single_source(result, gateway_error_event=False) is result.records[1]
    assert result.outcome.retry_reasons == ["upstream_401"]
    pool = gw.runtime.pools["revoked-one"]
    states = {k.id: state for k, state, _ in pool.key_states(time.time())}
    assert states == {"bad": "disabled", "good": "ok"}
    again = await call(gw, fake, [{}], model="one-bad-key")
    assert_attempts(again, 1)
    assert again.records[0].api_key == UPSTREAM_KEYS[0]
    logs = capsys.readouterr()
    text = logs.out + logs.err
    assert "upstream key disabled" in text and "key_id=bad" in text
    assert REVOKED_KEYS[0] not in text


async def test_all_keys_disabled_is_a_503_with_retry_after(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{}], model="all-bad-keys")
    assert result.status == 503
    assert_attempts(result, 2)
    assert 299 <= int(result.headers["retry-after"]) <= 300
    assert orjson.loads(result.body)["error"]["code"] == "upstream_unavailable"
    again = await call(gw, fake, [{}], model="all-bad-keys")
    assert again.status == 503
    assert len(again.records) == 0  # nothing is sent upstream while every key is out


async def test_fallback_deployment_after_500s_on_the_first(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 500}, {"status": 500}, {}], model="with-fallback")
    assert result.status == 200
    assert_attempts(result, 3)
    # oa's two keys first (in order of preference), then the fallback deployment.
    assert [r.api_key for r in result.records][-1] == FALLBACK_KEYS[0]
    assert result.headers["x-gateway-deployment"] == "oa-b/fake-gpt-b"
    assert result.records[-1].json is not None
    assert result.records[-1].json["model"] == "fake-gpt-b"


async def test_every_attempt_is_built_from_the_original_request(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 500}, {}], model="with-fallback")
    bodies = [r.json for r in result.records]
    assert bodies[0] is not None and bodies[1] is not None
    assert {k: v for k, v in bodies[0].items() if k != "model"} == {
        k: v for k, v in bodies[1].items() if k != "model"
    }


async def test_non_stream_retry(gw: Gateway, fake: Fake) -> None:
    result = await call(gw, fake, [{"status": 503}, {}], stream=False)
    assert result.status == 200
    assert_attempts(result, 2)
    assert orjson.loads(result.body)["object"] == "chat.completion"
