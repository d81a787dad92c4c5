"""`GET /metrics`, parsed with the Prometheus text parser after a mixed workload whose every
count is known in advance: outcomes, retries by reason, TTFT and token histograms, key states,
limiter decisions, active streams, and the semantic-convention bucket boundaries."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.appkeys import OUTCOME_SINKS
from gateway.fake import estimate_prompt_tokens
from gateway.report import Report
from tests.support import (
    CALLER_KEY,
    OTHER_CALLER_KEY,
    PROMPT_CANARIES,
    UNKNOWN_CALLER_KEY,
    Fake,
    Gateway,
    GatewayFactory,
    one_bad_key,
    sha,
)

CHAT = "/v1/chat/completions"
# The GenAI semantic conventions' explicit bucket boundaries (seconds, tokens).
SECONDS_BUCKETS = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
]  # fmt: skip
TOKEN_BUCKETS = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
]  # fmt: skip
RPM = 2  # limited-app's requests per minute


def mixed_config(fake_url: str) -> dict[str, Any]:
    return {
        "auth": {
            "api_keys": [
                {"id": "test-app", "sha256": sha(CALLER_KEY)},
                {"id": "limited-app", "sha256": sha(OTHER_CALLER_KEY), "tier": "t"},
            ]
        },
        "tiers": {"t": {"requests_per_minute": RPM}},
        **one_bad_key(fake_url),
        "policy": {"timeouts": {"chunk_s": 0.3}, "retry": {"max_attempts": 3}},
    }


class Workload:
    """Sends requests and remembers what the metrics must say about them."""

    def __init__(self, gw: Gateway, session: aiohttp.ClientSession) -> None:
        self.gw = gw
        self.session = session
        self.sent = 0
        self.prompts = iter(PROMPT_CANARIES)
        self.input_tokens: list[int] = []  # one per request the upstream reported usage for
        self.output_tokens: list[int] = []
        self.sessions = 0

    def body(self, model: str = "gpt-test", *, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": next(self.prompts)}],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def plan(self, *steps: dict[str, Any]) -> dict[str, str]:
        self.sessions += 1
        return {
            "x-fake-plan": orjson.dumps(list(steps)).decode(),
            "x-fake-session": f"m{self.sessions}",
        }

    async def send(
        self,
        body: dict[str, Any],
        *,
        key: str | None = CALLER_KEY,
        chunks: int = 3,
        usage: bool = False,
        expect: int = 200,
        **headers: str,
    ) -> bytes:
        """One request read to its end. `usage`: the fake reports usage for it (prompt
        estimate in, `chunks` out), so the token histograms observe it."""
        all_headers = {"x-fake-chunks": str(chunks), **headers}
        if key is not None:
            all_headers["authorization"] = f"Bearer {key}"
        self.sent += 1
        async with self.session.post(
            self.gw.url + CHAT, data=orjson.dumps(body), headers=all_headers
        ) as resp:
            data = await resp.read()
            assert resp.status == expect, data
        if usage:
            self.input_tokens.append(estimate_prompt_tokens(body))
            self.output_tokens.append(chunks)
        return data

    async def cancel(self, body: dict[str, Any]) -> None:
        """A stream the client leaves while the upstream stalls after 2 tokens."""
        self.sent += 1
        resp = await self.session.post(
            self.gw.url + CHAT,
            data=orjson.dumps(body),
            headers={"authorization": f"Bearer {CALLER_KEY}", "x-fake-stall-after": "2"},
        )
        assert resp.status == 200
        seen = 0
        async for piece in resp.content.iter_any():
            seen += piece.count(b"\n\n")
            if seen >= 3:
                break
        resp.close()


async def scrape(gw: Gateway) -> dict[str, Any]:
    """The admin listener's /metrics (the public port has none)."""
    url = gw.admin_url + "/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(
    families: Mapping[str, Any], family: str, suffix: str = "", **labels: str
) -> list[Sample]:
    """The samples `family + suffix` whose labels include `labels`."""
    if family not in families:
        return []
    name = family + suffix
    return [
        s
        for s in families[family].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def by_labels(found: Iterable[Sample], *names: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for s in found:
        key = tuple(s.labels[n] for n in names)
        out[key] = out.get(key, 0.0) + s.value
    return out


def total(found: Iterable[Sample]) -> float:
    return sum(s.value for s in found)


def boundaries(families: Mapping[str, Any], family: str) -> set[tuple[float, ...]]:
    """The bucket boundaries of each label set of a histogram (+Inf left out)."""
    per_series: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for s in samples(families, family, "_bucket"):
        series = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        per_series.setdefault(series, []).append(float(s.labels["le"]))
    assert per_series, f"no {family} series"
    out = set()
    for les in per_series.values():
        assert les[-1] == float("inf")
        out.add(tuple(les[:-1]))
    return out


def cumulative(values: list[int], bounds: list[int]) -> list[float]:
    return [float(sum(1 for v in values if v <= b)) for b in bounds] + [float(len(values))]


async def test_metrics_match_a_mixed_workload_exactly(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory(mixed_config(fake.url))
    finished: list[Report] = []
    gw.app[OUTCOME_SINKS].append(lambda o, _now: finished.append(o))
    async with aiohttp.ClientSession() as session:
        w = Workload(gw, session)
        # 3 clean streams and 1 plain request: ok, with usage.
        await w.send(w.body(), chunks=4, usage=True, **{"x-fake-gap-ms": "10"})
        for chunks in (2, 5):
            await w.send(w.body(), chunks=chunks, usage=True)
        await w.send(w.body(stream=False), chunks=6, usage=True)
        # limited-app: RPM admitted, then 3 denied by the limiter.
        for _ in range(RPM):
            await w.send(w.body(), key=OTHER_CALLER_KEY, chunks=2, usage=True)
        for _ in range(3):
            await w.send(w.body(), key=OTHER_CALLER_KEY, expect=429)
        # A stream retried once after a 500: ok.
        await w.send(w.body(), chunks=3, usage=True, **w.plan({"status": 500}, {}))
        # A revoked key: 401, disabled, the next key serves: ok.
        await w.send(w.body("one-bad-key"), chunks=3, usage=True)
        # 2 streams ended by the upstream's in-band error after 2 tokens: upstream_error.
        for _ in range(2):
            await w.send(w.body(), chunks=5, **{"x-fake-error-after": "2"})
        # 2 callers without a valid key: auth_failed.
        await w.send(w.body(), key=UNKNOWN_CALLER_KEY, expect=401)
        await w.send(w.body(), key=None, expect=401)
        # A stall after 2 tokens killed at chunk_s: chunk_timeout.
        await w.send(w.body(), chunks=5, **{"x-fake-stall-after": "2"})
        # A client that leaves mid-stream: client_cancel.
        await w.cancel(w.body())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while len(finished) < w.sent and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert len(finished) == w.sent == 17

    families = await scrape(gw)

    # Requests by outcome, exactly (auth failures happen before the model is known).
    requests = by_labels(
        samples(families, "llm_gateway_requests", "_total"), "gen_ai_request_model", "outcome"
    )
    assert requests == {
        ("gpt-test", "ok"): 3 + 1 + RPM + 1,
        ("one-bad-key", "ok"): 1,
        ("gpt-test", "rate_limited"): 3,
        ("gpt-test", "upstream_error"): 2,
        # Not a configured model name (not read yet here): the one `unknown` bucket.
        ("unknown", "auth_failed"): 2,
        ("gpt-test", "chunk_timeout"): 1,
        ("gpt-test", "client_cancel"): 1,
    }

    # Retries by provider and reason: one per failed attempt that was followed by another.
    retries = by_labels(
        samples(families, "llm_gateway_retries", "_total"), "gen_ai_provider_name", "reason"
    )
    assert retries == {("oa", "upstream_500"): 1, ("revoked-one", "upstream_401"): 1}

    # Every request that reached an upstream has a duration; by error type.
    duration = by_labels(
        samples(families, "gen_ai_client_operation_duration_seconds", "_count"), "error_type"
    )
    assert duration == {
        ("",): 3 + 1 + RPM + 1 + 1 + 1,
        ("upstream_error",): 2,
        ("chunk_timeout",): 1,
    }
    assert total(samples(families, "llm_gateway_overhead_seconds", "_count")) == 12

    # Time to first chunk: one observation per stream that had a first token.
    ttfc = by_labels(
        samples(families, "gen_ai_client_operation_time_to_first_chunk_seconds", "_count"),
        "gen_ai_request_model",
        "deployment",
        "gen_ai_provider_name",
        "gen_ai_operation_name",
    )
    assert ttfc == {
        ("gpt-test", "oa/fake-gpt", "openai", "chat"): 3 + RPM + 1 + 2 + 1 + 1,
        ("one-bad-key", "revoked-one/fake-gpt", "openai", "chat"): 1,
    }

    # Token usage: count, sum and buckets exactly, from the fake's deterministic usage.
    token = "gen_ai_client_token_usage"
    for kind, values in (("input", w.input_tokens), ("output", w.output_tokens)):
        assert len(values) == 8
        assert total(samples(families, token, "_count", gen_ai_token_type=kind)) == len(values)
        assert total(samples(families, token, "_sum", gen_ai_token_type=kind)) == sum(values)
        buckets: Counter[float] = Counter()
        for s in samples(families, token, "_bucket", gen_ai_token_type=kind):
            buckets[float(s.labels["le"])] += s.value
        expected = cumulative(values, TOKEN_BUCKETS)
        assert [buckets[float(b)] for b in [*TOKEN_BUCKETS, float("inf")]] == expected
    assert w.output_tokens == [4, 2, 5, 6, 2, 2, 3, 3]

    # Key states: the revoked key is disabled, every other key is ok; nothing in flight.
    states = {
        (s.labels["gen_ai_provider_name"], s.labels["key_id"]): s.labels["state"]
        for s in samples(families, "llm_gateway_upstream_key_state")
        if s.value == 1
    }
    assert states == {
        ("oa", "oa-1"): "ok",
        ("oa", "oa-2"): "ok",
        ("an", "an-1"): "ok",
        ("revoked-one", "bad"): "disabled",
        ("revoked-one", "good"): "ok",
    }
    assert len(samples(families, "llm_gateway_upstream_key_state")) == 3 * len(states)
    assert {s.value for s in samples(families, "llm_gateway_upstream_key_in_flight")} == {0.0}

    # Limiter decisions: only limited-app has limits.
    decisions = by_labels(
        samples(families, "llm_gateway_limiter_decisions", "_total"),
        "backend",
        "decision",
        "limit",
    )
    assert decisions == {("memory", "allowed", "none"): RPM, ("memory", "denied", "rpm"): 3}

    # No stream is open any more.
    active = samples(families, "llm_gateway_active_streams")
    assert active and {s.value for s in active} == {0.0}

    # The gapped stream's events reached the relay one by one: a mean gap per output chunk.
    # (Burst streams: see test_time_per_output_chunk_of_a_burst_stream.)
    per_chunk = "gen_ai_client_operation_time_per_output_chunk_seconds"
    assert total(samples(families, per_chunk, "_count")) >= 1

    # The semantic-convention buckets.
    for family in (
        "gen_ai_client_operation_duration_seconds",
        "gen_ai_client_operation_time_to_first_chunk_seconds",
        per_chunk,
    ):
        assert boundaries(families, family) == {tuple(SECONDS_BUCKETS)}
    assert boundaries(families, token) == {tuple(float(b) for b in TOKEN_BUCKETS)}


async def test_retries_counter_excludes_the_last_failed_attempt(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory({"policy": {"retry": {"max_attempts": 3}}})
    async with aiohttp.ClientSession() as session:
        w = Workload(gw, session)
        await w.send(w.body(), expect=500, **w.plan({"status": 500}))
    assert len(fake.provider.records) == 3  # 3 attempts, so 2 retries
    families = await scrape(gw)
    retries = by_labels(
        samples(families, "llm_gateway_retries", "_total"), "gen_ai_provider_name", "reason"
    )
    assert retries == {("oa", "upstream_500"): 2}


async def test_time_per_output_chunk_of_a_burst_stream(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gw = await gateway_factory()
    async with aiohttp.ClientSession() as session:
        w = Workload(gw, session)
        # No gap: the fake writes the whole stream at once (one read at the gateway).
        await w.send(w.body(), chunks=5)
    families = await scrape(gw)
    ttfc = "gen_ai_client_operation_time_to_first_chunk_seconds"
    per_chunk = "gen_ai_client_operation_time_per_output_chunk_seconds"
    assert total(samples(families, ttfc, "_count")) == 1
    assert total(samples(families, per_chunk, "_count")) == 1


async def test_prometheus_off_means_no_metrics_route(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"telemetry": {"prometheus": False}})
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.admin_url + "/metrics") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
        async with session.get(gw.url + "/metrics") as resp:
            assert resp.status == 404


async def test_the_public_port_serves_no_metrics(gateway: Gateway) -> None:
    """/metrics names every upstream key id and its state: only the admin listener has it
    (open there, and with the admin token too, for Prometheus set up either way)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as resp:
            assert resp.status == 404
            assert "oa-1" not in await resp.text()
        async with session.get(gateway.admin_url + "/metrics") as resp:
            assert resp.status == 200
            assert 'key_id="oa-1"' in await resp.text()
        headers = gateway.admin_headers
        async with session.get(gateway.admin_url + "/metrics", headers=headers) as resp:
            assert resp.status == 200
