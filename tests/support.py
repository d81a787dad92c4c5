"""Test support: constants, the gateway config used by tests, and server start helpers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.appkeys import OPS, RUNTIME
from gateway.bench.servers import (  # RedisServer: re-exported, the tests import it from here
    RedisServer,  # noqa: F401
    free_port,
)
from gateway.config import Runtime, build_runtime, load_config_text
from gateway.fake import FakeProvider
from gateway.serving import header_field_limit, make_runner
from gateway.telemetry import Telemetry

RECORDINGS = Path(__file__).parent / "data" / "recorded-streams"
CALLER_KEY = "gw-test-caller-key-0001"
OTHER_CALLER_KEY = "gw-test-caller-key-0002"
UPSTREAM_KEYS = ("sk-test-upstream-aaaa1111", "sk-test-upstream-bbbb2222")
ANTHROPIC_KEYS = ("sk-ant-test-upstream-cccc3333",)
# Accepted by the fake too, for a second (fallback) deployment with keys of its own.
FALLBACK_KEYS = ("sk-test-fallback-dddd4444",)
# Keys the fake rejects with 401 (revoked).
REVOKED_KEYS = ("sk-test-revoked-eeee5555", "sk-test-revoked-ffff6666")
ACCEPTED_KEYS = frozenset(UPSTREAM_KEYS + ANTHROPIC_KEYS + FALLBACK_KEYS)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def require_binary(name: str) -> str:
    """The path of a server binary; skip without it, unless GATEWAY_REQUIRE_SERVERS=1 (CI)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("GATEWAY_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{name} is required (GATEWAY_REQUIRE_SERVERS=1) but not installed")
        pytest.skip(f"{name} is not installed")
    return path


@dataclass
class Fake:
    provider: FakeProvider
    url: str  # http://127.0.0.1:PORT (no /v1)


@dataclass
class Gateway:
    url: str
    app: web.Application
    runtime: Runtime
    admin_url: str = ""  # the admin listener (every test config has one)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def base_config(fake_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "max_request_bytes": 1024 * 1024},
        "auth": {
            "api_keys": [
                {"id": "test-app", "sha256": sha(CALLER_KEY)},
                {"id": "limited-app", "sha256": sha(OTHER_CALLER_KEY), "models": ["gpt-test"]},
            ]
        },
        "providers": {
            "oa": {
                "api": "openai",
                "base_url": f"{fake_url}/v1",
                "keys": [{"id": f"oa-{i + 1}", "secret": k} for i, k in enumerate(UPSTREAM_KEYS)],
                "forward_headers": ["x-fake-*"],
            },
            "an": {
                "api": "anthropic",
                "base_url": fake_url,
                "keys": [{"id": "an-1", "secret": ANTHROPIC_KEYS[0]}],
                "forward_headers": ["x-fake-*"],
            },
        },
        "models": {
            "gpt-test": [{"provider": "oa", "model": "fake-gpt"}],
            "embed-test": [{"provider": "oa", "model": "fake-embed"}],
            "claude-test": [{"provider": "an", "model": "fake-claude"}],
        },
        "policy": {
            "timeouts": {"connect_s": 2, "first_byte_s": 5, "chunk_s": 5, "total_s": 60},
            # Short backoffs keep the suite fast; the retry maths has its own unit tests.
            "retry": {"base_delay_ms": 5, "max_delay_ms": 20},
            "max_tokens_cap": 1000,
        },
        "telemetry": {"log_format": "json", "access_log": True},
        "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
    }


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


