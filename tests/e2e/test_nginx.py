"""Real nginx, with deploy/nginx/gateway.conf, in front of the gateway: chunks still arrive one
by one, and big bodies and errors pass through."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support import CALLER_KEY, Gateway, free_port, require_binary

SITE = Path(__file__).parents[2] / "deploy" / "nginx" / "gateway.conf"


def site_for(gateway_port: int, listen_port: int) -> str:
    text = SITE.read_text()
    text, n_server = re.subn(
        r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gateway_port};", text
    )
    text, n_listen = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen_port};", text)
    assert n_server == 1 and n_listen == 1, "deploy/nginx/gateway.conf changed shape"
    return text


@pytest.fixture
async def nginx(gateway: Gateway, tmp_path: Path) -> AsyncIterator[str]:
    binary = require_binary("nginx")
    gateway_port = int(gateway.url.rsplit(":", 1)[1])
    port = free_port()
    tmp_path.chmod(0o755)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub).chmod(0o777)
    (tmp_path / "site.conf").write_text(site_for(gateway_port, port))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (tmp_path / "nginx.conf").write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/client_body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
"""
    )
    check = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"nginx did not start: {(tmp_path / 'error.log').read_text()}"
                    ) from None
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _headers(**extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {CALLER_KEY}", "content-type": "application/json", **extra}


async def test_chunks_arrive_one_by_one_through_nginx(nginx: str) -> None:
    body = orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    arrivals: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            nginx + "/v1/chat/completions",
            data=body,
            headers=_headers(**{"x-fake-chunks": "12", "x-fake-gap-ms": "40"}),
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for piece in resp.content.iter_any():
            arrivals.append((time.perf_counter(), piece))
    pieces = [p for _, p in arrivals]
    assert len(pieces) == 1 + 12 + 1 + 1, pieces[:3]
    assert all(p.count(b"\n\n") == 1 for p in pieces)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert sum(g >= 0.020 for g in gaps) >= len(gaps) - 2, gaps


async def test_large_body_and_errors_pass_through_nginx(nginx: str) -> None:
    big = "x" * (2 * 1024 * 1024)  # over the test gateway's 1 MiB limit, under nginx's 32 MiB
    async with aiohttp.ClientSession() as session:
        async with session.post(
            nginx + "/v1/chat/completions",
            data=io.BytesIO(
                orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": big}]})
            ),
            headers=_headers(),
        ) as resp:
            assert resp.status == 413
            error = (await resp.json())["error"]
        assert error["code"] == "request_too_large"
        async with session.post(
            nginx + "/v1/chat/completions",
            data=orjson.dumps(
                {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
            ),
            headers=_headers(),
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"
