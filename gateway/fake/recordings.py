"""Replays of recorded provider streams: ``<recordings_dir>/<replay>.chunks.jsonl`` files, one
JSON event a line, framed as the provider sent them (see `FakeScript.replay`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import orjson

from gateway.fake.errors import Reject, replay_error
from gateway.fake.records import RequestRecord, key_echo
from gateway.fake.wire import DONE, EOLS, Api, Event, StreamPlan, frame

_CHAT_RECORDING_DIRS: Final = ("openai-chat", "openai-completions")
# Recorded events that are the API's end marker (left out by omit_done).
_TERMINAL_KINDS: Final = frozenset({b"message_stop", b"response.completed", b"response.incomplete"})
_SUFFIX: Final = ".chunks.jsonl"


class Recordings:
    """The recordings a provider replays, each framed once and kept.

    Framed per (name, part, line ending): files never change while serving, and benchmarks
    replay the same file thousands of times.
    """

    __slots__ = ("_framed",)

    def __init__(self) -> None:
        self._framed: dict[tuple[str, int, bytes], list[Event]] = {}

    async def plan(self, root: Path | None, api: Api, record: RequestRecord) -> StreamPlan:
        """The replay ``record.script`` asks for, under ``root``, its in-band error in
        ``api``'s format.

        Raises `Reject` (400, naming the parameter) without a ``root``, for a bad or missing
        recording name and for a ``replay_part`` the file does not have.
        """
        script = record.script
        name = script.replay
        assert name is not None
        eol = EOLS[script.line_ending]
        key = (name, script.replay_part, eol)
        events = self._framed.get(key)
        if events is None:
            events = await _load(_root(root), name, script.replay_part, eol)
            self._framed[key] = events
        return StreamPlan(events, replay_error(api, script, eol, key_echo(record)))


async def _load(root: Path, name: str, part: int, eol: bytes) -> list[Event]:
    path = _resolve(root, name)
    raw = await asyncio.to_thread(path.read_bytes)
    chat = path.relative_to(root).parts[0] in _CHAT_RECORDING_DIRS
    events = _frame_recording(raw, chat, part, eol)
    if events is None:
        raise Reject(
            400,
            f"fake provider: script parameter 'replay_part': recording {name!r} has no part {part}",
        )
    return events


def _root(recordings_dir: Path | None) -> Path:
    if recordings_dir is None:
        raise Reject(400, "fake provider: script parameter 'replay': no recordings_dir configured")
    return recordings_dir.resolve()


def _resolve(root: Path, name: str) -> Path:
    """The file of recording ``name``: below ``root``, never outside it."""
    bad = Reject(400, f"fake provider: script parameter 'replay': bad recording name {name!r}")
    relative = Path(name)
    if not name or "\\" in name or relative.is_absolute() or ".." in relative.parts:
        raise bad
    filename = name if name.endswith(_SUFFIX) else name + _SUFFIX
    path = (root / filename).resolve()
    if not path.is_relative_to(root) or path == root:
        raise bad
    if not path.is_file():
        raise Reject(400, f"fake provider: script parameter 'replay': no recording named {name!r}")
    return path


def _frame_recording(raw: bytes, chat: bool, part: int, eol: bytes) -> list[Event] | None:
    """Frame the lines of a recording file; None when ``part`` does not exist.

    Chat recordings become ``data:`` events plus ``[DONE]``; others ``event: <type>`` +
    ``data:``, where a line without a string ``type`` gets no ``event:`` field. Lines are
    written exactly as stored, never re-serialised.
    """
    lines = [line for line in raw.split(b"\n") if line.strip()]
    kinds = [None if chat else _kind(line) for line in lines]
    starts = [i for i, k in enumerate(kinds) if k == b"response.created"]
    bounds = [0, *starts[1:]] if starts else [0]
    if part >= len(bounds):
        return None
    end = bounds[part + 1] if part + 1 < len(bounds) else len(lines)
    events = [
        Event(frame(lines[i], eol, kinds[i]), True, kinds[i] in _TERMINAL_KINDS)
        for i in range(bounds[part], end)
    ]
    if chat:
        events.append(Event(frame(DONE, eol), False, terminal=True))
    return events


def _kind(line: bytes) -> bytes | None:
    """The ``type`` of a recorded event, or None when the line has no string ``type``."""
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
        return str(parsed["type"]).encode()
    return None
