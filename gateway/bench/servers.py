"""Local servers for the benchmarks and the tests: free loopback ports, finding a server
binary, and a real redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

REDIS_START_TIMEOUT_S = 10.0


class ServerStartError(RuntimeError):
    """A server process did not come up (it exited, or did not answer in time)."""


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all bound at once, so they cannot repeat).

    Free when this returns: another process may take one before the caller binds it."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free loopback port (see `free_ports`)."""
    return free_ports(1)[0]


def find_binary(name: str) -> str | None:
    """The path of an executable on PATH, or in /usr/sbin or /usr/bin; None without one."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


class RedisServer:
    """A real redis-server on a free loopback port, without persistence, its files in
    `directory`; owned by whoever starts it (a test, a module, a benchmark)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING. Blocking.
        Raises ServerStartError; `stop()` then ends a process that is still running."""
        self.proc = subprocess.Popen(  # noqa: S603  (a server binary, no shell)
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._answers_ping():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise ServerStartError("redis-server did not start")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it hard (an outage, not a shutdown); nothing when it is not running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
