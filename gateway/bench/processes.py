"""The benchmark's child processes: the fake provider and the targets in front of it (nginx,
the gateway on the packaged `bench.yaml`, the same gateway with production features on),
each on a free loopback port, polled until ready, stopped in every case."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import aiohttp

import gateway
from gateway.bench import nginx
from gateway.bench.servers import RedisServer, ServerStartError, find_binary, free_ports
from gateway.bench.settings import BenchError
from gateway.config import ConfigError, GatewayConfig, load_config

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# The directory this process imports `gateway` from (the repository root in a checkout,
# site-packages when installed): the children run there, so `-m gateway` is the same code.
_IMPORT_ROOT = Path(gateway.__file__).resolve().parent.parent
# Where each target is polled until it answers 200 (nginx: the fake's route, through it).
_READY_PATHS = {
    "nginx": "/v1/models",
    "gateway": "/healthz",
    "gateway-prod": "/healthz",
    "gateway-budget": "/healthz",
    "gateway-budget-redis": "/healthz",
}


# --- the gateway's config ------------------------------------------------------------------


def bench_config() -> Traversable:
    """The gateway config the benchmark runs (package data), for both gateway targets. Its
    ports, the fake provider's URL, the OTLP endpoint and the logging are `${BENCH_...}`
    references that `child_environment` sets."""
    return resources.files("gateway.bench").joinpath("bench.yaml")


def child_environment(
    fake_url: str,
    gateway_port: int,
    otlp_endpoint: str,
    production: bool = False,
    redis_url: str = "",
) -> dict[str, str]:
    """The environment of a child: this process's, plus what `bench.yaml` refers to (an empty
    `otlp_endpoint`: no export). `production`: the JSON access log on, at level info.
    `redis_url`: the limits and budgets in that Redis (empty: in memory)."""
    env = {
        **os.environ,
        "BENCH_FAKE_URL": fake_url,
        "BENCH_GATEWAY_PORT": str(gateway_port),
        "BENCH_OTLP_ENDPOINT": otlp_endpoint,
        "BENCH_ACCESS_LOG": "true" if production else "false",
        "BENCH_LOG_LEVEL": "info" if production else "warning",
        "BENCH_STATE_BACKEND": "redis" if redis_url else "memory",
    }
    if redis_url:
        env["BENCH_REDIS_URL"] = redis_url
    return env


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
    """A subprocess this benchmark started, where it listens, and the file its output goes to.
    `charged_pid` is the process whose cost is measured (nginx: its worker, once known)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str
    charged_pid: int = 0

    def __post_init__(self) -> None:
        self.charged_pid = self.charged_pid or self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str], url: str) -> Service:
    """Run `argv` (an absolute program path first) with its output in `log`."""
    # Appending: nginx writes its error log to the same file.
    with log.open("ab") as out:
        # A new session: Ctrl-C reaches only the benchmark, which then stops these in order;
        # and the process group is the child's own, for `stop` to kill whatever it forked.
        proc = subprocess.Popen(  # noqa: S603  (our own interpreter, or nginx; no shell)
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=_IMPORT_ROOT,
            env=dict(env),
            start_new_session=True,
        )
    return Service(name, proc, log, url)


def gateway_argv(*argv: str) -> list[str]:
    """`python -m gateway *argv` with this interpreter."""
    return [sys.executable, "-m", "gateway", *argv]


def stop(service: Service) -> None:
    """SIGTERM, then SIGKILL to its whole process group after STOP_TIMEOUT_S (an nginx
    worker outlives a killed master); nothing when it has exited already."""
    proc = service.proc
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass(slots=True)
class Services:
    """The fake provider and the targets in front of it, by target name."""

    fake: Service
    proxies: dict[str, Service] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Layout:
    """What to start: the proxy targets, where their files go, the OTLP endpoint of the
    gateways (empty: none) and how many streams one target must hold at once."""

    directory: Path
    targets: Sequence[str]
    otlp_endpoint: str
    streams: int


