"""The task helper: names, references, logged failures; and that nothing else starts tasks."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from gateway.tasks import Tasks

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


async def test_tasks_are_named_kept_and_forgotten_when_done() -> None:
    tasks = Tasks("test")
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    task = tasks.spawn(work(), "unit-work")
    assert task.get_name() == "unit-work"
    assert len(tasks) == 1
    gate.set()
    assert await task == 7
    await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_a_failing_task_is_logged_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.logs import configure_logging

    configure_logging("json", "info")
    tasks = Tasks("owner-x")

    async def boom() -> None:
        raise ValueError("no")

    tasks.spawn(boom(), "exploding")
    await tasks.wait()
    await asyncio.sleep(0)
    err = capsys.readouterr().err
    assert "background task failed" in err
    assert '"task":"exploding"' in err and '"owner":"owner-x"' in err


async def test_cancel_stops_every_task() -> None:
    tasks = Tasks("test")
    started = [tasks.spawn(asyncio.sleep(60), f"sleeper-{i}") for i in range(3)]
    await tasks.cancel()
    assert all(t.cancelled() for t in started)
    assert len(tasks) == 0


def test_no_module_starts_a_task_but_through_the_helper() -> None:
    # The fake provider is a tool of its own that imports nothing of the gateway. A TaskGroup
    # (structured: it holds its tasks and raises their errors) is not a bare task.
    bare = re.compile(
        r"(asyncio|loop|get_running_loop\(\)|get_event_loop\(\))\.create_task\(|ensure_future\("
    )
    offenders = [
        str(path.relative_to(GATEWAY))
        for path in GATEWAY.rglob("*.py")
        if path.name != "tasks.py"
        and "fake" not in path.relative_to(GATEWAY).parts
        and bare.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
