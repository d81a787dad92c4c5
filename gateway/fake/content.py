"""Deterministic content: the tokens, tool-call arguments and embeddings every answer carries,
and the prompt-token estimate, so that tests can predict exact output.

Pure functions of their arguments; nothing here knows about HTTP or wire formats.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Any, Final

# Non-ASCII words are included on purpose: split writes must be able to cut inside a
# multi-byte UTF-8 character, and decoders downstream must cope.
_FIRST_WORD: Final = "Hello"
_WORD_CYCLE: Final[tuple[str, ...]] = (
    " from",
    " the",
    " fake",
    " provider",
    ".",
    " The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ",",
    " café",
    " naïve",
    " 世界",
    " 🙂",
    ".",
)

FAKE_TOOL_ARGUMENTS: Final = '{"location":"Paris","unit":"celsius"}'
"""The arguments of every fake tool call (compact JSON), streamed as `fake_tool_fragments`."""

DEFAULT_EMBEDDING_DIMENSIONS: Final = 8


def fake_tokens(n: int) -> list[str]:
    """Return the first ``n`` content tokens every fake stream emits.

    The first token is ``"Hello"``; the rest cycle through a fixed word list (with leading
    spaces, and some non-ASCII words). Pure and deterministic; ``n <= 0`` gives ``[]``.
    """
    if n <= 0:
        return []
    cycle = len(_WORD_CYCLE)
    return [_FIRST_WORD, *(_WORD_CYCLE[i % cycle] for i in range(n - 1))]


def fake_tool_fragments(n: int) -> list[str]:
    """Split `FAKE_TOOL_ARGUMENTS` into ``min(n, len)`` nearly equal, non-empty fragments.

    Earlier fragments are at most one character longer than later ones. Their concatenation
    is `FAKE_TOOL_ARGUMENTS`; ``n <= 0`` gives ``[]``.
    """
    text = FAKE_TOOL_ARGUMENTS
    n = min(n, len(text))
    if n <= 0:
        return []
    size, extra = divmod(len(text), n)
    out: list[str] = []
    pos = 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(text[pos : pos + step])
        pos += step
    return out


_PROMPT_FIELDS: Final = ("system", "instructions", "messages", "prompt", "input")
_UNCOUNTED_KEYS: Final = frozenset({"role", "type"})


def _count_chars(value: object) -> int:
    # Iterative so that a deeply nested request cannot hit the recursion limit.
    total = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(v for k, v in item.items() if k not in _UNCOUNTED_KEYS)
        elif isinstance(item, list):
            stack.extend(item)
    return total


def tokens_for_chars(chars: int) -> int:
    """The token estimate of ``chars`` characters of text: ``max(1, ceil(chars / 4))``."""
    return max(1, math.ceil(chars / 4))


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimate a request's prompt tokens: ``max(1, ceil(chars / 4))``.

    ``chars`` counts the characters of every string under the request fields ``system``,
    ``instructions``, ``messages``, ``prompt`` and ``input`` (at any depth), except the values
    of ``role`` and ``type`` keys. Integers (token arrays) are not counted.
    """
    return tokens_for_chars(sum(_count_chars(body.get(name)) for name in _PROMPT_FIELDS))


def fake_embedding(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """Return the deterministic unit-length embedding of ``text``.

    Values are derived from SHA-256 of the text and rounded to float32, so the ``"float"``
    and ``"base64"`` encodings decode to exactly these numbers. A token-array input ``[1, 2]``
    is embedded as the text ``"tokens:1,2"``.
    """
    raw: list[float] = []
    block = 0
    seed = text.encode()
    while len(raw) < dimensions:
        digest = hashlib.sha256(block.to_bytes(4, "little") + seed).digest()
        raw.extend(v / 2**31 - 1.0 for v in struct.unpack("<8I", digest))
        block += 1
    del raw[dimensions:]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    scaled = [v / norm for v in raw]
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *scaled)))
