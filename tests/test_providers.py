"""Tests for gateway.providers: upstream request building (model, output cap, headers) and the
stream observers, checked against every recorded stream with an independent oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import __version__
from gateway.config import Runtime, build_runtime, load_config_text
from gateway.config.runtime import ProviderSpec
from gateway.providers import ENDPOINTS, build_upstream_request
from gateway.providers.anthropic import MessagesObserver
from gateway.providers.anthropic import usage_from_body as anthropic_usage_from_body
from gateway.providers.base import (
    Endpoint,
    ParsedRequest,
    StreamFacts,
    StreamObserver,
    UpstreamRequest,
    Usage,
)
from gateway.providers.openai import ChatObserver, ResponsesObserver
from gateway.providers.openai import usage_from_body as openai_usage_from_body
from gateway.sse import SSEEvent

RECORDINGS = Path(__file__).parent / "data" / "recorded-streams"

OA_SECRET = "sk-upstream-openai-secret-0001"
VLLM_SECRET = "sk-upstream-vllm-secret-0002"
AN_SECRET = "sk-ant-upstream-secret-0003"

CONFIG = dedent(
    f"""\
    providers:
      oa:
        api: openai
        base_url: http://openai.upstream.test/v1/
        keys:
          - {{id: oa-1, secret: {OA_SECRET}}}
        forward_headers: ["X-Request-Priority", "x-fake-*", "x-team"]
        headers: {{OpenAI-Organization: org-9, x-team: platform}}
      vllm:
        api: openai
        base_url: http://vllm.upstream.test/v1
        keys:
          - {{id: vllm-1, secret: {VLLM_SECRET}}}
        chat_max_tokens_field: max_tokens
      an:
        api: anthropic
        base_url: http://anthropic.upstream.test
        keys:
          - {{id: an-1, secret: {AN_SECRET}}}
        forward_headers: ["x-trace-*"]
      an-old:
        api: anthropic
        base_url: http://anthropic-old.upstream.test
        keys:
          - {{id: an-old-1, secret: sk-ant-old-0004}}
        anthropic_version: "2022-11-30"
    models:
      gpt:
        - {{provider: oa, model: gpt-upstream}}
      llama:
        - {{provider: vllm, model: llama-upstream}}
      claude:
        - {{provider: an, model: claude-upstream}}
      claude-old:
        - {{provider: an-old, model: claude-old-upstream}}
    """
)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return build_runtime(load_config_text(CONFIG, env={}))


def endpoint(path: str) -> Endpoint:
    return next(e for e in ENDPOINTS if e.path == path)


def parsed(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> ParsedRequest:
    return ParsedRequest(
        endpoint=endpoint(path),
        body=body,
        model=body["model"],
        stream=bool(body.get("stream")),
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
    )


def build(
    request: ParsedRequest,
    provider: ProviderSpec,
    cap: int | None = None,
    model: str = "upstream-model",
    secret: str = "sk-the-secret",
) -> tuple[UpstreamRequest, dict[str, Any]]:
    upstream = build_upstream_request(request, provider, model, cap, secret)
    return upstream, json.loads(upstream.body)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": "hi"}], **extra}


# --- endpoints ---------------------------------------------------------------------------------


def test_endpoint_table() -> None:
    table = {e.path: (e.family.value, e.upstream_path, e.cap_fields, e.fill_cap) for e in ENDPOINTS}
    assert table == {
        CHAT: ("openai", "/chat/completions", ("max_completion_tokens", "max_tokens"), True),
        COMPLETIONS: ("openai", "/completions", ("max_tokens",), False),
        RESPONSES: ("openai", "/responses", ("max_output_tokens",), True),
        EMBEDDINGS: ("openai", "/embeddings", (), False),
        MESSAGES: ("anthropic", "/v1/messages", ("max_tokens",), True),
        COUNT_TOKENS: ("anthropic", "/v1/messages/count_tokens", (), False),
    }
    assert [e.path for e in ENDPOINTS if e.is_responses] == [RESPONSES]
    assert {e.path for e in ENDPOINTS if e.streams} == {CHAT, COMPLETIONS, RESPONSES, MESSAGES}


@pytest.mark.parametrize(
    ("path", "provider", "url"),
    [
        (CHAT, "oa", "http://openai.upstream.test/v1/chat/completions"),
        (COMPLETIONS, "oa", "http://openai.upstream.test/v1/completions"),
        (RESPONSES, "vllm", "http://vllm.upstream.test/v1/responses"),
        (EMBEDDINGS, "oa", "http://openai.upstream.test/v1/embeddings"),
        (MESSAGES, "an", "http://anthropic.upstream.test/v1/messages"),
        (COUNT_TOKENS, "an", "http://anthropic.upstream.test/v1/messages/count_tokens"),
    ],
)
def test_url_and_model_rewrite(runtime: Runtime, path: str, provider: str, url: str) -> None:
    request = parsed(path, {"model": "alias", "input": "x", "max_tokens": 3})
    upstream, body = build(request, runtime.providers[provider], model="the-upstream-name")
    assert upstream.url == url
    assert body["model"] == "the-upstream-name"
    assert request.body["model"] == "alias"


def test_original_parsed_body_is_never_mutated(runtime: Runtime) -> None:
    original = chat_body(max_tokens=99999, stream=True, metadata={"a": [1, 2]})
    snapshot = copy.deepcopy(original)
    request = parsed(CHAT, original, {"x-fake-delay": "1"})
    first, first_body = build(request, runtime.providers["oa"], cap=100, secret="sk-a")
    _, second_body = build(request, runtime.providers["vllm"], cap=50, secret="sk-b")
    assert request.body == snapshot
    assert request.body is original
    assert first_body["max_tokens"] == 100
    assert second_body["max_tokens"] == 50
    assert first_body["messages"] == snapshot["messages"]
    # every attempt is built afresh: an earlier attempt leaves nothing in a later one
    third, third_body = build(request, runtime.providers["oa"], cap=100, secret="sk-a")
    assert (third.url, dict(third.headers), third_body) == (
        first.url,
        dict(first.headers),
        first_body,
    )


def test_body_keeps_every_other_field(runtime: Runtime) -> None:
    original = chat_body(
        temperature=0.5, stream=True, stream_options={"include_usage": True}, tools=[{"x": 1}]
    )
    _, body = build(parsed(CHAT, original), runtime.providers["oa"], model="m2")
    assert body == {**original, "model": "m2"}


# --- output cap ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_chat_cap_clamps_a_larger_value(runtime: Runtime, field: str) -> None:
    _, body = build(parsed(CHAT, chat_body(**{field: 5000})), runtime.providers["oa"], cap=1000)
    assert body[field] == 1000
    other = {"max_completion_tokens", "max_tokens"} - {field}
    assert not other & set(body)  # the other field is not added


def test_chat_cap_clamps_each_field_independently(runtime: Runtime) -> None:
    request = parsed(CHAT, chat_body(max_completion_tokens=5000, max_tokens=700))
    _, body = build(request, runtime.providers["oa"], cap=1000)
    assert (body["max_completion_tokens"], body["max_tokens"]) == (1000, 700)


@pytest.mark.parametrize("value", [1, 999, 1000])
def test_chat_cap_leaves_smaller_or_equal_values(runtime: Runtime, value: int) -> None:
    request = parsed(CHAT, chat_body(max_completion_tokens=value))
    _, body = build(request, runtime.providers["oa"], cap=1000)
    assert body["max_completion_tokens"] == value
    assert "max_tokens" not in body


def test_chat_cap_filled_as_max_completion_tokens_by_default(runtime: Runtime) -> None:
    _, body = build(parsed(CHAT, chat_body()), runtime.providers["oa"], cap=1000)
    assert body["max_completion_tokens"] == 1000
    assert "max_tokens" not in body


def test_chat_cap_filled_as_the_providers_configured_field(runtime: Runtime) -> None:
    _, body = build(parsed(CHAT, chat_body()), runtime.providers["vllm"], cap=1000)
    assert body["max_tokens"] == 1000
    assert "max_completion_tokens" not in body


def test_chat_cap_with_legacy_field_present_is_not_filled_again(runtime: Runtime) -> None:
    _, body = build(parsed(CHAT, chat_body(max_tokens=10)), runtime.providers["oa"], cap=1000)
    assert body["max_tokens"] == 10
    assert "max_completion_tokens" not in body


def test_legacy_completions_cap_is_never_filled(runtime: Runtime) -> None:
    request = parsed(COMPLETIONS, {"model": "gpt", "prompt": "once upon"})
    _, body = build(request, runtime.providers["oa"], cap=1000)
    assert "max_tokens" not in body
    assert "max_completion_tokens" not in body


def test_legacy_completions_cap_clamps(runtime: Runtime) -> None:
    request = parsed(COMPLETIONS, {"model": "gpt", "prompt": "x", "max_tokens": 4000})
    _, body = build(request, runtime.providers["oa"], cap=1000)
    assert body["max_tokens"] == 1000


def test_responses_cap_filled_and_clamped(runtime: Runtime) -> None:
    request = parsed(RESPONSES, {"model": "gpt", "input": "x"})
    _, filled = build(request, runtime.providers["oa"], 64)
    assert filled["max_output_tokens"] == 64
    assert "max_tokens" not in filled
    request = parsed(RESPONSES, {"model": "gpt", "input": "x", "max_output_tokens": 65})
    _, clamped = build(request, runtime.providers["oa"], 64)
    assert clamped["max_output_tokens"] == 64
    request = parsed(RESPONSES, {"model": "gpt", "input": "x", "max_output_tokens": 63})
    _, kept = build(request, runtime.providers["oa"], 64)
    assert kept["max_output_tokens"] == 63


def test_anthropic_cap_filled_and_clamped(runtime: Runtime) -> None:
    messages = [{"role": "user", "content": "hi"}]
    request = parsed(MESSAGES, {"model": "claude", "messages": messages})
    _, filled = build(request, runtime.providers["an"], 2048)
    assert filled["max_tokens"] == 2048
    request = parsed(MESSAGES, {"model": "claude", "messages": messages, "max_tokens": 8192})
    _, clamped = build(request, runtime.providers["an"], 2048)
    assert clamped["max_tokens"] == 2048
    request = parsed(MESSAGES, {"model": "claude", "messages": messages, "max_tokens": 100})
    _, kept = build(request, runtime.providers["an"], 2048)
    assert kept["max_tokens"] == 100


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, chat_body(max_tokens=123456, max_completion_tokens=654321)),
        (CHAT, chat_body()),
        (COMPLETIONS, {"model": "gpt", "prompt": "x", "max_tokens": 99999}),
        (RESPONSES, {"model": "gpt", "input": "x", "max_output_tokens": 99999}),
        (RESPONSES, {"model": "gpt", "input": "x"}),
        (MESSAGES, {"model": "claude", "messages": [], "max_tokens": 99999}),
    ],
)
def test_no_cap_leaves_the_body_untouched(
    runtime: Runtime, path: str, body: dict[str, Any]
) -> None:
    provider = runtime.providers["an" if path == MESSAGES else "oa"]
    _, built = build(parsed(path, body), provider, cap=None, model=body["model"])
    assert built == body


@pytest.mark.parametrize(
    ("path", "provider"), [(EMBEDDINGS, "oa"), (COUNT_TOKENS, "an")], ids=["embeddings", "count"]
)
def test_endpoints_without_cap_fields_ignore_the_cap(
    runtime: Runtime, path: str, provider: str
) -> None:
    body = {"model": "m", "input": "x", "max_tokens": 99999}
    _, built = build(parsed(path, body), runtime.providers[provider], cap=10, model="m")
    assert built == body


def test_non_integer_cap_values_are_never_forwarded_above_the_cap(runtime: Runtime) -> None:
    # The edge refuses them with a 400 (tests/test_edge.py); should one get here anyway, the
    # cap is what goes upstream, never a value that might mean more.
    request = parsed(CHAT, chat_body(max_tokens=True, max_completion_tokens="5000"))
    _, body = build(request, runtime.providers["oa"], cap=10)
    assert body["max_tokens"] == 10
    assert body["max_completion_tokens"] == 10


def test_null_cap_field_does_not_bypass_the_cap(runtime: Runtime) -> None:
    request = parsed(CHAT, chat_body(max_completion_tokens=None))
    _, body = build(request, runtime.providers["oa"], cap=1000)
    assert body["max_completion_tokens"] == 1000


# --- headers -----------------------------------------------------------------------------------

CALLER_CREDENTIALS = {"Authorization": "Bearer gw-caller-key", "X-Api-Key": "gw-caller-key"}


def test_openai_headers(runtime: Runtime) -> None:
    request = parsed(CHAT, chat_body(), CALLER_CREDENTIALS)
    upstream, _ = build(request, runtime.providers["vllm"], secret=VLLM_SECRET)
    assert dict(upstream.headers) == {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": f"llm-stream-gateway/{__version__}",
        "authorization": f"Bearer {VLLM_SECRET}",
    }


def test_anthropic_headers_default_version(runtime: Runtime) -> None:
    request = parsed(MESSAGES, {"model": "claude", "messages": []}, CALLER_CREDENTIALS)
    upstream, _ = build(request, runtime.providers["an"], secret=AN_SECRET)
    assert dict(upstream.headers) == {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": f"llm-stream-gateway/{__version__}",
        "x-api-key": AN_SECRET,
        "anthropic-version": "2023-06-01",
    }


def test_anthropic_provider_default_version_is_configurable(runtime: Runtime) -> None:
    request = parsed(MESSAGES, {"model": "claude-old", "messages": []})
    upstream, _ = build(request, runtime.providers["an-old"])
    assert upstream.headers["anthropic-version"] == "2022-11-30"


def test_anthropic_version_and_beta_passed_through(runtime: Runtime) -> None:
    headers = {
        "Anthropic-Version": "2099-01-01",
        "anthropic-beta": "prompt-caching-2024-07-31,tools-2024-05-16",
    }
    request = parsed(MESSAGES, {"model": "claude", "messages": []}, headers)
    upstream, _ = build(request, runtime.providers["an"], secret=AN_SECRET)
    assert upstream.headers["anthropic-version"] == "2099-01-01"
    assert upstream.headers["anthropic-beta"] == "prompt-caching-2024-07-31,tools-2024-05-16"
    assert upstream.headers["x-api-key"] == AN_SECRET


def test_anthropic_headers_never_sent_to_openai(runtime: Runtime) -> None:
    headers = {"anthropic-version": "2099-01-01", "anthropic-beta": "x"}
    upstream, _ = build(parsed(CHAT, chat_body(), headers), runtime.providers["vllm"])
    assert "anthropic-version" not in upstream.headers
    assert "anthropic-beta" not in upstream.headers


@pytest.mark.parametrize(
    ("path", "provider"), [(CHAT, "oa"), (RESPONSES, "vllm"), (MESSAGES, "an")]
)
def test_caller_credentials_never_forwarded(runtime: Runtime, path: str, provider: str) -> None:
    body = {"model": "m", "messages": []}
    upstream, _ = build(parsed(path, body, CALLER_CREDENTIALS), runtime.providers[provider])
    values = " ".join(upstream.headers.values())
    assert "gw-caller-key" not in values
    if provider == "an":
        assert upstream.headers["x-api-key"] == "sk-the-secret"
        assert "authorization" not in upstream.headers
    else:
        assert upstream.headers["authorization"] == "Bearer sk-the-secret"
        assert "x-api-key" not in upstream.headers


def test_forward_headers_exact_and_prefix(runtime: Runtime) -> None:
    caller_headers = {
        **CALLER_CREDENTIALS,
        "X-Request-Priority": "high",
        "X-Fake-Delay": "3",
        "x-fake-status": "500",
        "x-fake": "no dash: not under the x-fake- prefix",
        "X-Request-Priority-Extra": "not exact",
        "x-other": "nope",
        "cookie": "c=1",
        "host": "gateway.example",
        "content-length": "5",
    }
    upstream, _ = build(parsed(CHAT, chat_body(), caller_headers), runtime.providers["oa"])
    assert dict(upstream.headers) == {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": f"llm-stream-gateway/{__version__}",
        "x-request-priority": "high",
        "x-fake-delay": "3",
        "x-fake-status": "500",
        "openai-organization": "org-9",
        "x-team": "platform",
        "authorization": "Bearer sk-the-secret",
    }


def test_static_headers_win_over_forwarded_ones(runtime: Runtime) -> None:
    request = parsed(CHAT, chat_body(), {"X-Team": "caller-chosen"})
    upstream, _ = build(request, runtime.providers["oa"])
    assert upstream.headers["x-team"] == "platform"


def test_anthropic_forward_prefix(runtime: Runtime) -> None:
    headers = {"X-Trace-Id": "t-1", "x-trace-span": "s-2", "x-request-priority": "high"}
    request = parsed(MESSAGES, {"model": "claude", "messages": []}, headers)
    upstream, _ = build(request, runtime.providers["an"])
    assert upstream.headers["x-trace-id"] == "t-1"
    assert upstream.headers["x-trace-span"] == "s-2"
    assert "x-request-priority" not in upstream.headers  # only forwarded for provider oa


def test_no_forwarding_configured_forwards_nothing(runtime: Runtime) -> None:
    headers = {"x-fake-delay": "1", "x-request-priority": "high", "x-trace-id": "t"}
    upstream, _ = build(parsed(CHAT, chat_body(), headers), runtime.providers["vllm"])
    assert not {"x-fake-delay", "x-request-priority", "x-trace-id"} & set(upstream.headers)


def test_body_is_compact_json(runtime: Runtime) -> None:
    upstream, body = build(parsed(CHAT, chat_body()), runtime.providers["oa"])
    assert upstream.body == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --- observers over the recorded streams --------------------------------------------------------

CHAT_CONTENT_KEYS = (
    "content",
    "tool_calls",
    "function_call",
    "reasoning_content",
    "reasoning",
    "refusal",
)
TERMINAL = ("response.completed", "response.failed", "response.incomplete")


def recording(name: str) -> list[bytes]:
    """The recording's lines, byte for byte (without the trailing newline)."""
    raw = (RECORDINGS / name).read_bytes()
    assert raw.endswith(b"\n")
    return raw[:-1].split(b"\n")


