"""What an answer is generated from: `Gen`, parsed once from the request (model, prompt
estimate, max tokens, tool choice, usage option) and its script, and the content pieces it
yields."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.fake.content import estimate_prompt_tokens, fake_tokens, fake_tool_fragments
from gateway.fake.errors import Reject
from gateway.fake.records import RequestRecord, key_echo
from gateway.fake.script import FakeScript
from gateway.fake.wire import EOLS, Api

_DEFAULT_TOOL_NAME: Final = "get_weather"
# The padding of ``event_bytes``: one byte in UTF-8 and never escaped inside a JSON string.
_PAD_CHAR: Final = "x"


@dataclass(frozen=True, slots=True)
class Gen:
    """Everything the builders need, parsed once from the request."""

    body: Mapping[str, Any]
    model: str
    created: int
    prompt_tokens: int
    max_tokens: int | None
    include_usage: bool
    tool_name: str | None
    script: FakeScript
    eol: bytes
    # Appended to in-band error messages and non-stream answer texts (FakeScript.echo_key).
    echo: str = ""
    # Padding characters appended to the first piece (streams only, see FakeScript.event_bytes).
    pad: int = 0

    @classmethod
    def from_request(
        cls, api: Api, body: Mapping[str, Any], model: str, record: RequestRecord
    ) -> Gen:
        """Parse the inputs of an answer on ``api``; raises `Reject` for a bad max tokens."""
        script = record.script
        return cls(
            body=body,
            model=model,
            created=int(time.time()),
            prompt_tokens=estimate_prompt_tokens(body),
            max_tokens=_max_tokens(api, body),
            include_usage=_include_usage(body),
            tool_name=_tool_name(body, script) if api != "completions" else None,
            script=script,
            eol=EOLS[script.line_ending],
            echo=key_echo(record),
        )

    def pieces(self) -> tuple[list[str], bool]:
        """Content pieces to emit and whether max tokens cut them short."""
        pieces = (
            fake_tool_fragments(self.script.chunks)
            if self.tool_name is not None
            else fake_tokens(self.script.chunks)
        )
        cut = self.max_tokens is not None and self.max_tokens < len(pieces)
        if cut:
            pieces = pieces[: self.max_tokens]
        if self.pad and pieces:
            pieces[0] += _PAD_CHAR * self.pad
        return pieces, cut


_MAX_TOKENS_FIELDS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "chat": ("max_completion_tokens", "max_tokens"),
        "completions": ("max_tokens",),
        "responses": ("max_output_tokens",),
        "messages": ("max_tokens",),
    }
)


def _max_tokens(api: str, body: Mapping[str, Any]) -> int | None:
    for name in _MAX_TOKENS_FIELDS.get(api, ()):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Reject(400, f"'{name}' must be a non-negative integer.", param=name)
        return value
    return None


def _first_tool_name(tools: list[Any]) -> str | None:
    first = tools[0] if tools else None
    if not isinstance(first, Mapping):
        return None
    name = first.get("name")
    if isinstance(name, str):
        return name
    function = first.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return str(function["name"])
    return None


def _tool_name(body: Mapping[str, Any], script: FakeScript) -> str | None:
    """The tool to call, or None for a text answer.

    Tool mode is on when the script says ``tool`` or when the request has tools and forces
    one (``tool_choice`` "required", a named function/tool, or Anthropic's ``any``).
    """
    tools = body.get("tools")
    tools = tools if isinstance(tools, list) else []
    choice = body.get("tool_choice")
    forced = False
    named: str | None = None
    if choice == "required" and tools:
        forced = True
    elif isinstance(choice, Mapping) and tools:
        kind = choice.get("type")
        if kind in ("function", "tool"):
            forced = True
            function = choice.get("function")
            raw = function.get("name") if isinstance(function, Mapping) else choice.get("name")
            named = raw if isinstance(raw, str) else None
        elif kind == "any":
            forced = True
    if not (forced or script.tool):
        return None
    return named or _first_tool_name(tools) or _DEFAULT_TOOL_NAME


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True