async def start_gateway(
    config: dict[str, Any], *, tracer_provider: Any = None
) -> tuple[web.AppRunner, Gateway]:
    """The gateway in this process on a real loopback socket. `tracer_provider` (e.g. one
    with an InMemorySpanExporter) receives its spans."""
    runtime = build_runtime(load_config_text(yaml.safe_dump(config), env={}))
    telemetry = Telemetry(runtime.telemetry, tracer_provider=tracer_provider)
    app = create_app(runtime, telemetry=telemetry)
    jwt = runtime.config.auth.jwt
    runner = make_runner(
        app,
        keepalive_timeout_s=runtime.server.keepalive_timeout_s,
        max_field_size=header_field_limit(jwt.max_token_bytes if jwt else 0),
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    admin = app[OPS].admin_url or ""
    return runner, Gateway(
        url=f"http://{host}:{port}", app=app, runtime=app[RUNTIME].current, admin_url=admin
    )


GatewayFactory = Callable[..., Awaitable[Gateway]]


# --- Sensitive strings: every secret and prompt the suite uses (log hygiene, telemetry tests).

# Distinctive prompts: a test that sends one can then prove it appears in no log and no span.
PROMPT_CANARIES = tuple(
    f"canary prompt {i:02d}: the violet heron counts {i * 7919 + 104729} pebbles" for i in range(24)
)
# A caller key nobody configured (the 401 path) and a shared JWT secret (HS256, >= 32 bytes).
UNKNOWN_CALLER_KEY = "gw-test-unknown-caller-key-9999"
# The admin listener's token in every test config that has one.
ADMIN_TOKEN = "gw-test-admin-token-5e1f0c2a"
JWT_TEST_SECRET = "jwt-test-hs256-shared-secret-0123456789abcdef"


def sensitive_strings(extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Every caller key, upstream key, JWT secret and canary prompt the suite uses: the
    constants above plus every `sk-…` literal (10+ characters) in the tests' sources, plus
    `extra` (tokens minted at run time). None of them may ever appear in a log line or span."""
    import re

    found: set[str] = {
        CALLER_KEY,
        OTHER_CALLER_KEY,
        UNKNOWN_CALLER_KEY,
        JWT_TEST_SECRET,
        ADMIN_TOKEN,
        *UPSTREAM_KEYS,
        *ANTHROPIC_KEYS,
        *FALLBACK_KEYS,
        *REVOKED_KEYS,
        *PROMPT_CANARIES,
        *extra,
    }
    literal = re.compile(r"""["'](sk-[A-Za-z0-9_-]{7,})["']""")
    for path in Path(__file__).parent.rglob("*.py"):
        found.update(literal.findall(path.read_text(encoding="utf-8")))
    return frozenset(found)


def one_bad_key(fake_url: str) -> dict[str, Any]:
    """Config for model `one-bad-key`: provider `revoked-one` whose first key the fake rejects
    (key id `bad`) and whose second it accepts (`good`)."""
    return {
        "providers": {
            "revoked-one": {
                "api": "openai",
                "base_url": f"{fake_url}/v1",
                "keys": [
                    {"id": "bad", "secret": REVOKED_KEYS[0]},
                    {"id": "good", "secret": UPSTREAM_KEYS[0]},
                ],
                "forward_headers": ["x-fake-*"],
            }
        },
        "models": {"one-bad-key": [{"provider": "revoked-one", "model": "fake-gpt"}]},
    }


# --- A real `gateway serve` process (the regression tests of outside findings run through one).

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    """A `gateway serve` child process and where to reach it."""

    proc: subprocess.Popen[bytes]
    url: str
    config: Path
    log: Path
    admin_url: str = ""  # when the config has an `admin` section

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def access_lines(self, n: int, timeout_s: float = 10) -> list[dict[str, Any]]:
        """The access lines (one per request, written once it was settled), as soon as there
        are at least `n`; fails after `timeout_s`."""
        import orjson

        deadline = time.monotonic() + timeout_s
        while True:
            lines = [orjson.loads(x) for x in self.log_text().splitlines() if x.startswith("{")]
            access = [x for x in lines if x.get("event") == "request"]
            if len(access) >= n:
                return access
            assert time.monotonic() < deadline, f"{len(access)} access lines, expected {n}"
            await asyncio.sleep(0.05)

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """The process's resident set (VmRSS) or its peak so far (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


@contextlib.asynccontextmanager
async def serve_gateway(
    config: dict[str, Any], directory: Path, *, env: dict[str, str] | None = None
) -> AsyncIterator[Served]:
    """Run `gateway serve` on `config` (its server.port replaced by a free one) until the
    block ends; waits for /healthz first. Logs go to `directory/gateway.log`."""
    import aiohttp

    config = copy.deepcopy(config)
    port = free_port()
    config.setdefault("server", {})["port"] = port
    config["server"].setdefault("drain_timeout_s", 5)
    admin_url = ""
    if config.get("admin") is not None:
        admin_port = free_port()
        config["admin"]["port"] = admin_port
        admin_url = f"http://127.0.0.1:{admin_port}"
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = directory / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "gateway serve did not become healthy"
                await asyncio.sleep(0.05)
        yield Served(proc, url, path, log_path, admin_url)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


# --- Real nginx (deploy/nginx/gateway.conf) in front of a gateway.

NGINX_SITE = ROOT / "deploy" / "nginx" / "gateway.conf"


def site_for(gateway_port: int, listen_port: int) -> str:
    """deploy/nginx/gateway.conf, pointed at the gateway and listening on loopback."""
    text = NGINX_SITE.read_text()
    text, n_server = re.subn(
        r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gateway_port};", text
    )
    text, n_listen = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen_port};", text)
    assert n_server == 1 and n_listen == 1, "deploy/nginx/gateway.conf changed shape"
    return text


@contextlib.asynccontextmanager
async def nginx_in_front(gateway_url: str, directory: Path) -> AsyncIterator[str]:
    """Real nginx with deploy/nginx/gateway.conf, proxying to `gateway_url`."""
    binary = require_binary("nginx")
    gateway_port = int(gateway_url.rsplit(":", 1)[1])
    port = free_port()
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / sub).mkdir()
        (directory / sub).chmod(0o777)
    (directory / "site.conf").write_text(site_for(gateway_port, port))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {directory}/site.conf;
}}
"""
    )
    conf = [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    check = subprocess.run([*conf, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(conf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"nginx did not start: {(directory / 'error.log').read_text()}"
                    ) from None
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