def files(api: str) -> list[str]:
    return sorted(f"{api}/{p.name}" for p in (RECORDINGS / api).glob("*.chunks.jsonl"))


CHAT_FILES = files("openai-chat")
ANTHROPIC_FILES = files("anthropic-messages")
RESPONSES_FILES = files("openai-responses")


def test_every_recording_is_covered() -> None:
    manifest = json.loads((RECORDINGS / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(entry["file"] for entry in manifest) == sorted(
        CHAT_FILES + ANTHROPIC_FILES + RESPONSES_FILES
    )
    assert len(manifest) == 26
    for entry in manifest:
        assert len(recording(entry["file"])) == entry["events"]


def chat_events(lines: list[bytes], done: bool = True) -> list[SSEEvent]:
    events = [SSEEvent(event="", data=line, id=None, retry=None) for line in lines]
    if done:
        events.append(SSEEvent(event="", data=b"[DONE]", id=None, retry=None))
    return events


def typed_events(lines: list[bytes], named: bool = True) -> list[SSEEvent]:
    return [
        SSEEvent(event=json.loads(line)["type"] if named else "", data=line, id=None, retry=None)
        for line in lines
    ]


def observe(observer: StreamObserver, events: list[SSEEvent]) -> StreamFacts:
    for index, event in enumerate(events):
        observer.on_event(event, 1000.0 + index)
    observer.on_end()
    facts = observer.facts
    assert facts.events == len(events)
    if facts.first_token_event is None:
        assert facts.first_token_at is None
    else:  # the clock value passed with that very event
        assert facts.first_token_at == 1000.0 + facts.first_token_event
    return facts


def summary(facts: StreamFacts, with_cache: bool = True) -> dict[str, Any]:
    usage = facts.usage
    return {
        "events": facts.events,
        "first_token_event": facts.first_token_event,
        "finish_reason": facts.finish_reason,
        "usage": None
        if usage is None
        else (
            (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens)
            if with_cache
            else (usage.input_tokens, usage.output_tokens)
        ),
        "response_id": facts.response_id,
        "response_model": facts.response_model,
        "done": facts.done,
    }


# The oracles: straightforward readings of the recordings, written from the protocol
# definitions, sharing no code with the observers.


def chat_oracle(lines: list[bytes], *, text_completion: bool = False) -> dict[str, Any]:
    objs = [json.loads(line) for line in lines]
    first = None
    finish = None
    usage = None
    response_id = response_model = None
    for index, obj in enumerate(objs):
        if response_id is None and obj.get("id"):
            response_id, response_model = obj["id"], obj.get("model")
        for choice in obj.get("choices") or []:
            if text_completion:
                has_content = bool(choice.get("text"))
            else:
                delta = choice.get("delta") or {}
                has_content = any(delta.get(k) for k in CHAT_CONTENT_KEYS)
            if first is None and has_content:
                first = index
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
        raw_usage = obj.get("usage")
        if isinstance(raw_usage, dict):
            details = raw_usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens", raw_usage.get("prompt_cache_hit_tokens"))
            usage = (raw_usage.get("prompt_tokens"), raw_usage.get("completion_tokens"), cached)
    return {
        "events": len(lines) + 1,  # + [DONE]
        "first_token_event": first,
        "finish_reason": finish,
        "usage": usage,
        "response_id": response_id,
        "response_model": response_model,
        "done": True,
    }


def anthropic_oracle(lines: list[bytes]) -> dict[str, Any]:
    objs = [json.loads(line) for line in lines]
    first = next((i for i, o in enumerate(objs) if o["type"] == "content_block_delta"), None)
    finish = None
    usage: dict[str, int] = {}
    response_id = response_model = None
    for obj in objs:
        if obj["type"] == "message_start":
            if response_id is None:
                response_id = obj["message"]["id"]
                response_model = obj["message"]["model"]
            raw_usage = obj["message"].get("usage") or {}
        elif obj["type"] == "message_delta":
            if obj["delta"].get("stop_reason") is not None:
                finish = obj["delta"]["stop_reason"]
            raw_usage = obj.get("usage") or {}
        else:
            continue
        # later values override earlier ones, field by field
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
            if raw_usage.get(name) is not None:
                usage[name] = raw_usage[name]
    return {
        "events": len(lines),
        "first_token_event": first,
        "finish_reason": finish,
        "usage": (
            usage.get("input_tokens"),
            usage.get("output_tokens"),
            usage.get("cache_read_input_tokens"),
        )
        if usage
        else None,
        "response_id": response_id,
        "response_model": response_model,
        "done": any(o["type"] == "message_stop" for o in objs),
    }


def responses_oracle(lines: list[bytes]) -> dict[str, Any]:
    objs = [json.loads(line) for line in lines]
    first = next((i for i, o in enumerate(objs) if o["type"].endswith(".delta")), None)
    created = [o for o in objs if o["type"] == "response.created"]
    terminal = [o for o in objs if o["type"] in TERMINAL]
    finish = usage = None
    response_id = created[-1]["response"]["id"] if created else None
    if terminal:
        response = terminal[-1]["response"]
        details = response.get("incomplete_details") or {}
        finish = details.get("reason") or response["status"]
        if response.get("usage"):
            usage = (response["usage"]["input_tokens"], response["usage"]["output_tokens"])
        response_id = response["id"]
    return {
        "events": len(lines),
        "first_token_event": first,
        "finish_reason": finish,
        "usage": usage,
        "response_id": response_id,
        "response_model": created[-1]["response"]["model"] if created else None,
        "done": bool(terminal),
    }


def responses_error_oracle(lines: list[bytes]) -> str | None:
    objs = [json.loads(line) for line in lines]
    for obj in objs:
        if obj["type"] == "error":
            nested = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            code: str | None = obj.get("code") or nested.get("code") or nested.get("type")
            return code
    for obj in objs:
        if obj["type"] in TERMINAL and obj["response"].get("error"):
            terminal_code: str = obj["response"]["error"]["code"]
            return terminal_code
    return None


def responses_parts() -> list[tuple[str, int]]:
    """(file, part): a file holding several responses is split at each response.created,
    each part being one HTTP response, as the recordings' README says."""
    out: list[tuple[str, int]] = []
    for name in RESPONSES_FILES:
        starts = [
            i for i, line in enumerate(recording(name)) if b'"type":"response.created"' in line
        ]
        assert starts[0] == 0
        out.extend((name, part) for part in range(len(starts)))
    return out


def responses_part(name: str, part: int) -> list[bytes]:
    lines = recording(name)
    starts = [i for i, line in enumerate(lines) if json.loads(line)["type"] == "response.created"]
    bounds = [*starts, len(lines)]
    return lines[bounds[part] : bounds[part + 1]]


@pytest.mark.parametrize("name", CHAT_FILES)
def test_chat_observer_matches_oracle(name: str) -> None:
    lines = recording(name)
    facts = observe(ChatObserver(), chat_events(lines))
    assert summary(facts) == chat_oracle(lines)
    assert facts.error_type is None


@pytest.mark.parametrize("name", ANTHROPIC_FILES)
def test_messages_observer_matches_oracle(name: str) -> None:
    lines = recording(name)
    facts = observe(MessagesObserver(), typed_events(lines))
    assert summary(facts) == anthropic_oracle(lines)
    assert facts.error_type is None


@pytest.mark.parametrize("name", ANTHROPIC_FILES)
def test_messages_observer_without_event_names(name: str) -> None:
    # A server that omits `event:`: the payload's type says the same.
    lines = recording(name)
    facts = observe(MessagesObserver(), typed_events(lines, named=False))
    assert summary(facts) == anthropic_oracle(lines)


@pytest.mark.parametrize(("name", "part"), responses_parts())
def test_responses_observer_matches_oracle(name: str, part: int) -> None:
    lines = responses_part(name, part)
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert summary(facts, with_cache=False) == responses_oracle(lines)


@pytest.mark.parametrize(("name", "part"), responses_parts())
def test_responses_observer_without_event_names(name: str, part: int) -> None:
    lines = responses_part(name, part)
    facts = observe(ResponsesObserver(), typed_events(lines, named=False))
    assert summary(facts, with_cache=False) == responses_oracle(lines)


def responses_error_params() -> list[Any]:
    return [pytest.param(name, part, id=f"{name}-{part}") for name, part in responses_parts()]


@pytest.mark.parametrize(("name", "part"), responses_error_params())
def test_responses_observer_error_type_matches_oracle(name: str, part: int) -> None:
    lines = responses_part(name, part)
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert facts.error_type == responses_error_oracle(lines)


def test_recordings_split_into_the_expected_number_of_responses() -> None:
    parts = responses_parts()
    assert len(parts) == len(RESPONSES_FILES) + 3
    assert [p for n, p in parts if "encrypted-content" in n] == [0, 1, 2, 3]


# --- hand-checked spot values --------------------------------------------------------------------


def test_spot_anthropic_text() -> None:
    lines = recording("anthropic-messages/anthropic-text.chunks.jsonl")
    facts = observe(MessagesObserver(), typed_events(lines))
    assert facts.usage == Usage(input_tokens=12, output_tokens=30, cache_read_input_tokens=0)
    assert facts.finish_reason == "end_turn"
    assert facts.first_token_event == 3  # message_start, content_block_start, ping, delta
    assert facts.response_id == "msg_01QC4g3HwBThD4BaNtBckFDJ"
    assert facts.response_model == "claude-sonnet-4-5-20250929"
    assert facts.done is True


def test_spot_anthropic_message_delta_input_tokens_override() -> None:
    lines = recording("anthropic-messages/anthropic-message-delta-input-tokens.chunks.jsonl")
    facts = observe(MessagesObserver(), typed_events(lines))
    assert facts.usage == Usage(input_tokens=61, output_tokens=2)  # not message_start's 43


def test_spot_anthropic_duplicate_message_start_and_refusal() -> None:
    dup = observe(
        MessagesObserver(),
        typed_events(recording("anthropic-messages/duplicate-message-start.chunks.jsonl")),
    )
    assert (dup.response_id, dup.usage, dup.first_token_event) == (
        "msg_dup",
        Usage(input_tokens=17, output_tokens=227),
        3,
    )
    refusal = observe(
        MessagesObserver(),
        typed_events(recording("anthropic-messages/anthropic-refusal.chunks.jsonl")),
    )
    assert refusal.first_token_event is None
    assert refusal.finish_reason == "refusal"
    assert refusal.usage == Usage(input_tokens=18, output_tokens=5, cache_read_input_tokens=0)
    assert refusal.done is True


def test_spot_openai_text() -> None:
    facts = observe(ChatObserver(), chat_events(recording("openai-chat/openai-text.chunks.jsonl")))
    assert facts.finish_reason == "stop"
    assert facts.usage == Usage(input_tokens=16, output_tokens=300, cache_read_input_tokens=0)
    assert facts.first_token_event == 1
    assert facts.response_id == "chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0"
    assert facts.events == 304
    assert facts.done is True


def test_spot_chat_providers() -> None:
    azure = observe(
        ChatObserver(), chat_events(recording("openai-chat/azure-model-router.1.chunks.jsonl"))
    )
    # chunk 0 carries only prompt_filter_results and an empty id; chunk 1 has content ""
    assert azure.first_token_event == 2
    assert azure.response_id == "chatcmpl-CYPS1lijGoK8gd9lYzY3r9Sx50nbt"
    assert azure.response_model == "gpt-5-nano-2025-08-07"
    assert azure.usage == Usage(input_tokens=15, output_tokens=78, cache_read_input_tokens=0)
    deepseek = observe(
        ChatObserver(), chat_events(recording("openai-chat/deepseek-tool-call.chunks.jsonl"))
    )
    # chunk 0 has reasoning_content "" (no content yet)
    assert deepseek.first_token_event == 1
    assert deepseek.finish_reason == "tool_calls"
    assert deepseek.usage == Usage(input_tokens=374, output_tokens=61, cache_read_input_tokens=256)
    groq = observe(
        ChatObserver(), chat_events(recording("openai-chat/groq-tool-call.chunks.jsonl"))
    )
    assert (groq.first_token_event, groq.finish_reason, groq.usage) == (
        1,
        "tool_calls",
        Usage(input_tokens=210, output_tokens=15),
    )


def test_spot_responses() -> None:
    lines = recording("openai-responses/issue-20047-openai-responses.chunks.jsonl")
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert facts.first_token_event == 4
    assert facts.finish_reason == "completed"
    assert facts.usage is not None
    assert (facts.usage.input_tokens, facts.usage.output_tokens) == (12, 2)
    assert facts.response_id == "resp_sanitized_streaming"
    assert facts.done is True
    lines = recording("openai-responses/openai-response-failed-only.1.chunks.jsonl")
    failed = observe(ResponsesObserver(), typed_events(lines))
    assert failed.finish_reason == "failed"
    assert failed.error_type == "rate_limit_exceeded"
    assert failed.error_message is not None
    assert failed.error_message.startswith("Request too large for gpt-4o-mini")
    assert failed.usage is None
    assert failed.first_token_event is None
    assert failed.done is True


def test_responses_cached_tokens_are_read() -> None:
    lines = recording("openai-responses/openai-web-search-tool.1.chunks.jsonl")
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert facts.usage == Usage(
        input_tokens=60093, output_tokens=4080, cache_read_input_tokens=34560
    )


def test_responses_recorded_error_event() -> None:
    lines = recording("openai-responses/openai-error.1.chunks.jsonl")
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert facts.error_type == "insufficient_quota"
    assert facts.error_message is not None
    assert facts.error_message.startswith("You exceeded your current quota")


# --- synthetic streams ---------------------------------------------------------------------------


def test_chat_chunks_with_spaces_after_colons_are_read_at_the_end() -> None:
    lines = [
        b'{"id": "chatcmpl-sp", "model": "m-sp", "choices": [{"index": 0, "delta": '
        b'{"role": "assistant", "content": ""}, "finish_reason": null}], "usage": null}',
        b'{"id": "chatcmpl-sp", "model": "m-sp", "choices": [{"index": 0, "delta": '
        b'{"content": "Hi"}, "finish_reason": null}], "usage": null}',
        b'{"id": "chatcmpl-sp", "model": "m-sp", "choices": [{"index": 0, "delta": '
        b'{"content": " there"}, "finish_reason": null}], "usage": null}',
        b'{"id": "chatcmpl-sp", "model": "m-sp", "choices": [{"index": 0, "delta": {}, '
        b'"finish_reason": "stop"}], "usage": null}',
        b'{"id": "chatcmpl-sp", "model": "m-sp", "choices": [], "usage": '
        b'{"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}',
    ]
    facts = observe(ChatObserver(), chat_events(lines))
    assert summary(facts) == chat_oracle(lines)
    assert facts.finish_reason == "stop"
    assert facts.usage == Usage(input_tokens=9, output_tokens=2)
    assert facts.first_token_event == 1


def test_chat_spaced_usage_on_the_finish_chunk_without_done() -> None:
    lines = [
        b'{"id": "c1", "choices": [{"index": 0, "delta": {"content": "a"}, '
        b'"finish_reason": null}]}',
        b'{"id": "c1", "choices": [{"index": 0, "delta": {"content": "b"}, '
        b'"finish_reason": null}]}',
        b'{"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], '
        b'"usage": {"prompt_tokens": 3, "completion_tokens": 2, '
        b'"prompt_tokens_details": {"cached_tokens": 1}}}',
    ]
    facts = observe(ChatObserver(), chat_events(lines, done=False))
    assert facts.finish_reason == "length"
    assert facts.usage == Usage(input_tokens=3, output_tokens=2, cache_read_input_tokens=1)
    assert facts.done is False


def test_chat_last_finish_reason_wins_and_usage_chunk_after_it() -> None:
    lines = [
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null},'
        b'{"index":1,"delta":{"content":"b"},"finish_reason":null}]}',
        b'{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        b'{"id":"c","choices":[{"index":1,"delta":{},"finish_reason":"length"}]}',
        b'{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    ]
    facts = observe(ChatObserver(), chat_events(lines))
    assert summary(facts) == chat_oracle(lines)
    assert facts.finish_reason == "length"


@pytest.mark.parametrize("key", CHAT_CONTENT_KEYS)
def test_chat_first_token_for_each_content_kind(key: str) -> None:
    value: Any = [{"index": 0, "function": {"arguments": "{"}}] if key == "tool_calls" else "x"
    if key == "function_call":
        value = {"name": "f", "arguments": ""}
    empty_value: Any = [] if key == "tool_calls" else ""
    lines = [
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {key: empty_value}}]}),
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {key: None}}]}),
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {key: value}}]}),
        json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "later"}}]}),
    ]
    facts = observe(ChatObserver(), chat_events([line.encode() for line in lines]))
    assert facts.first_token_event == 3


