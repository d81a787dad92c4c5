"""A scriptable fake OpenAI + Anthropic upstream, served on a real socket.

The fake speaks the wire formats of OpenAI Chat Completions, legacy Completions, Responses,
Embeddings and Models, and of Anthropic Messages and count_tokens, byte for byte as the
providers stream them. Every request can be scripted (timing, errors, truncation, stalls,
tool calls, replays of recorded streams, and HTTP-level misbehaviour: raw odd statuses,
unasked-for compression, echoed keys, missing end markers, oversized events) through its
model name suffix, ``x-fake-*`` headers or a per-attempt plan; every request is recorded,
including each body byte written and whether the client went away. It is the upstream of the
tests, the benchmarks and the demo.

Scripting, lowest to highest precedence (see `FakeScript` for the parameters):

1. the request's model name suffix after ``@``: ``"fake-gpt@chunks=50,gap_ms=20"`` (the part
   before ``@`` is the model name echoed back);
2. ``x-fake-<name>`` request headers, ``_`` written as ``-`` (``x-fake-gap-ms: 20``);
3. a per-attempt plan: ``x-fake-plan`` is a JSON array of objects with the same keys, and the
   i-th request (0-based) carrying ``x-fake-session: S`` uses ``plan[min(i, len(plan) - 1)]``
   merged over 1 and 2. Without a session header every request uses ``plan[0]``.

A value of ``null`` (JSON) or ``none``/``null`` (text) resets a parameter to its default.
Unknown parameters and bad values are answered with 400 in the route's error format, naming
the parameter.

Determinism, so that tests can predict exact content:

- content tokens are `fake_tokens(n)`; tool-call arguments are `FAKE_TOOL_ARGUMENTS` split
  by `fake_tool_fragments(n)`;
- prompt tokens are `estimate_prompt_tokens(body)`; output tokens are the number of content
  chunks (text tokens or argument fragments) emitted;
- embeddings are `fake_embedding(text, dimensions)`.

Ids (``chatcmpl-…``, ``msg_…``, request ids) and ``created`` timestamps are random / current.
"""

from gateway.fake.content import (
    FAKE_TOOL_ARGUMENTS,
    estimate_prompt_tokens,
    fake_embedding,
    fake_tokens,
    fake_tool_fragments,
)
from gateway.fake.openai import FAKE_MODELS
from gateway.fake.records import Outcome, RequestRecord
from gateway.fake.script import FakeScript, ScriptError, parse_script
from gateway.fake.server import FakeProvider, run_fake_provider, start_fake_provider

__all__ = [
    "FAKE_MODELS",
    "FAKE_TOOL_ARGUMENTS",
    "FakeProvider",
    "FakeScript",
    "Outcome",
    "RequestRecord",
    "ScriptError",
    "estimate_prompt_tokens",
    "fake_embedding",
    "fake_tokens",
    "fake_tool_fragments",
    "parse_script",
    "run_fake_provider",
    "start_fake_provider",
]
