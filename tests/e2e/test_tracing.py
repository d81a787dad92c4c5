"""Traces, checked with the in-memory exporter: the span tree of one request (SERVER span, auth,
limits and one CLIENT span per upstream attempt), exact attributes, the live events in order,
spans that end when the stream ends, trace context in and out (tracecontext only), and no
secret or prompt text anywhere unless `capture_content` is on."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from gateway.fake import RequestRecord, estimate_prompt_tokens
from tests.support import (
    CALLER_KEY,
    PROMPT_CANARIES,
    UNKNOWN_CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    Gateway,
    GatewayFactory,
    one_bad_key,
    sensitive_strings,
)

CHAT = "/v1/chat/completions"
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
# Baggage a caller sends must never reach a third-party provider.
BAGGAGE = "tenant=acme-corp,session=caller-private-baggage-value"
FIRST_TOKEN = "Hello"  # the fake's first content token: completion text

TTFT_PARTS = (
    "gateway.ttft.admission_ms",
    "gateway.ttft.retries_ms",
    "gateway.ttft.upstream_connect_ms",
    "gateway.ttft.upstream_ttfb_ms",
    "gateway.ttft.relay_ms",
)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    yield exp
    exp.clear()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def traced(gateway_factory: GatewayFactory, tracer_provider: TracerProvider) -> Gateway:
    return await gateway_factory(
        {"policy": {"timeouts": {"chunk_s": 0.3}}}, tracer_provider=tracer_provider
    )


def chat_body(prompt: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        **extra,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def auth(**headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CALLER_KEY}", **headers}


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def post(gw: Gateway, body: Mapping[str, Any], headers: Mapping[str, str]) -> Reply:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + CHAT, data=orjson.dumps(body), headers=dict(headers)) as resp,
    ):
        return Reply(resp.status, resp.headers, await resp.read())


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


@dataclass
class Tree:
    server: ReadableSpan
    children: list[ReadableSpan]

    @property
    def attempts(self) -> list[ReadableSpan]:
        spans = [c for c in self.children if c.kind is SpanKind.CLIENT]
        return sorted(spans, key=lambda s: attr(s, "gateway.attempt"))

    def child(self, name: str) -> ReadableSpan:
        (span,) = [c for c in self.children if c.name == name]
        return span

    @property
    def spans(self) -> list[ReadableSpan]:
        return [self.server, *self.children]


def attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes[name]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def event_names(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


def event(span: ReadableSpan, name: str, index: int = 0) -> Any:
    return [e for e in span.events if e.name == name][index]


def hex_span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def hex_trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


async def request_tree(exporter: InMemorySpanExporter, timeout: float = 3.0) -> Tree:
    """The spans of the one request this test made, once its SERVER span has ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        spans = list(exporter.get_finished_spans())
        servers = [s for s in spans if s.kind is SpanKind.SERVER]
        if servers or loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    assert len(servers) == 1, [s.name for s in spans]
    server = servers[0]
    assert server.context is not None
    others = [s for s in spans if s is not server]
    for span in others:
        assert span.parent is not None and span.parent.span_id == server.context.span_id, (
            f"{span.name} is not a child of the server span"
        )
    return Tree(server, sorted(others, key=lambda s: s.start_time or 0))


