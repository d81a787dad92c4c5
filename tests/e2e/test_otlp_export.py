"""A real OTLP/HTTP export: the gateway's own exporter (configured by `telemetry.otlp_endpoint`)
posts protobuf to a receiver on loopback when the app shuts down; the request is decoded with
the OpenTelemetry protobuf definitions and checked span by span."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway import __version__
from tests.support import (
    CALLER_KEY,
    PROMPT_CANARIES,
    UPSTREAM_KEYS,
    Fake,
    base_config,
    deep_merge,
    sensitive_strings,
    start_gateway,
)

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
SERVICE = "gateway-under-test"


@dataclass
class Posted:
    path: str
    content_type: str
    body: bytes


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver on loopback, on a thread and event loop of its own: the
    gateway flushes its spans synchronously while shutting down, which blocks the test's
    loop, so a receiver there could never answer."""

    posted: list[Posted] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.posted.append(Posted(request.path, request.content_type, body))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        loop = self._loop
        self._thread = threading.Thread(
            target=loop.run_until_complete, args=(self._serve(),), name="otlp-receiver"
        )
        self._thread.start()
        assert self._ready.wait(5), "the receiver did not start"

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._loop.close()

    def requests(self) -> list[Posted]:
        with self._lock:
            return list(self.posted)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind is not None else None


def kv(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    item: KeyValue
    for item in items:
        out[item.key] = value(item.value)
    return out


async def test_spans_exported_over_otlp_http_on_shutdown(fake: Fake, receiver: Receiver) -> None:
    config = deep_merge(
        base_config(fake.url),
        {"telemetry": {"otlp_endpoint": receiver.url, "service_name": SERVICE}},
    )
    # Without a tracer provider: the gateway builds its own (OTLP exporter, batch processor).
    runner, gw = await start_gateway(config)
    try:
        body = {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": PROMPT_CANARIES[20]}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gw.url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={
                    "authorization": f"Bearer {CALLER_KEY}",
                    "traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01",
                    "x-fake-chunks": "3",
                },
            ) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        # The batch processor holds the spans (its delay is seconds): nothing sent yet is fine,
        # but the app's shutdown must flush them.
    finally:
        await runner.cleanup()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not receiver.requests() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    posted = receiver.requests()
    assert posted, "no OTLP export reached the receiver"
    assert {p.path for p in posted} == {"/v1/traces"}
    assert {p.content_type for p in posted} == {"application/x-protobuf"}

    spans: list[Span] = []
    resources: list[dict[str, Any]] = []
    scopes: set[str] = set()
    for p in posted:
        request = ExportTraceServiceRequest.FromString(p.body)
        for rs in request.resource_spans:
            resources.append(kv(rs.resource.attributes))
            for ss in rs.scope_spans:
                scopes.add(ss.scope.name)
                spans.extend(ss.spans)
    assert {r["service.name"] for r in resources} == {SERVICE}
    assert {r["service.version"] for r in resources} == {__version__}
    assert scopes == {"llm-gateway"}

    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["POST /v1/chat/completions", "chat fake-gpt", "gateway.auth"]
    assert len(spans) == 3
    server = by_name["POST /v1/chat/completions"]
    auth_span = by_name["gateway.auth"]
    attempt = by_name["chat fake-gpt"]
    assert server.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert auth_span.kind == Span.SpanKind.SPAN_KIND_INTERNAL
    assert attempt.kind == Span.SpanKind.SPAN_KIND_CLIENT

    # One trace, the caller's; the server span is the child of the caller's span.
    assert {s.trace_id.hex() for s in spans} == {CALLER_TRACE_ID}
    assert server.parent_span_id.hex() == CALLER_SPAN_ID
    assert auth_span.parent_span_id == server.span_id
    assert attempt.parent_span_id == server.span_id
    assert attempt.end_time_unix_nano <= server.end_time_unix_nano

    (record,) = fake.provider.records
    key_id = f"oa-{UPSTREAM_KEYS.index(record.api_key) + 1}"
    a = kv(attempt.attributes)
    expected_attempt = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-gpt",
        "gen_ai.request.stream": True,
        "gateway.deployment": "oa/fake-gpt",
        "gateway.key_id": key_id,
        "gateway.attempt": 1,
        "gateway.attempt.outcome": "ok",
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",),
    }
    assert {k: a.get(k) for k in expected_attempt} == expected_attempt
    assert "gen_ai.system" not in a
    assert [e.name for e in attempt.events] == [
        "gen_ai.response_headers",
        "gen_ai.first_byte",
        "gen_ai.first_token",
    ]
    s = kv(server.attributes)
    expected_server = {
        "gen_ai.request.model": "gpt-test",
        "gateway.caller": "test-app",
        "http.response.status_code": 200,
        "gateway.outcome": "ok",
        "gateway.attempts": 1,
        "gateway.key_id": key_id,
    }
    assert {k: s.get(k) for k in expected_server} == expected_server
    assert s["gen_ai.response.time_to_first_chunk"] > 0
    assert s["gateway.overhead_ms"] >= 0

    # The upstream was told about the attempt span, in the same trace.
    upstream = {k.lower(): v for k, v in record.headers.items()}
    assert upstream["traceparent"] == f"00-{CALLER_TRACE_ID}-{attempt.span_id.hex()}-01"

    # Nothing secret and no prompt text left the process.
    for p in posted:
        for secret in sensitive_strings():
            assert secret.encode() not in p.body, f"{secret!r} was exported"