def test_chat_mid_stream_error_chunk() -> None:
    lines = [
        b'{"id":"c","choices":[{"index":0,"delta":{"content":"partial"},"finish_reason":null}]}',
        b'{"error":{"message":"The server had an error","type":"server_error","code":null}}',
    ]
    facts = observe(ChatObserver(), chat_events(lines, done=False))
    assert facts.first_token_event == 0
    assert facts.error_type == "server_error"
    assert facts.error_message == "The server had an error"
    assert facts.done is False


def text_completion_lines() -> list[bytes]:
    return [
        b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"davinci",'
        b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":null}]}',
        b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"davinci",'
        b'"choices":[{"text":" there","index":0,"logprobs":null,"finish_reason":null}]}',
        b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"davinci",'
        b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}]}',
        b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"davinci",'
        b'"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":16,"total_tokens":20}}',
    ]


def test_legacy_completions_observer_from_the_endpoint_factory() -> None:
    factory = endpoint(COMPLETIONS).observer
    assert factory is not None
    lines = text_completion_lines()
    facts = observe(factory(), chat_events(lines))
    assert summary(facts) == chat_oracle(lines, text_completion=True)
    assert facts.first_token_event == 1
    assert facts.finish_reason == "length"
    assert facts.usage == Usage(input_tokens=4, output_tokens=16)