def all_text(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every name, attribute value and event attribute value of these spans, as text."""
    out: list[str] = []

    def values(mapping: Mapping[str, Any] | None) -> None:
        for key, value in (mapping or {}).items():
            out.append(key)
            if isinstance(value, (tuple, list)):
                out.extend(str(v) for v in value)
            else:
                out.append(str(value))

    for span in spans:
        out.append(span.name)
        values(span.attributes)
        values(span.resource.attributes)
        for ev in span.events:
            out.append(ev.name)
            values(ev.attributes)
        if span.status.description:
            out.append(span.status.description)
    return out


def assert_well_formed(tree: Tree) -> None:
    """One trace; every span ended; children inside the server span; events in time order,
    inside their span; no secret or canary prompt in any name or value."""
    trace_ids = {hex_trace_id(s) for s in tree.spans}
    assert len(trace_ids) == 1
    server = tree.server
    assert server.kind is SpanKind.SERVER
    assert server.start_time is not None and server.end_time is not None
    for span in tree.spans:
        assert span.start_time is not None and span.end_time is not None, f"{span.name} open"
        assert span.end_time >= span.start_time
        stamps = [e.timestamp for e in span.events]
        assert stamps == sorted(stamps), f"{span.name}: events out of order"
        assert all(span.start_time <= t <= span.end_time for t in stamps)
    for child in tree.children:
        assert child.start_time is not None and child.end_time is not None
        assert server.start_time <= child.start_time
        assert child.end_time <= server.end_time, f"{child.name} outlived the server span"
    text = all_text(tree.spans)
    for secret in sensitive_strings():
        assert not any(secret in value for value in text), f"{secret!r} is in a span"
    for span in tree.spans:
        assert "gen_ai.system" not in attrs(span)  # deprecated: gen_ai.provider.name


def key_id_of(record: RequestRecord) -> str:
    assert record.api_key in UPSTREAM_KEYS
    return f"oa-{UPSTREAM_KEYS.index(record.api_key) + 1}"


def upstream_traceparent(record: RequestRecord) -> str:
    return {k.lower(): v for k, v in record.headers.items()}["traceparent"]


def seconds(ns: int | None) -> float:
    assert ns is not None
    return ns / 1e9


# -- the four cases ------------------------------------------------------------------------


async def test_clean_stream_span_tree(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    prompt = PROMPT_CANARIES[0]
    body = chat_body(prompt, max_tokens=50)
    reply = await post(
        traced,
        body,
        auth(
            traceparent=TRACEPARENT,
            baggage=BAGGAGE,
            **{"x-fake-chunks": "4", "x-fake-gap-ms": "40"},
        ),
    )
    assert reply.status == 200
    assert reply.body.endswith(b"data: [DONE]\n\n")
    tree = await request_tree(exporter)
    assert_well_formed(tree)
    server = tree.server
    (record,) = fake.provider.records
    key_id = key_id_of(record)

    # The tree: SERVER (continuing the caller's trace) > auth, one CLIENT attempt.
    assert [c.name for c in tree.children] == ["gateway.auth", "chat fake-gpt"]
    auth_span = tree.child("gateway.auth")
    (attempt,) = tree.attempts
    assert server.name == "POST /v1/chat/completions"
    assert auth_span.kind is SpanKind.INTERNAL
    assert attempt.kind is SpanKind.CLIENT
    assert hex_trace_id(server) == CALLER_TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == CALLER_SPAN_ID
    assert auth_span.end_time is not None and attempt.start_time is not None
    assert auth_span.end_time <= attempt.start_time

    # The attempt span: GenAI attributes, exact.
    first = orjson.loads(sse_events(reply.body)[0].removeprefix(b"data: "))
    fake_port = URL(fake.url).port
    a = attrs(attempt)
    expected_attempt = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-gpt",
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 50,
        "server.address": "127.0.0.1",
        "server.port": fake_port,
        "gateway.deployment": "oa/fake-gpt",
        "gateway.key_id": key_id,
        "gateway.attempt": 1,
        "gateway.attempt.outcome": "ok",
        "gen_ai.response.id": first["id"],
        "gen_ai.response.model": "fake-gpt",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": estimate_prompt_tokens(body),
        "gen_ai.usage.output_tokens": 4,
        "gateway.events": len(sse_events(reply.body)),
    }
    assert {k: a.get(k) for k in expected_attempt} == expected_attempt
    assert str(a["gateway.key_fp"]).startswith("fp_")
    assert attempt.status.status_code is StatusCode.UNSET
    assert "error.type" not in a

    # Live events, in order: headers, first byte, then (one 40 ms gap later) the first token.
    assert event_names(attempt) == [
        "gen_ai.response_headers",
        "gen_ai.first_byte",
        "gen_ai.first_token",
    ]
    assert event(attempt, "gen_ai.response_headers").attributes["http.status_code"] == 200
    first_byte = event(attempt, "gen_ai.first_byte").timestamp
    first_token = event(attempt, "gen_ai.first_token").timestamp
    assert first_token - first_byte >= 0.03e9  # the role chunk came first, a gap before "Hello"
    # Recorded when it happened, and the span ends when the stream ends (5 more gaps).
    assert seconds(attempt.end_time) - seconds(first_token) >= 0.15
    assert server.end_time is not None and attempt.end_time is not None
    assert server.end_time >= attempt.end_time

    # The server span: outcome, routing, the TTFT split, the overhead.
    s = attrs(server)
    expected_server = {
        "gen_ai.request.model": "gpt-test",
        "gen_ai.operation.name": "chat",
        "gateway.caller": "test-app",
        "http.response.status_code": 200,
        "gateway.outcome": "ok",
        "gateway.attempts": 1,
        "gateway.deployment": "oa/fake-gpt",
        "gateway.key_id": key_id,
    }
    assert {k: s.get(k) for k in expected_server} == expected_server
    assert server.status.status_code is StatusCode.UNSET
    assert event_names(server) == []
    ttfc = s["gen_ai.response.time_to_first_chunk"]
    # The attempt's own time to first chunk counts from the attempt, the server's from the
    # request: the difference is admission (auth, parsing) only, one attempt here.
    attempt_ttfc = a["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttfc - attempt_ttfc <= s["gateway.ttft.admission_ms"] / 1000 + 0.005
    assert 0.03 <= ttfc <= seconds(server.end_time) - seconds(server.start_time)
    parts = {name: s[name] for name in TTFT_PARTS}
    assert all(v >= 0 for v in parts.values()), parts
    # The parts add up to the time to the first byte sent, which came before the first token.
    assert sum(parts.values()) <= ttfc * 1000 + 0.5
    overhead = s["gateway.overhead_ms"]
    assert parts["gateway.ttft.admission_ms"] <= overhead
    assert overhead <= parts["gateway.ttft.admission_ms"] + parts["gateway.ttft.relay_ms"] + 1e-6
    assert reply.headers["x-gateway-overhead-ms"] == f"{overhead:.3f}"
    assert "gen_ai.input.messages" not in s

    # Upstream: traceparent = the caller's trace, the attempt span as parent; no baggage.
    assert upstream_traceparent(record) == f"00-{CALLER_TRACE_ID}-{hex_span_id(attempt)}-01"
    upstream_headers = {k.lower() for k in record.headers}
    assert "baggage" not in upstream_headers
    assert not any("caller-private-baggage-value" in v for v in record.headers.values())

    # No prompt and no completion text in any span (capture_content is off).
    text = all_text(tree.spans)
    assert not any(prompt in v for v in text)
    assert not any(FIRST_TOKEN in v for v in text)


async def test_retried_stream_span_tree(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    plan = [{"status": 503}, {"status": 429, "retry_after": "30"}, {}]
    reply = await post(
        traced,
        chat_body(PROMPT_CANARIES[1]),
        auth(
            traceparent=TRACEPARENT,
            **{
                "x-fake-plan": orjson.dumps(plan).decode(),
                "x-fake-session": "retried",
                "x-fake-chunks": "3",
            },
        ),
    )
    assert reply.status == 200
    assert reply.headers["x-gateway-attempts"] == "3"
    tree = await request_tree(exporter)
    assert_well_formed(tree)
    server = tree.server
    records = fake.provider.records
    assert len(records) == 3
    attempts = tree.attempts
    assert [c.name for c in tree.children] == ["gateway.auth"] + ["chat fake-gpt"] * 3
    assert [attr(a, "gateway.attempt") for a in attempts] == [1, 2, 3]
    key_ids = [key_id_of(r) for r in records]
    assert [attr(a, "gateway.key_id") for a in attempts] == key_ids
    assert key_ids[2] != key_ids[1]  # the rate-limited key is cooling down

    # Attempts 1 and 2 failed before the first byte, each with its reason.
    for span, reason, status in zip(
        attempts[:2], ("upstream_503", "rate_limited"), (503, 429), strict=True
    ):
        assert span.kind is SpanKind.CLIENT
        assert span.status.status_code is StatusCode.ERROR
        assert attr(span, "error.type") == reason
        assert attr(span, "gateway.attempt.outcome") == reason
        assert attr(span, "gen_ai.provider.name") == "openai"
        assert event_names(span) == ["gen_ai.response_headers"]
        assert event(span, "gen_ai.response_headers").attributes["http.status_code"] == status
    served = attempts[2]
    assert served.status.status_code is StatusCode.UNSET
    assert attr(served, "gateway.attempt.outcome") == "ok"
    assert event_names(served) == [
        "gen_ai.response_headers",
        "gen_ai.first_byte",
        "gen_ai.first_token",
    ]
    # The attempts do not overlap: each starts after the previous one ended.
    for before, after in itertools.pairwise(attempts):
        assert before.end_time is not None and after.start_time is not None
        assert before.end_time <= after.start_time

    # Server events: the provider's backoff, the retry, the key cooldown, the retry.
    assert event_names(server) == [
        "gateway.provider_backoff",
        "gateway.retry",
        "gateway.key_cooldown",
        "gateway.retry",
    ]
    backoff = event(server, "gateway.provider_backoff").attributes
    assert backoff["gateway.provider"] == "oa"
    assert backoff["gateway.reason"] == "upstream_503"
    assert "gateway.key_id" not in backoff
    cooldown = event(server, "gateway.key_cooldown").attributes
    assert cooldown["gateway.key_id"] == key_ids[1]
    assert cooldown["gateway.key_fp"] == attr(attempts[1], "gateway.key_fp")
    assert cooldown["gateway.reason"] == "rate_limited"
    assert 29 <= cooldown["gateway.seconds"] <= 30
    retries = [e for e in server.events if e.name == "gateway.retry"]
    assert [e.attributes["gateway.attempt"] for e in retries] == [2, 3]
    assert [e.attributes["gateway.retry.reason"] for e in retries] == [
        "upstream_503",
        "rate_limited",
    ]
    for e in retries:
        assert 0 <= e.attributes["gateway.retry.backoff_ms"] <= 20  # max_delay_ms
    # Each retry event sits between the failed attempt's end and the next attempt's start.
    for e, failed, nxt in zip(retries, attempts[:-1], attempts[1:], strict=True):
        assert failed.end_time is not None and nxt.start_time is not None
        assert failed.end_time <= e.timestamp <= nxt.start_time

    s = attrs(server)
    assert s["gateway.attempts"] == 3
    assert s["gateway.key_id"] == key_ids[2]
    assert s["gateway.outcome"] == "ok"
    assert server.status.status_code is StatusCode.UNSET
    # Time lost to the failed attempts is its own part of the TTFT split.
    lost_ms = (seconds(attempts[2].start_time) - seconds(attempts[0].start_time)) * 1000
    assert s["gateway.ttft.retries_ms"] >= lost_ms * 0.9

    # Every upstream request carried its own attempt span as parent, in the caller's trace.
    for record, span in zip(records, attempts, strict=True):
        assert upstream_traceparent(record) == f"00-{CALLER_TRACE_ID}-{hex_span_id(span)}-01"


async def test_chunk_timeout_kill_span_tree(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    reply = await post(
        traced,
        chat_body(PROMPT_CANARIES[2]),
        auth(**{"x-fake-stall-after": "2", "x-fake-chunks": "5"}),
    )
    assert reply.status == 200
    events = sse_events(reply.body)
    assert len(events) == 1 + 2 + 1  # role, two tokens, the gateway's error event
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"
    tree = await request_tree(exporter)
    assert_well_formed(tree)
    server = tree.server
    (attempt,) = tree.attempts
    assert [c.name for c in tree.children] == ["gateway.auth", "chat fake-gpt"]

    assert attempt.status.status_code is StatusCode.ERROR
    a = attrs(attempt)
    assert a["error.type"] == "chunk_timeout"
    assert a["gateway.attempt.outcome"] == "chunk_timeout"
    assert a["gateway.events"] == 3
    assert "gen_ai.usage.output_tokens" not in a  # the stream never finished
    assert event_names(attempt) == [
        "gen_ai.response_headers",
        "gen_ai.first_byte",
        "gen_ai.first_token",
    ]

    assert server.status.status_code is StatusCode.ERROR
    s = attrs(server)
    assert s["error.type"] == "chunk_timeout"
    assert s["gateway.outcome"] == "chunk_timeout"
    assert s["http.response.status_code"] == 200
    assert event_names(server) == ["gateway.stream_chunk_timeout"]
    kill = event(server, "gateway.stream_chunk_timeout")
    assert dict(kill.attributes) == {"gateway.events": 3, "gateway.limit_s": 0.3}
    # The kill came chunk_s after the last event; the attempt span ended with the stream.
    first_token = event(attempt, "gen_ai.first_token").timestamp
    assert seconds(kill.timestamp) - seconds(first_token) >= 0.25
    assert attempt.end_time is not None and server.end_time is not None
    assert kill.timestamp <= attempt.end_time <= server.end_time
    await fake.provider.wait_until(lambda: fake.provider.records[0].disconnected, timeout=2)


async def test_client_cancel_span_tree(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            traced.url + CHAT,
            data=orjson.dumps(chat_body(PROMPT_CANARIES[3])),
            headers=auth(**{"x-fake-stall-after": "2", "x-fake-chunks": "5"}),
        )
        assert resp.status == 200
        seen = 0
        async for piece in resp.content.iter_any():
            seen += piece.count(b"\n\n")
            if seen >= 3:  # role + 2 tokens; then the upstream stalls and the client leaves
                break
        resp.close()
    tree = await request_tree(exporter)
    assert_well_formed(tree)
    server = tree.server
    (attempt,) = tree.attempts

    a = attrs(attempt)
    assert a["gateway.attempt.outcome"] == "client_cancel"
    assert a["error.type"] == "client_cancel"
    assert event_names(attempt) == [
        "gen_ai.response_headers",
        "gen_ai.first_byte",
        "gen_ai.first_token",
    ]
    s = attrs(server)
    assert s["gateway.outcome"] == "client_cancel"
    assert s["http.response.status_code"] == 200
    # The caller leaving is not the gateway's error.
    assert server.status.status_code is StatusCode.UNSET
    assert "error.type" not in s
    assert event_names(server) == ["gateway.client_cancel"]
    cancel = event(server, "gateway.client_cancel")
    assert attempt.end_time is not None and server.end_time is not None
    assert attempt.end_time <= cancel.timestamp <= server.end_time
    # The upstream read was cancelled too.
    await fake.provider.wait_until(lambda: fake.provider.records[0].disconnected, timeout=2)


# -- more events, context propagation, content capture ------------------------------------


async def test_key_disabled_event_and_rotation(
    gateway_factory: GatewayFactory,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    fake: Fake,
) -> None:
    gw = await gateway_factory(
        {
            **one_bad_key(fake.url),
        },
        tracer_provider=tracer_provider,
    )
    reply = await post(gw, {**chat_body(PROMPT_CANARIES[4]), "model": "one-bad-key"}, auth())
    assert reply.status == 200
    tree = await request_tree(exporter)
    assert_well_formed(tree)  # the revoked secret is nowhere either
    bad, good = tree.attempts
    assert attr(bad, "gateway.key_id") == "bad"
    assert attr(bad, "error.type") == "upstream_401"
    assert attr(good, "gateway.key_id") == "good"
    assert event_names(tree.server) == ["gateway.key_disabled", "gateway.retry"]
    disabled = event(tree.server, "gateway.key_disabled").attributes
    assert disabled["gateway.key_id"] == "bad"
    assert disabled["gateway.key_fp"] == attr(bad, "gateway.key_fp")
    assert disabled["gateway.provider"] == "revoked-one"
    assert disabled["gateway.reason"] == "upstream_401"
    assert disabled["gateway.seconds"] > 0
    retry = event(tree.server, "gateway.retry").attributes
    # A key fault rotates to the next key at once: no backoff.
    assert retry["gateway.retry.backoff_ms"] == 0
    assert retry["gateway.retry.reason"] == "upstream_401"


async def test_limits_span_and_reservation_reconciled_event(
    gateway_factory: GatewayFactory,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    gw = await gateway_factory(
        {"tiers": {"t": {"tokens_per_minute": 100_000}}, "auth": {"default_tier": "t"}},
        tracer_provider=tracer_provider,
    )
    body = chat_body(PROMPT_CANARIES[5], max_tokens=40)
    raw = orjson.dumps(body)
    reply = await post(gw, body, auth(**{"x-fake-chunks": "6"}))
    assert reply.status == 200
    tree = await request_tree(exporter)
    assert_well_formed(tree)
    assert [c.name for c in tree.children] == ["gateway.auth", "gateway.limits", "chat fake-gpt"]
    limits = tree.child("gateway.limits")
    reserved = math.ceil(len(raw) / 4) + 40
    assert attrs(limits) == {
        "gateway.limiter.backend": "memory",
        "gateway.limiter.allowed": True,
        "gateway.limiter.reserved_tokens": reserved,
    }
    # auth, then limits, then the attempt: one after the other.
    ordered = tree.children
    for before, after in itertools.pairwise(ordered):
        assert before.end_time is not None and after.start_time is not None
        assert before.end_time <= after.start_time
    assert attr(tree.server, "gateway.tier") == "t"
    used = estimate_prompt_tokens(body) + 6
    assert event_names(tree.server) == ["gateway.reservation_reconciled"]
    reconciled = event(tree.server, "gateway.reservation_reconciled").attributes
    assert dict(reconciled) == {"reserved_tokens": reserved, "used_tokens": used}


async def test_auth_failure_span_tree(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    reply = await post(
        traced,
        chat_body(PROMPT_CANARIES[6]),
        {"authorization": f"Bearer {UNKNOWN_CALLER_KEY}"},
    )
    assert reply.status == 401
    tree = await request_tree(exporter)
    assert_well_formed(tree)  # the presented key is in no attribute
    assert [c.name for c in tree.children] == ["gateway.auth"]
    auth_span = tree.child("gateway.auth")
    assert auth_span.status.status_code is StatusCode.ERROR
    assert attr(auth_span, "error.type") == "authentication_failed"
    s = attrs(tree.server)
    assert s["http.response.status_code"] == 401
    assert s["gateway.outcome"] == "authentication"
    assert "gateway.caller" not in s
    assert tree.server.status.status_code is StatusCode.UNSET  # the caller's fault
    assert fake.provider.records == []


async def test_new_trace_without_caller_traceparent(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    reply = await post(traced, chat_body(PROMPT_CANARIES[7]), auth())
    assert reply.status == 200
    tree = await request_tree(exporter)
    assert tree.server.parent is None  # a root span
    (attempt,) = tree.attempts
    (record,) = fake.provider.records
    version, trace_id, parent, flags = upstream_traceparent(record).split("-")
    assert (version, trace_id, parent) == ("00", hex_trace_id(tree.server), hex_span_id(attempt))
    assert int(flags, 16) & 0x01  # sampled (the SDK may add the W3C "random" flag, 0x02)


async def test_unsampled_caller_is_not_recorded_but_propagated(
    traced: Gateway, fake: Fake, exporter: InMemorySpanExporter
) -> None:
    """A caller that sampled its trace out keeps it out (parent-based), and the upstream still
    gets the caller's trace id with the not-sampled flag."""
    unsampled = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-00"
    reply = await post(traced, chat_body(PROMPT_CANARIES[8]), auth(traceparent=unsampled))
    assert reply.status == 200
    await asyncio.sleep(0.05)
    assert exporter.get_finished_spans() == ()
    (record,) = fake.provider.records
    version, trace_id, _parent, flags = upstream_traceparent(record).split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE_ID, "00")


async def test_capture_content_on_records_the_prompt(
    gateway_factory: GatewayFactory,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    gw = await gateway_factory(
        {"telemetry": {"capture_content": True}}, tracer_provider=tracer_provider
    )
    prompt = PROMPT_CANARIES[9]
    reply = await post(gw, chat_body(prompt), auth())
    assert reply.status == 200
    tree = await request_tree(exporter)
    captured = attr(tree.server, "gen_ai.input.messages")
    assert prompt in captured


async def test_overhead_header_matches_the_span_for_a_plain_request(
    traced: Gateway, exporter: InMemorySpanExporter
) -> None:
    reply = await post(traced, chat_body(PROMPT_CANARIES[10], stream=False), auth())
    assert reply.status == 200
    tree = await request_tree(exporter)
    header = reply.headers["x-gateway-overhead-ms"]
    overhead = attr(tree.server, "gateway.overhead_ms")
    assert float(header) >= 0
    assert header == f"{overhead:.3f}"
    (attempt,) = tree.attempts
    assert attr(attempt, "gen_ai.request.stream") is False
    assert attr(attempt, "gen_ai.usage.output_tokens") == 8  # the fake's default
