"""The deterministic content: tokens, tool-argument fragments and the prompt estimate."""

from __future__ import annotations

from gateway.fake import (
    FAKE_TOOL_ARGUMENTS,
    estimate_prompt_tokens,
    fake_tokens,
    fake_tool_fragments,
)


def test_fake_tokens_are_deterministic() -> None:
    assert fake_tokens(0) == []
    assert fake_tokens(3) == ["Hello", " from", " the"]
    assert fake_tokens(50)[:10] == fake_tokens(10)
    assert len(fake_tokens(50)) == 50
    assert "".join(fake_tool_fragments(8)) == FAKE_TOOL_ARGUMENTS
    assert len(fake_tool_fragments(8)) == 8
    assert len(fake_tool_fragments(1000)) == len(FAKE_TOOL_ARGUMENTS)


def test_prompt_estimate_counts_text_not_roles() -> None:
    # "Hi" (2) + "be brief" (8) = 10 chars -> 3 tokens; "user"/"system" roles do not count.
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
    }
    assert estimate_prompt_tokens(body) == 3
    assert estimate_prompt_tokens({}) == 1