def test_chat_observer_ignores_text_field() -> None:
    # On Chat Completions a `text` field is not content; only the delta counts.
    facts = observe(ChatObserver(), chat_events(text_completion_lines()))
    assert facts.first_token_event is None


def test_endpoint_observer_factories() -> None:
    kinds = {CHAT: ChatObserver, RESPONSES: ResponsesObserver, MESSAGES: MessagesObserver}
    for path, kind in kinds.items():
        factory = endpoint(path).observer
        assert factory is not None
        assert isinstance(factory(), kind)
    assert endpoint(EMBEDDINGS).observer is None
    assert endpoint(COUNT_TOKENS).observer is None


def test_messages_error_event() -> None:
    lines = [
        b'{"type":"message_start","message":{"id":"msg_e","model":"c","usage":'
        b'{"input_tokens":5,"output_tokens":1}}}',
        b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}',
        b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
    ]
    facts = observe(MessagesObserver(), typed_events(lines))
    assert facts.error_type == "overloaded_error"
    assert facts.error_message == "Overloaded"
    assert facts.first_token_event == 2
    assert facts.done is False
    assert facts.usage == Usage(input_tokens=5, output_tokens=1)


def test_messages_unknown_events_are_tolerated() -> None:
    lines = [
        b'{"type":"message_start","message":{"id":"msg_u","model":"c","usage":'
        b'{"input_tokens":5,"output_tokens":1}}}',
        b'{"type":"brand_new_event","payload":{"x":1}}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}',
        b'{"type":"message_stop"}',
    ]
    facts = observe(MessagesObserver(), typed_events(lines))
    assert summary(facts) == anthropic_oracle(lines)
    assert facts.first_token_event == 2


