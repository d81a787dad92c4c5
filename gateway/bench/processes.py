"""The benchmark's child processes: the fake provider and the gateway (on the packaged
`bench.yaml`), started on free loopback ports, polled until ready, stopped in every case; and
what /proc says they cost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import aiohttp

import gateway
from gateway.bench.servers import free_ports
from gateway.bench.settings import BenchError
from gateway.config import ConfigError, GatewayConfig, load_config

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# The directory this process imports `gateway` from (the repository root in a checkout,
# site-packages when installed): the children run there, so `-m gateway` is the same code.
_IMPORT_ROOT = Path(gateway.__file__).resolve().parent.parent


# --- the gateway's config ------------------------------------------------------------------


def bench_config() -> Traversable:
    """The gateway config the benchmark runs (package data). Its ports, the fake provider's
    URL and the OTLP endpoint are `${BENCH_...}` references that `child_environment` sets."""
    return resources.files("gateway.bench").joinpath("bench.yaml")


def child_environment(fake_url: str, gateway_port: int, otlp_endpoint: str) -> dict[str, str]:
    """The environment of both children: this process's, plus what `bench.yaml` refers to
    (an empty `otlp_endpoint`: no export)."""
    return {
        **os.environ,
        "BENCH_FAKE_URL": fake_url,
        "BENCH_GATEWAY_PORT": str(gateway_port),
        "BENCH_OTLP_ENDPOINT": otlp_endpoint,
    }


def validate_config(path: Path, env: Mapping[str, str]) -> GatewayConfig:
    """`path` as the gateway will read it in `env`, validated by the gateway's own loader
    before any process starts. Raises BenchError with the loader's message."""
    try:
        return load_config(path, env)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


# --- the subprocesses ----------------------------------------------------------------------


@dataclass(slots=True)
class Service:
    """A subprocess this benchmark started, where it listens, and the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str], url: str) -> Service:
    """Run `python -m gateway *argv` with its output in `log`."""
    with log.open("wb") as out:
        # A new session: Ctrl-C reaches only the benchmark, which then stops these in order.
        proc = subprocess.Popen(  # noqa: S603  (our own interpreter and module, no shell)
            [sys.executable, "-m", "gateway", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=_IMPORT_ROOT,
            env=dict(env),
            start_new_session=True,
        )
    return Service(name, proc, log, url)


def stop(service: Service) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; nothing when it has exited already."""
    proc = service.proc
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_services(directory: Path, otlp_endpoint: str) -> Iterator[tuple[Service, Service]]:
    """The fake provider and the gateway in front of it, each on a free loopback port, their
    logs in `directory`; both stopped (gateway first) when the block ends, however it ends.
    Not waited for: see `wait_ready`. Raises BenchError when the config does not validate."""
    fake_port, gateway_port = free_ports(2)
    fake_url = f"http://127.0.0.1:{fake_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    env = child_environment(fake_url, gateway_port, otlp_endpoint)
    services: list[Service] = []
    with resources.as_file(bench_config()) as config:
        validate_config(config, env)
        try:
            fake_argv = ["fake-provider", "--host", "127.0.0.1", "--port", str(fake_port)]
            services.append(
                spawn("fake provider", fake_argv, directory / "fake.log", env, fake_url)
            )
            gateway_argv = ["serve", "--config", str(config), "--port", str(gateway_port)]
            services.append(
                spawn("gateway", gateway_argv, directory / "gateway.log", env, gateway_url)
            )
            yield services[0], services[1]
        finally:
            for service in reversed(services):
                stop(service)


async def wait_ready(
    session: aiohttp.ClientSession, service: Service, path: str, deadline: float
) -> None:
    """Poll GET `path` until it answers 200. Raises BenchError if the process exits or time
    runs out (`deadline`, on the monotonic clock), with the end of its output."""
    url = service.url + path
    while True:
        code = service.proc.poll()
        if code is not None:
            raise BenchError(f"{service.name} exited with status {code}:\n{service.log_tail()}")
        try:
            async with session.get(
                url,
                headers={"Authorization": "Bearer bench"},
                timeout=aiohttp.ClientTimeout(total=1),
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{service.name} did not answer GET {url} within {READY_TIMEOUT_S:g} s:\n"
                f"{service.log_tail()}"
            )
        await asyncio.sleep(0.1)


# --- what /proc says -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process's counters from /proc."""

    cpu_s: float
    rss_mib: float
    hwm_mib: float


def sample_process(pid: int) -> ProcSample | None:
    """utime+stime, VmRSS and VmHWM of `pid`; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    kib = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kib[key] = int(value.split()[0])
    return ProcSample(
        cpu_s=ticks / os.sysconf("SC_CLK_TCK"),
        rss_mib=kib.get("VmRSS", 0) / 1024,
        hwm_mib=kib.get("VmHWM", 0) / 1024,
    )


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (system-wide
    TcpExt ListenOverflows); None where /proc/net/netstat is not available."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    # Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: value1 value2 ...".
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


@dataclass(frozen=True, slots=True)
class RunCost:
    """What the host counted over one run: the charged process's counters before and after it
    (None for a direct run, or without /proc) and the connections dropped by full listen
    queues in between (None without /proc)."""

    before: ProcSample | None
    after: ProcSample | None
    listen_overflows: int | None


@dataclass(frozen=True, slots=True)
class CostMeter:
    """The readings taken as a run starts; `stop()` takes them again as it ends."""

    pid: int | None  # the process charged (None: none, a direct run)
    before: ProcSample | None
    overflows: int | None

    @classmethod
    def start(cls, pid: int | None) -> CostMeter:
        overflows = listen_overflows()
        return cls(pid, sample_process(pid) if pid is not None else None, overflows)

    def stop(self) -> RunCost:
        after = sample_process(self.pid) if self.pid is not None else None
        overflows = listen_overflows()
        dropped = (
            overflows - self.overflows
            if overflows is not None and self.overflows is not None
            else None
        )
        return RunCost(self.before, after, dropped)