@contextlib.contextmanager
def running_services(layout: Layout) -> Iterator[Services]:
    """The fake provider and each proxy target in `layout`, on free loopback ports; all
    stopped (the proxies first) when the block ends, however it ends. Not waited for: see
    `wait_all_ready`. Raises BenchError, before anything starts, when a config does not
    validate or nginx is missing or refuses its config."""
    proxies = [t for t in layout.targets if t != "direct"]
    fake_port, *ports = free_ports(1 + len(proxies))
    fake_url = f"http://127.0.0.1:{fake_port}"
    started: list[Service] = []
    with contextlib.ExitStack() as stack:
        config = stack.enter_context(resources.as_file(bench_config()))
        redis_url = ""
        if "gateway-budget-redis" in proxies:
            redis_url = stack.enter_context(_redis(layout.directory))
        plans = [
            _plan(name, port, fake_port, layout, config, redis_url)
            for name, port in zip(proxies, ports, strict=True)
        ]
        try:
            argv = gateway_argv("fake-provider", "--host", "127.0.0.1", "--port", str(fake_port))
            env = child_environment(fake_url, 0, "")
            started.append(
                spawn("fake provider", argv, layout.directory / "fake.log", env, fake_url)
            )
            services = Services(started[0])
            for plan in plans:
                log = layout.directory / f"{plan.name}.log"
                started.append(spawn(plan.name, plan.argv, log, plan.env, plan.url))
                services.proxies[plan.name] = started[-1]
            yield services
        finally:
            for service in reversed(started):
                stop(service)


@dataclass(frozen=True, slots=True)
class _Plan:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str


@contextlib.contextmanager
def _redis(directory: Path) -> Iterator[str]:
    """A redis-server on a free loopback port until the block ends (its URL). Raises
    BenchError when there is none to run."""
    binary = find_binary("redis-server")
    if binary is None:
        raise BenchError("gateway-budget-redis needs redis-server on PATH")
    (directory / "redis").mkdir(exist_ok=True)
    server = RedisServer(binary, directory / "redis")
    try:
        try:
            server.start()
        except ServerStartError as exc:
            raise BenchError(f"redis-server did not start: {exc}") from None
        yield server.url
    finally:
        server.stop()


def _plan(
    name: str, port: int, fake_port: int, layout: Layout, config: Path, redis_url: str = ""
) -> _Plan:
    """How to start one proxy target; its config written and checked by nginx -t (nginx) or
    validated by the gateway's loader (the gateways) first. Raises BenchError."""
    fake_url = f"http://127.0.0.1:{fake_port}"
    url = f"http://127.0.0.1:{port}"
    if name == "nginx":
        binary = nginx.nginx_binary()
        log = layout.directory / "nginx.log"
        conf = nginx.write_config(layout.directory / "nginx", log, port, fake_port, layout.streams)
        nginx.check_config(binary, conf, log)
        return _Plan(name, nginx.nginx_argv(binary, conf, log), dict(os.environ), url)
    env = child_environment(
        fake_url,
        port,
        layout.otlp_endpoint,
        name == "gateway-prod",
        redis_url if name == "gateway-budget-redis" else "",
    )
    validate_config(config, env)
    return _Plan(
        name, gateway_argv("serve", "--config", str(config), "--port", str(port)), env, url
    )


async def wait_all_ready(services: Services) -> None:
    """Every service answers; then each nginx target is charged to its worker. Raises
    BenchError as `wait_ready` does."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + READY_TIMEOUT_S
        await wait_ready(session, services.fake, "/v1/models", deadline)
        for name, service in services.proxies.items():
            await wait_ready(session, service, _READY_PATHS[name], deadline)
    if "nginx" in services.proxies:
        master = services.proxies["nginx"]
        master.charged_pid = nginx.worker_pid(master.proc.pid)


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
