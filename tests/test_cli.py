"""The `gateway` command as operators run it: a real process, signals, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.support import CALLER_KEY, Fake, base_config

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_shipped_configs() -> None:
    demo = run_cli("check-config", "config/demo.yaml")
    assert demo.returncode == 0, demo.stderr
    assert "OK" in demo.stdout
    keys = {
        "OPENAI_KEY_1": "a",
        "OPENAI_KEY_2": "b",
        "ANTHROPIC_KEY_1": "c",
        "ANTHROPIC_ORG_B_KEY": "d",
    }
    example = run_cli("check-config", "config/gateway.example.yaml", env=keys)
    assert example.returncode == 0, example.stderr


def test_check_config_names_the_bad_key_and_line(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["policy"]["timeouts"]["chunk_sec"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    line = next(
        i + 1 for i, text in enumerate(path.read_text().splitlines()) if "chunk_sec" in text
    )
    assert f"bad.yaml:{line}: unknown key policy.timeouts.chunk_sec" in result.stderr


def test_check_config_never_prints_secrets(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["providers"]["oa"]["keys"][0]["secret"] = "sk-very-secret-value-123"
    config["providers"]["oa"]["keys"][0]["weight"] = "heavy"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "weight" in result.stderr
    assert "sk-very-secret-value-123" not in result.stderr + result.stdout


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, config: Path) -> None:
        self.proc = proc
        self.url = url
        self.config = config


@pytest.fixture
async def served(fake: Fake, tmp_path: Path) -> AsyncIterator[Served]:
    port = _free_port()
    config = base_config(fake.url)
    config["server"]["port"] = port
    config["server"]["drain_timeout_s"] = 10
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
                await asyncio.sleep(0.05)
        yield Served(proc, url, path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


async def _models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url + "/v1/models", headers={"authorization": f"Bearer {CALLER_KEY}"}
        ) as resp:
            return sorted(m["id"] for m in (await resp.json())["data"])


async def test_healthcheck_command(served: Served) -> None:
    ok = await asyncio.to_thread(run_cli, "healthcheck", "--url", served.url + "/healthz")
    assert ok.returncode == 0
    closed = f"http://127.0.0.1:{_free_port()}/healthz"
    down = await asyncio.to_thread(run_cli, "healthcheck", "--url", closed, "--timeout", "1")
    assert down.returncode == 1


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(served: Served) -> None:
    assert await _models(served.url) == ["claude-test", "embed-test", "gpt-test"]
    config: dict[str, Any] = yaml.safe_load(served.config.read_text())
    config["models"]["gpt-extra"] = [{"provider": "oa", "model": "fake-gpt"}]
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if "gpt-extra" in await _models(served.url):
            break
        await asyncio.sleep(0.05)
    assert "gpt-extra" in await _models(served.url)

    config["models"]["broken"] = [{"provider": "no-such-provider", "model": "x"}]
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert served.proc.poll() is None
    assert await _models(served.url) == ["claude-test", "embed-test", "gpt-extra", "gpt-test"]
    log = (served.config.parent / "gateway.log").read_text()
    assert "config reload rejected" in log
    assert "no-such-provider" in log


async def test_sigterm_drains_open_streams(served: Served) -> None:
    body = orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            served.url + "/v1/chat/completions",
            data=body,
            headers={
                "authorization": f"Bearer {CALLER_KEY}",
                "x-fake-chunks": "20",
                "x-fake-gap-ms": "50",
            },
        ) as resp:
            first = await resp.content.readany()
            assert first
            served.proc.send_signal(signal.SIGTERM)
            rest = await resp.read()
    received = first + rest
    assert received.endswith(b"data: [DONE]\n\n")
    assert received.count(b"\n\n") == 1 + 20 + 1 + 1
    assert await asyncio.to_thread(served.proc.wait, 15) == 0


async def test_sighup_swaps_the_jwt_settings(served: Served) -> None:
    import time as _time

    import jwt as pyjwt

    secret_a = "first-hs256-secret-of-at-least-32-bytes"
    secret_b = "second-hs256-secret-of-at-least-32-bytes"

    def token(secret: str) -> str:
        now = int(_time.time())
        claims = {
            "iss": "https://idp.test/",
            "aud": "gw",
            "sub": "svc",
            "iat": now,
            "exp": now + 300,
        }
        return pyjwt.encode(claims, secret, algorithm="HS256")

    async def status(tok: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                served.url + "/v1/models", headers={"authorization": f"Bearer {tok}"}
            ) as resp:
                return resp.status

    config: dict[str, Any] = yaml.safe_load(served.config.read_text())
    jwt_config = {"issuer": "https://idp.test/", "audience": "gw", "algorithms": ["HS256"]}
    config["auth"]["jwt"] = {**jwt_config, "secret": secret_a}
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if await status(token(secret_a)) == 200:
            break
        await asyncio.sleep(0.05)
    assert await status(token(secret_a)) == 200
    assert await status(token(secret_b)) == 401

    config["auth"]["jwt"] = {**jwt_config, "secret": secret_b}
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if await status(token(secret_b)) == 200:
            break
        await asyncio.sleep(0.05)
    assert await status(token(secret_b)) == 200
    assert await status(token(secret_a)) == 401


async def test_workers_share_the_port_and_drain_together(fake: Fake, tmp_path: Path) -> None:
    port = _free_port()
    config = base_config(fake.url)
    config["server"].update(port=port, workers=2, drain_timeout_s=5)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "workers.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}/healthz"
    pids: set[int] = set()
    try:
        # Bounded by time, not tries: under load the second worker may start seconds after the
        # first, and the first alone answers quickly.
        deadline = asyncio.get_running_loop().time() + 30
        while len(pids) < 2 and asyncio.get_running_loop().time() < deadline:
            # A new connection each time: the kernel spreads them over the listening workers.
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.get(url) as resp:
                        pids.add((await resp.json())["pid"])
                except aiohttp.ClientConnectionError:
                    pass
            await asyncio.sleep(0.02)
        assert len(pids) == 2, (tmp_path / "workers.log").read_text()
        assert proc.pid not in pids  # the supervisor serves nothing itself
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
