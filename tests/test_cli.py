"""The `gateway` command as operators run it: a real process, signals, exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.support import (
    ADMIN_TOKEN,
    CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    Served,
    base_config,
    free_port,
    serve_gateway,
)

ROOT = Path(__file__).parents[1]


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
        "GATEWAY_ADMIN_TOKEN": "e" * 24,
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


DEEP = "[" * 5000 + "]" * 5000
LEAK = "sk-cli-inline-leak-5d1e8b"


def test_check_config_rejects_deep_nesting_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    text = yaml.safe_dump(base_config("http://127.0.0.1:1")) + f"deep: {DEEP}\n"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    line = len(text.splitlines())
    assert result.stderr == f"gateway: {path}:{line}: nested too deeply (more than 64 levels)\n"
    assert result.stdout == ""


def test_check_config_yaml_error_names_where_but_never_quotes_the_line(tmp_path: Path) -> None:
    good = yaml.safe_dump(base_config("http://127.0.0.1:1"))
    assert f"secret: {UPSTREAM_KEYS[0]}\n" in good
    text = good.replace(f"secret: {UPSTREAM_KEYS[0]}\n", f'secret: "{LEAK}\n')  # never closed
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    line = next(i + 1 for i, t in enumerate(text.splitlines()) if LEAK in t)
    column = text.splitlines()[line - 1].index('"') + 1
    assert result.stderr == (
        f"gateway: {path}: invalid YAML: line {len(text.splitlines()) + 1}, column 1, "
        "in providers.oa.keys[0].secret: found unexpected end of stream "
        f"(while scanning a quoted scalar at line {line}, column {column})\n"
    )
    assert LEAK not in result.stderr + result.stdout


def test_check_config_warns_about_inline_secrets_and_still_passes(tmp_path: Path) -> None:
    config = base_config("http://127.0.0.1:1")
    config["providers"]["oa"]["keys"][1]["secret"] = "${OA_KEY_2}"
    config["providers"]["oa"]["headers"] = {"OpenAI-Organization": "org-inline-3"}
    config["auth"]["jwt"] = {
        "issuer": "https://idp.test/",
        "audience": "gw",
        "algorithms": ["HS256"],
        "secret": "jwt-inline-secret-of-at-least-32-bytes-cli",
    }
    config["state"] = {"redis_url": "redis://:hunter2-inline@127.0.0.1:6379/0"}
    path = tmp_path / "inline.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    path.write_text(text)
    result = run_cli("check-config", str(path), env={"OA_KEY_2": "sk-from-the-env-2"})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout

    def line(needle: str) -> int:
        return next(i + 1 for i, t in enumerate(text.splitlines()) if needle in t)

    assert result.stderr.splitlines() == [
        f"gateway: warning: {path}:{line(UPSTREAM_KEYS[0])}: providers.oa.keys[0].secret: "
        "secret written inline (use ${ENV_VAR})",
        f"gateway: warning: {path}:{line('OpenAI-Organization')}: "
        "providers.oa.headers.OpenAI-Organization: "
        "header value written inline (use ${ENV_VAR} if it is a secret)",
        f"gateway: warning: {path}:{line('sk-ant-test')}: providers.an.keys[0].secret: "
        "secret written inline (use ${ENV_VAR})",
        f"gateway: warning: {path}:{line('jwt-inline')}: auth.jwt.secret: "
        "secret written inline (use ${ENV_VAR})",
        f"gateway: warning: {path}:{line(ADMIN_TOKEN)}: admin.token: "
        "secret written inline (use ${ENV_VAR})",
        f"gateway: warning: {path}:{line('redis_url')}: state.redis_url: "
        "password written inline in the URL (use ${ENV_VAR})",
    ]
    for value in (*UPSTREAM_KEYS, "org-inline-3", "jwt-inline-secret", "hunter2"):
        assert value not in result.stderr + result.stdout


@pytest.fixture
async def served(fake: Fake, tmp_path: Path) -> AsyncIterator[Served]:
    config = base_config(fake.url)
    config["server"]["drain_timeout_s"] = 10
    async with serve_gateway(config, tmp_path) as gw:
        yield gw


async def _models(url: str) -> list[str]:
    """Every model the caller may use: each API lists its own, so both lists together."""
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:
        for extra in ({}, {"anthropic-version": "2023-06-01"}):
            async with session.get(
                url + "/v1/models", headers={"authorization": f"Bearer {CALLER_KEY}", **extra}
            ) as resp:
                ids += [m["id"] for m in (await resp.json())["data"]]
    return sorted(ids)


async def test_healthcheck_command(served: Served) -> None:
    ok = await asyncio.to_thread(run_cli, "healthcheck", "--url", served.url + "/healthz")
    assert ok.returncode == 0
    closed = f"http://127.0.0.1:{free_port()}/healthz"
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
    port = free_port()
    admin_port = free_port()
    while free_port_is_taken(admin_port + 1):
        admin_port = free_port()
    config = base_config(fake.url)
    config["server"].update(port=port, workers=2, drain_timeout_s=5)
    config["admin"]["port"] = admin_port  # worker k: admin_port + k
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
        # Each worker has its own admin listener (its own metrics and streams), one port each.
        admin_pids = set()
        async with aiohttp.ClientSession() as session:
            for k in (0, 1):
                async with session.get(f"http://127.0.0.1:{admin_port + k}/healthz") as resp:
                    admin_pids.add((await resp.json())["pid"])
        assert admin_pids == pids
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


def free_port_is_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _log_lines(served: Served) -> list[dict[str, Any]]:
    text = (served.config.parent / "gateway.log").read_text()
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


def _events(served: Served, event: str) -> list[dict[str, Any]]:
    return [line for line in _log_lines(served) if line.get("event") == event]


async def _wait_for(served: Served, event: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_events(served, event)) < count:
        assert served.proc.poll() is None
        assert time.monotonic() < deadline, f"no {event!r} in the log"
        await asyncio.sleep(0.05)


async def test_serve_logs_inline_secrets_by_key_path_never_the_value(served: Served) -> None:
    warnings = _events(served, "config warning")
    assert sorted(w["key_path"] for w in warnings) == [
        "admin.token",
        "providers.an.keys[0].secret",
        "providers.oa.keys[0].secret",
        "providers.oa.keys[1].secret",
    ]
    text = served.config.read_text()
    for w in warnings:
        assert w["level"] == "warning"
        assert w["file"] == str(served.config)
        assert w["problem"] == "secret written inline (use ${ENV_VAR})"
        field = "token:" if w["key_path"] == "admin.token" else "secret:"
        assert text.splitlines()[w["line"] - 1].strip().startswith(field)
    log = (served.config.parent / "gateway.log").read_text()
    for secret in (*UPSTREAM_KEYS, ADMIN_TOKEN):
        assert secret not in log


async def test_sighup_with_a_deeply_nested_file_keeps_the_old_config(served: Served) -> None:
    before = await _models(served.url)
    good = served.config.read_text()
    served.config.write_text(good + f"deep: {DEEP}\n")
    served.proc.send_signal(signal.SIGHUP)
    await _wait_for(served, "config reload rejected")
    await asyncio.sleep(0.2)
    assert served.proc.poll() is None
    assert await _models(served.url) == before
    (rejected,) = _events(served, "config reload rejected")
    line = len(good.splitlines()) + 1
    assert rejected["error"] == (f"{served.config}:{line}: nested too deeply (more than 64 levels)")
    log = (served.config.parent / "gateway.log").read_text()
    assert "Traceback" not in log
    assert "RecursionError" not in log


BULK_KEYS = 40_000  # about 3.7 MiB of YAML: seconds of parsing in pure-Python PyYAML


def _bulk_caller(i: int) -> str:
    return f"gw-bulk-caller-{i:06d}"


def _with_bulk_keys(config: dict[str, Any], model: str) -> str:
    config = {**config, "auth": {**config["auth"]}, "models": {**config["models"]}}
    config["auth"]["api_keys"] = [
        *config["auth"]["api_keys"],
        *(
            {"id": f"bulk-{i:06d}", "sha256": hashlib.sha256(_bulk_caller(i).encode()).hexdigest()}
            for i in range(BULK_KEYS)
        ),
    ]
    config["models"][model] = [{"provider": "oa", "model": "fake-gpt"}]
    # The C emitter when there is one: the pure-Python one takes seconds for this.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text: str = yaml.dump(config, Dumper=dumper)
    assert len(text) < 4 * 1024 * 1024  # the loader's cap
    return text


async def _status(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}) as r:
            return r.status


@pytest.mark.timeout(180)
async def test_sighup_parses_a_large_file_off_the_event_loop(served: Served) -> None:
    config: dict[str, Any] = yaml.safe_load(served.config.read_text())
    served.config.write_text(_with_bulk_keys(config, "gpt-bulk"))
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        sent = time.monotonic()
        served.proc.send_signal(signal.SIGHUP)
        while not _events(served, "config reloaded"):
            assert served.proc.poll() is None
            assert time.monotonic() - sent < 120, "the reload did not finish"
            start = time.monotonic()
            async with session.get(served.url + "/healthz") as resp:
                assert resp.status == 200
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(0.02)
        applied_after = time.monotonic() - sent
    (reloaded,) = _events(served, "config reloaded")
    latencies.sort()
    print(
        f"\nreload: load_s={reloaded['load_s']} (in the gateway), {applied_after:.2f} s from "
        f"SIGHUP to its log line; /healthz during it: {len(latencies)} answers, "
        f"median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    # The parse must take long enough for the check to mean something, and /healthz must
    # answer throughout, each answer far quicker than the parse.
    assert reloaded["load_s"] >= 1.0
    assert len(latencies) >= 10
    assert latencies[-1] < 0.5
    assert "gpt-bulk" in await _models(served.url)
    assert await _status(served.url, _bulk_caller(BULK_KEYS - 1)) == 200


@pytest.mark.timeout(180)
async def test_overlapping_sighups_apply_in_signal_order(served: Served) -> None:
    config: dict[str, Any] = yaml.safe_load(served.config.read_text())
    served.config.write_text(_with_bulk_keys(config, "gpt-first"))
    served.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    # The large file is still being parsed; a small one and a second SIGHUP arrive.
    assert not _events(served, "config reloaded")
    config["models"]["gpt-second"] = [{"provider": "oa", "model": "fake-gpt"}]
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    await _wait_for(served, "config reloaded", count=2, timeout=120)
    await asyncio.sleep(0.3)
    reloads = _events(served, "config reloaded")
    assert len(reloads) == 2
    models = await _models(served.url)
    assert "gpt-second" in models
    assert "gpt-first" not in models
    assert await _status(served.url, _bulk_caller(0)) == 401
