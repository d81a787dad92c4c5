"""Admission helpers: the token estimate and the usage stripper's bounds."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from gateway.config import build_runtime, load_config_text
from gateway.edge import estimate_tokens
from gateway.providers.base import ParsedRequest
from gateway.providers.openai import ENDPOINTS, UsageStripper

CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS = ENDPOINTS

CONFIG = """
providers:
  oa: {api: openai, base_url: "http://127.0.0.1:9/v1", keys: [{id: k, secret: "${K}"}]}
models:
  capped: {deployments: [{provider: oa, model: m}], policy: {max_tokens_cap: 200}}
  free: [{provider: oa, model: m}]
"""


def route(name: str):  # type: ignore[no-untyped-def]
    return build_runtime(load_config_text(CONFIG, env={"K": "sk-x"})).routes[name]


def chunk(i: int) -> bytes:
    return (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"w%d"},"finish_reason":null}]'
        b',"usage":null}\n\n' % i
    )


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'


def stripped(stream: bytes) -> bytes:
    """What a caller who did not ask for usage would have got."""
    return stream.replace(b',"usage":null', b"").replace(USAGE, b"")


@pytest.mark.parametrize("seed", range(20))
def test_stripper_output_is_the_stream_without_the_usage_at_any_split(seed: int) -> None:
    stream = b"".join(chunk(i) for i in range(30)) + USAGE + b"data: [DONE]\n\n"
    rng = random.Random(seed)
    stripper = UsageStripper()
    out = b""
    i = 0
    while i < len(stream):
        n = rng.randint(1, 200)
        out += stripper.feed(stream[i : i + n])
        i += n
    out += stripper.flush()
    assert out == stripped(stream)


def test_an_event_longer_than_the_bound_stops_stripping_and_passes_bytes_through() -> None:
    big = b'data: {"id":"c","choices":[{"delta":{"content":"' + b"x" * (50 * 1024 * 1024)
    big += b'"}}],"usage":null}\n\n'
    stream = chunk(0) + big + chunk(1) + USAGE + b"data: [DONE]\n\n"
    stripper = UsageStripper()
    out = []
    held_max = 0
    started = time.process_time()
    for i in range(0, len(stream), 16384):
        out.append(stripper.feed(stream[i : i + 16384]))
        held_max = max(held_max, len(stripper._pending))
    out.append(stripper.flush())
    cpu = time.process_time() - started
    result = b"".join(out)
    # Everything before the long event was stripped; from it on, the bytes are unchanged.
    assert result == stripped(chunk(0)) + big + chunk(1) + USAGE + b"data: [DONE]\n\n"
    assert held_max <= UsageStripper.MAX_HELD + 16384
    assert not stripper.active
    print(f"50 MB event through the stripper: {cpu:.3f} s CPU")
    assert cpu < 5  # linear, not quadratic (quadratic took minutes); a generous bound


def test_a_long_tail_after_a_boundary_is_bounded_too() -> None:
    stripper = UsageStripper()
    tail = b'data: {"x":"' + b"y" * (UsageStripper.MAX_HELD + 10)
    out = stripper.feed(chunk(0) + tail)
    assert out == stripped(chunk(0)) + tail
    assert not stripper.active
    assert stripper.feed(b',"usage":null}\n\n') == b',"usage":null}\n\n'


def parsed(endpoint, body):  # type: ignore[no-untyped-def]
    return ParsedRequest(endpoint=endpoint, body=body, model=body["model"], stream=False)


def test_the_estimate_reserves_for_every_choice() -> None:
    one = estimate_tokens(400, parsed(CHAT, {"model": "free", "max_tokens": 100}), route("free"))
    fifty = estimate_tokens(
        400, parsed(CHAT, {"model": "free", "max_tokens": 100, "n": 50}), route("free")
    )
    assert one == 100 + 100 and fifty == 100 + 50 * 100
    # best_of generates that many completions even when fewer are returned.
    best = estimate_tokens(
        400,
        parsed(COMPLETIONS, {"model": "capped", "n": 2, "best_of": 20, "max_tokens": 500}),
        route("capped"),
    )
    assert best == 100 + 20 * 200  # the route's cap applies to each
    # Without an explicit cap the route's cap (or the default) is what each choice may use.
    assert estimate_tokens(0, parsed(CHAT, {"model": "capped", "n": 3}), route("capped")) == 600
    # Endpoints without choices ignore n.
    assert estimate_tokens(40, parsed(EMBEDDINGS, {"model": "free", "n": 9}), route("free")) == 10


def test_usage_chunk_detection_needs_both_markers() -> None:
    event = orjson.dumps({"choices": [], "note": "usage"})
    stripper = UsageStripper()
    assert stripper.feed(b"data: " + event + b"\n\n") == b"data: " + event + b"\n\n"


def test_an_empty_choices_chunk_without_usage_is_kept() -> None:
    # Azure OpenAI sends its prompt filter results as a first chunk with no choices.
    azure = b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'
    stream = azure + chunk(0) + USAGE + chunk(1) + b"data: [DONE]\n\n"
    stripper = UsageStripper()
    assert stripper.feed(stream) + stripper.flush() == azure + stripped(
        chunk(0) + USAGE + chunk(1) + b"data: [DONE]\n\n"
    )
