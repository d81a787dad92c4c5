"""OpenAI Responses answers, streamed and not, read by the official SDK."""

from __future__ import annotations

import openai

from gateway.fake import FAKE_TOOL_ARGUMENTS, FakeProvider, fake_tokens
from tests import fake_support

# The fake's own fixtures, bound by name (see tests/fake_support.py).
fake_server = fake_support.fake_server
provider = fake_support.provider
url = fake_support.url
oai = fake_support.oai


async def test_responses_stream_and_non_stream(
    oai: openai.AsyncOpenAI, provider: FakeProvider
) -> None:
    stream = await oai.responses.create(model="fake-gpt@chunks=4", input="Hi there", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "".join(fake_tokens(4))
    usage = completed.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (2, 4, 6)
    assert b"data: [DONE]" not in provider.records[0].sent
    assert provider.records[0].sent.startswith(b"event: response.created\ndata: {")

    response = await oai.responses.create(model="fake-gpt", input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.output_text == "".join(fake_tokens(2))

    tool_stream = await oai.responses.create(
        model="fake-gpt@tool=1", input="Hi", stream=True, tools=[]
    )
    tool_events = [e async for e in tool_stream]
    deltas = [e.delta for e in tool_events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == FAKE_TOOL_ARGUMENTS
