"""OpenAI answers: Chat Completions and legacy Completions (streams and bodies), Embeddings and
Models, byte for byte in the shapes the API sends."""

from __future__ import annotations

import base64
import dataclasses
import struct
from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.fake.content import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    fake_embedding,
    tokens_for_chars,
)
from gateway.fake.errors import Reject, chat_error
from gateway.fake.inputs import Gen
from gateway.fake.wire import DONE, Event, StreamPlan, frame, rand_id

FAKE_MODELS: Final[tuple[str, ...]] = ("fake-gpt", "fake-gpt-mini", "fake-claude", "fake-embedding")
"""The model ids listed by ``GET /v1/models`` (any model name is accepted by every route)."""

_MODELS_CREATED: Final = 1_700_000_000
_FINGERPRINT: Final = "fp_fake"
_MAX_EMBEDDING_DIMENSIONS: Final = 8192


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish_reason(g: Gen, cut: bool) -> str:
    if cut:
        return "length"
    return "stop" if g.tool_name is None else "tool_calls"


def _chat_tool_call_id() -> str:
    return "call_" + rand_id()


# ---- streams ------------------------------------------------------------------------------


def _chunk_head(g: Gen, id_prefix: str, kind: str) -> dict[str, Any]:
    """What every chunk of one stream repeats: its id, object type, creation time and model."""
    return {
        "id": id_prefix + rand_id(),
        "object": kind,
        "created": g.created,
        "model": g.model,
        "system_fingerprint": _FINGERPRINT,
    }


def _chunk(g: Gen, head: Mapping[str, Any], choice: Mapping[str, Any]) -> bytes:
    obj: dict[str, Any] = {**head, "choices": [choice]}
    if g.include_usage:
        obj["usage"] = None
    return frame(orjson.dumps(obj), g.eol)


def _end_stream(
    g: Gen, head: Mapping[str, Any], events: list[Event], completion: int
) -> StreamPlan:
    """Finish a stream's events: the usage chunk (when asked for), then ``[DONE]``."""
    if g.include_usage:
        usage = _usage(g.prompt_tokens, completion)
        events.append(
            Event(frame(orjson.dumps({**head, "choices": [], "usage": usage}), g.eol), False)
        )
    events.append(Event(frame(DONE, g.eol), False, terminal=True))
    return StreamPlan(events, chat_error(g.script, g.eol, g.echo))


def chat_stream(g: Gen) -> StreamPlan:
    """A Chat Completions stream: the role chunk, one chunk per piece (text, or tool-call
    arguments), the finish chunk, the usage chunk when asked for, ``[DONE]``."""
    head = _chunk_head(g, "chatcmpl-", "chat.completion.chunk")

    def chunk(delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _chunk(g, head, choice)

    pieces, cut = g.pieces()
    role: dict[str, Any]
    deltas: list[dict[str, Any]]
    if g.tool_name is None:
        role = {"role": "assistant", "content": ""}
        deltas = [{"content": p} for p in pieces]
    else:
        first_call = {
            "index": 0,
            "id": _chat_tool_call_id(),
            "type": "function",
            "function": {"name": g.tool_name, "arguments": ""},
        }
        role = {"role": "assistant", "content": None, "tool_calls": [first_call], "refusal": None}
        deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    events = [
        Event(chunk(role), False),
        *(Event(chunk(delta), True) for delta in deltas),
        Event(chunk({}, _finish_reason(g, cut)), False),
    ]
    return _end_stream(g, head, events, len(pieces))


def completions_stream(g: Gen) -> StreamPlan:
    """A legacy Completions stream: one chunk per token, the finish chunk, the usage chunk
    when asked for, ``[DONE]``."""
    head = _chunk_head(g, "cmpl-", "text_completion")

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _chunk(g, head, choice)

    tokens, cut = dataclasses.replace(g, tool_name=None).pieces()
    events = [Event(chunk(t), True) for t in tokens]
    events.append(Event(chunk("", "length" if cut else "stop"), False))
    return _end_stream(g, head, events, len(tokens))


# ---- bodies -------------------------------------------------------------------------------


def _completion_body(
    g: Gen, id_prefix: str, kind: str, choice: Mapping[str, Any], completion: int
) -> bytes:
    return orjson.dumps(
        {
            "id": id_prefix + rand_id(),
            "object": kind,
            "created": g.created,
            "model": g.model,
            "choices": [choice],
            "usage": _usage(g.prompt_tokens, completion),
            "system_fingerprint": _FINGERPRINT,
        }
    )


def chat_body(g: Gen) -> bytes:
    """A Chat Completions answer: the text (with any key echo) or one tool call."""
    pieces, cut = g.pieces()
    message: dict[str, Any]
    if g.tool_name is None:
        message = {
            "role": "assistant",
            "content": "".join(pieces) + g.echo,
            "refusal": None,
            "annotations": [],
        }
    else:
        call = {
            "id": _chat_tool_call_id(),
            "type": "function",
            "function": {"name": g.tool_name, "arguments": "".join(pieces)},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _finish_reason(g, cut),
    }
    return _completion_body(g, "chatcmpl-", "chat.completion", choice, len(pieces))


def completions_body(g: Gen) -> bytes:
    """A legacy Completions answer: the text, with any key echo."""
    tokens, cut = dataclasses.replace(g, tool_name=None).pieces()
    choice = {
        "text": "".join(tokens) + g.echo,
        "index": 0,
        "logprobs": None,
        "finish_reason": "length" if cut else "stop",
    }
    return _completion_body(g, "cmpl-", "text_completion", choice, len(tokens))


def models_body() -> bytes:
    """The ``GET /v1/models`` list: `FAKE_MODELS`."""
    data = [
        {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "fake"}
        for m in FAKE_MODELS
    ]
    return orjson.dumps({"object": "list", "data": data})


# ---- embeddings ---------------------------------------------------------------------------


def embeddings_body(body: Mapping[str, Any], model: str) -> bytes:
    """An Embeddings answer (`fake_embedding` of each input, as floats or base64).

    Raises `Reject` for bad ``dimensions``, ``encoding_format`` or ``input``.
    """
    dims_raw = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if (
        not isinstance(dims_raw, int)
        or isinstance(dims_raw, bool)
        or not 1 <= dims_raw <= _MAX_EMBEDDING_DIMENSIONS
    ):
        raise Reject(400, "'dimensions' must be an integer in [1, 8192].", param="dimensions")
    dims: int = dims_raw
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise Reject(400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    texts, prompt_tokens = _embedding_inputs(body.get("input"))
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = fake_embedding(text, dims)
        embedding: object = (
            base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
            if fmt == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def _is_token_array(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _embedding_inputs(value: object) -> tuple[list[str], int]:
    """Texts to embed and their prompt tokens; token arrays become ``"tokens:1,2"``."""
    items: list[object]
    if isinstance(value, str) or _is_token_array(value):
        items = [value]
    elif isinstance(value, list) and value:
        items = list(value)
    else:
        raise Reject(400, "'input' must be a non-empty string or array.", param="input")
    texts: list[str] = []
    tokens = 0
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            tokens += tokens_for_chars(len(item))
        elif isinstance(item, list) and _is_token_array(item):
            texts.append("tokens:" + ",".join(str(t) for t in item))
            tokens += len(item)
        else:
            raise Reject(400, "'input' items must be strings or token arrays.", param="input")
    return texts, tokens
