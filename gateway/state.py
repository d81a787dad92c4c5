"""Shared health state of upstream keys and providers (cooldowns, disabled keys, backoffs).

The key pools read it on every attempt and write it when an upstream fails. Reads are
synchronous and local (a dict lookup on the hot path); a shared backend (Redis, [3/4]) keeps
that local view in step with other instances and publishes local writes. Entries are keyed by
key fingerprint, so every instance that holds the same secret skips it, whatever id its own
config gives it; provider-wide entries are keyed `provider:<name>`.

Times are wall-clock epoch seconds: they are compared across instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

BlockState = Literal["cooldown", "disabled", "backoff"]


@dataclass(frozen=True, slots=True)
class Block:
    """One entry: out of rotation until `until` (an expired entry still remembers strikes)."""

    state: BlockState
    until: float
    reason: str
    strikes: int = 1  # consecutive failures of this kind (doubling, spend-cap detection)


class HealthStore(Protocol):
    def get(self, name: str) -> Block | None:
        """The entry for `name`, expired or not; None when healthy."""

    def put(self, name: str, block: Block) -> None:
        """Record (and, for shared backends, publish) an entry."""

    def clear(self, name: str) -> None:
        """`name` succeeded: forget its entry."""


class MemoryHealthStore:
    """The one-process backend: a dict that outlives config reloads (it lives in the app)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, Block] = {}

    def get(self, name: str) -> Block | None:
        return self._entries.get(name)

    def put(self, name: str, block: Block) -> None:
        self._entries[name] = block

    def clear(self, name: str) -> None:
        self._entries.pop(name, None)

    def entries(self) -> dict[str, Block]:
        return dict(self._entries)