def test_responses_incomplete_reports_the_reason() -> None:
    lines = [
        b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_i",'
        b'"model":"o3","status":"in_progress","usage":null}}',
        b'{"type":"response.output_text.delta","sequence_number":1,"delta":"Hel"}',
        b'{"type":"response.incomplete","sequence_number":2,"response":{"id":"resp_i",'
        b'"model":"o3","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},'
        b'"usage":{"input_tokens":7,"output_tokens":16}}}',
    ]
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert summary(facts, with_cache=False) == responses_oracle(lines)
    assert facts.finish_reason == "max_output_tokens"
    assert facts.done is True


def test_responses_documented_error_event_shape() -> None:
    lines = [
        b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_e",'
        b'"model":"m","status":"in_progress"}}',
        b'{"type":"error","code":"server_error","message":"Something went wrong","param":null,'
        b'"sequence_number":1}',
    ]
    facts = observe(ResponsesObserver(), typed_events(lines))
    assert facts.error_type == "server_error"
    assert facts.error_message == "Something went wrong"
    assert facts.done is False


JUNK: list[bytes] = [
    b"",
    b"{",
    b"{not json}",
    b"\xff\xfe\xfd",
    b"[1, 2, 3]",
    b'"a string"',
    b"42",
    b"null",
    b"[" * 5000 + b"]" * 5000,
    b'{"choices": "nope", "usage": 7, "error": "text", "id": 5}',
    b'{"choices": [1, null, {"delta": "x", "finish_reason": 3}], "usage": {"prompt_tokens": "a"}}',
    b'{"type": 5, "message": "x", "delta": [], "usage": []}',
    b'{"type": "message_start", "message": {"usage": "x", "id": 1}}',
    b'{"type": "message_delta", "delta": "x", "usage": null}',
    b'{"type": "error", "error": "x"}',
    b'{"type": "response.completed", "response": "x"}',
    b'{"type": "response.created", "response": []}',
    b'{"type": "response.failed", "response": {"error": "x", "usage": 5, "status": 3}}',
]
JUNK_NAMES = [
    "",
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
    "error",
    "ping",
    "response.created",
    "response.completed",
    "response.failed",
    "response.output_text.delta",
]


