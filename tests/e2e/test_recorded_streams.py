"""Every recorded provider stream, replayed through the gateway with random chunk boundaries:
the client's bytes equal the upstream's, and what the gateway observed is right."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.appkeys import OUTCOME_SINKS
from gateway.report import Report
from tests.support import CALLER_KEY, RECORDINGS, Fake, Gateway

MANIFEST = json.loads((RECORDINGS / "manifest.json").read_text())


def _parts(path: Path) -> list[list[str]]:
    """A file's streams: Responses files may hold several, each starting at response.created."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if "openai-responses" not in str(path):
        return [lines]
    parts: list[list[str]] = []
    for line in lines:
        if json.loads(line).get("type") == "response.created" or not parts:
            parts.append([])
        parts[-1].append(line)
    return parts


def _chat_content(delta: Any) -> bool:
    return isinstance(delta, dict) and any(
        delta.get(k)
        for k in (
            "content",
            "tool_calls",
            "function_call",
            "reasoning_content",
            "reasoning",
            "refusal",
        )
    )


def oracle(api: str, lines: list[str]) -> dict[str, Any]:
    """What the stream says, computed the plain way from the whole recording."""
    objs = [json.loads(line) for line in lines]
    first = finish = None
    inp = out = None
    if api == "openai-chat":
        for i, o in enumerate(objs):
            choices = o.get("choices") or []
            if first is None and any(_chat_content(c.get("delta")) for c in choices):
                first = i
            for c in choices:
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
            if o.get("usage"):
                inp, out = o["usage"].get("prompt_tokens"), o["usage"].get("completion_tokens")
    elif api == "anthropic-messages":
        for i, o in enumerate(objs):
            kind = o["type"]
            if kind == "content_block_delta" and first is None:
                first = i
            if kind == "message_start":
                inp = o["message"]["usage"].get("input_tokens", inp)
                out = o["message"]["usage"].get("output_tokens", out)
            if kind == "message_delta":
                finish = o["delta"].get("stop_reason") or finish
                inp = o.get("usage", {}).get("input_tokens", inp)
                out = o.get("usage", {}).get("output_tokens", out)
    else:
        for i, o in enumerate(objs):
            kind = o["type"]
            if kind.endswith(".delta") and first is None:
                first = i
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                response = o["response"]
                details = response.get("incomplete_details") or {}
                finish = details.get("reason") or response.get("status")
                usage = response.get("usage") or {}
                inp, out = usage.get("input_tokens"), usage.get("output_tokens")
    return {"first": first, "finish": finish, "input": inp, "output": out}


CASES = [
    pytest.param(entry["api"], entry["file"], part, id=f"{entry['file']}#{part}")
    for entry in MANIFEST
    for part in range(len(_parts(RECORDINGS / entry["file"])))
]


@pytest.mark.parametrize(("api", "file", "part"), CASES)
async def test_replay_through_gateway(
    gateway: Gateway, fake: Fake, api: str, file: str, part: int
) -> None:
    outcomes: list[Report] = []
    gateway.app[OUTCOME_SINKS].append(lambda o, _now: outcomes.append(o))
    name = file.removesuffix(".chunks.jsonl")
    if api == "openai-chat":
        path, body = "/v1/chat/completions", {"model": "gpt-test", "messages": []}
    elif api == "openai-responses":
        path, body = "/v1/responses", {"model": "gpt-test", "input": "x"}
    else:
        path, body = "/v1/messages", {"model": "claude-test", "max_tokens": 10, "messages": []}
    body["stream"] = True
    rng = random.Random(file)
    for trial in range(3):
        headers = {
            "authorization": f"Bearer {CALLER_KEY}",
            "x-fake-replay": name,
            "x-fake-replay-part": str(part),
            "x-fake-split-seed": str(rng.randint(0, 10**6)),
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gateway.url + path, data=orjson.dumps(body), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                received = bytearray()
                async for piece in resp.content.iter_any():
                    received += piece
        record = fake.provider.records[-1]
        assert bytes(received) == bytes(record.sent), f"trial {trial}: bytes differ"

    expected = oracle(api, _parts(RECORDINGS / file)[part])
    assert len(outcomes) == 3
    for outcome in outcomes:
        facts = outcome.facts
        assert facts is not None
        assert facts.first_token_event == expected["first"]
        assert facts.finish_reason == expected["finish"]
        usage = facts.usage
        got = (usage.input_tokens, usage.output_tokens) if usage else (None, None)
        assert got == (expected["input"], expected["output"])
        assert outcome.outcome in ("ok", "upstream_error")
        assert (outcome.outcome == "upstream_error") == (facts.error_type is not None)