@pytest.mark.parametrize(
    "make",
    [ChatObserver, ResponsesObserver, MessagesObserver, lambda: ChatObserver(text_completion=True)],
    ids=["chat", "responses", "messages", "text_completion"],
)
def test_malformed_data_never_raises(make: Any) -> None:
    observer = make()
    events = [
        SSEEvent(event=name, data=data, id=None, retry=None) for name in JUNK_NAMES for data in JUNK
    ]
    facts = observe(observer, events)
    assert facts.usage is None or isinstance(facts.usage, Usage)


# --- usage_from_body -----------------------------------------------------------------------------


def test_openai_usage_from_chat_body() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    assert openai_usage_from_body(json.dumps(body).encode()) == Usage(11, 7, 4)


def test_openai_usage_from_embeddings_and_deepseek_bodies() -> None:
    embeddings = b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert openai_usage_from_body(embeddings) == Usage(input_tokens=8)
    deepseek = b'{"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_cache_hit_tokens":6}}'
    assert openai_usage_from_body(deepseek) == Usage(10, 2, 6)


def test_openai_usage_from_responses_body() -> None:
    body = b'{"id":"resp_1","object":"response","usage":{"input_tokens":20,"output_tokens":5}}'
    assert openai_usage_from_body(body) == Usage(input_tokens=20, output_tokens=5)


def test_openai_usage_from_responses_body_reads_cached_tokens() -> None:
    body = (
        b'{"object":"response","usage":{"input_tokens":20,"output_tokens":5,'
        b'"input_tokens_details":{"cached_tokens":12}}}'
    )
    assert openai_usage_from_body(body) == Usage(20, 5, 12)


def test_anthropic_usage_from_body() -> None:
    body = (
        b'{"id":"msg_1","type":"message","content":[],"usage":{"input_tokens":30,'
        b'"output_tokens":9,"cache_creation_input_tokens":2,"cache_read_input_tokens":17}}'
    )
    assert anthropic_usage_from_body(body) == Usage(30, 9, 17)


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b"null", b'{"id":"x"}', b'{"usage":null}', b'{"usage":"x"}']
)
def test_usage_from_body_without_usage(body: bytes) -> None:
    assert openai_usage_from_body(body) is None
    assert anthropic_usage_from_body(body) is None


# --- quiet chunks: what the relay may only count once the first token has passed ------------


QUIET_CHAT = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"the error: [DON"},'
    b'"finish_reason":null}],"usage":null}\n\n'
)


def test_chat_quiet_only_without_finish_usage_error_or_done() -> None:
    from gateway.providers.openai import ChatObserver

    observer = ChatObserver()
    assert observer.quiet(QUIET_CHAT * 3)
    # Content that talks about errors is still quiet: its quotes are escaped in the JSON.
    assert observer.quiet(b'data: {"choices":[{"delta":{"content":"an \\"error\\""}}]}\n\n')
    for loud in (
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[{"delta":{},"finish_reason": "stop"}]}\n\n',  # another spelling
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n',
        b'data: {"choices":[],"usage": {"prompt_tokens":1}}\n\n',
        b'data: {"error":{"message":"x"}}\n\n',
        b"data: [DONE]\n\n",
    ):
        assert not observer.quiet(QUIET_CHAT + loud), loud


def test_responses_and_messages_quiet_markers() -> None:
    from gateway.providers.anthropic import MessagesObserver
    from gateway.providers.openai import ResponsesObserver

    responses = ResponsesObserver()
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'
    assert responses.quiet(delta * 4)
    for loud in (b"event: response.completed", b"event: response.failed", b"event: error"):
        assert not responses.quiet(delta + loud)
    messages = MessagesObserver()
    block = b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
    assert messages.quiet(block * 4 + b"event: ping\ndata: {}\n\n")
    for loud in (b"event: message_delta", b"event: message_stop", b"event: error"):
        assert not messages.quiet(block + loud)


def test_skipped_responses_events_keep_the_sequence_number() -> None:
    from gateway.providers.openai import ResponsesObserver
    from gateway.sse import SSEEvent

    observer = ResponsesObserver()
    observer.skip([SSEEvent("e", b'{"sequence_number":41}', None, None)])
    assert observer.facts.events == 1
    assert observer.next_sequence_number() == 42
