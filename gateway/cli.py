"""Command line: `gateway serve | check-config | fake-provider | demo | bench`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.config import ConfigError, build_runtime
from gateway.config.loader import load_config_checked
from gateway.config.schema import GatewayConfig
from gateway.logs import configure_logging, get_logger


def _install_uvloop() -> None:
    try:
        import uvloop  # noqa: PLC0415  (optional speed-up)
    except ImportError:
        return
    uvloop.install()


def _supervise(args: argparse.Namespace, workers: int) -> int:
    """`server.workers` > 1: start that many worker processes on the same port (SO_REUSEPORT)
    and pass SIGTERM / SIGINT / SIGHUP on to them. Returns when every worker has exited."""
    argv = [sys.executable, "-m", "gateway", "serve", "--config", args.config, "--worker"]
    if args.host:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.no_uvloop:
        argv.append("--no-uvloop")
    # Worker k's admin listener (if any) is on admin.port + k: each is scraped on its own.
    children = [
        subprocess.Popen([*argv, "--worker-index", str(k)])  # noqa: S603  (our own CLI)
        for k in range(workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _for_this_worker(config: GatewayConfig, index: int) -> GatewayConfig:
    """Worker `index` of `server.workers` listens for admin on `admin.port + index`."""
    if not index or config.admin is None or not config.admin.port:
        return config
    admin = config.admin.model_copy(update={"port": config.admin.port + index})
    return config.model_copy(update={"admin": admin})


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import build_state, create_app  # noqa: PLC0415
    from gateway.appkeys import OPS  # noqa: PLC0415
    from gateway.ops import ConfigState  # noqa: PLC0415
    from gateway.reload import Reloader, log_config_warnings  # noqa: PLC0415
    from gateway.serving import header_field_limit, make_runner, serve  # noqa: PLC0415

    try:
        loaded = load_config_checked(args.config)
        config = loaded.config
        if config.server.workers > 1 and not args.worker:
            # Each worker builds its own state (connections, Redis clients) after it starts.
            return _supervise(args, config.server.workers)
        config = _for_this_worker(config, args.worker_index)
        health, limiter = build_state(config)
        runtime = build_runtime(config, health=health)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(runtime.telemetry.log_format, runtime.telemetry.log_level)
    log = get_logger("gateway")
    log_warnings = log_config_warnings

    log_warnings(loaded.warnings)
    state = ConfigState(str(Path(args.config).resolve()), time.time(), loaded.digest)
    app = create_app(runtime, limiter, config_state=state)

    async def reloads(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if app[OPS].admin_url:
            log.info("admin listener started", url=app[OPS].admin_url)
        reloader = Reloader(app, args.config, lambda c: _for_this_worker(c, args.worker_index))
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger, "sighup")
        reloader.start_watching()
        yield
        loop.remove_signal_handler(signal.SIGHUP)
        await reloader.close()

    app.cleanup_ctx.append(reloads)
    if not args.no_uvloop:
        _install_uvloop()
    host = args.host or runtime.server.host
    port = args.port if args.port is not None else runtime.server.port
    jwt = runtime.config.auth.jwt
    runner = make_runner(
        app,
        keepalive_timeout_s=runtime.server.keepalive_timeout_s,
        # Header lines must fit the largest token the configuration accepts.
        max_field_size=header_field_limit(jwt.max_token_bytes if jwt else 0),
        shutdown_timeout_s=runtime.server.drain_timeout_s,
    )
    log.info("gateway starting", host=host, port=port, models=len(runtime.routes))
    asyncio.run(serve(runner, host, port, backlog=runtime.server.backlog, reuse_port=args.worker))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        loaded = load_config_checked(args.config)
        runtime = build_runtime(loaded.config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    for warning in loaded.warnings:
        print(f"gateway: warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: OK ({len(runtime.routes)} models, {len(runtime.providers)} providers, "
        f"{len(runtime.callers)} API keys)"
    )
    return 0


def cmd_fake_provider(args: argparse.Namespace) -> int:
    from gateway.fake import run_fake_provider  # noqa: PLC0415

    if not args.no_uvloop:
        _install_uvloop()
    run_fake_provider(args.host, args.port, Path(args.recordings) if args.recordings else None)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the gateway's /healthz answers 200 in time (the container HEALTHCHECK)."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    if not args.url.startswith(("http://", "https://")):
        print("healthcheck: --url must be http(s)", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:  # noqa: S310
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo  # noqa: PLC0415

    return run_demo(args.config, prompt=args.prompt, chunks=args.chunks, gap_ms=args.gap_ms)


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.bench import run_bench  # noqa: PLC0415

    return run_bench(args)


def cmd_bench_limiter(args: argparse.Namespace) -> int:
    from gateway.bench.limiter import run_bench_limiter  # noqa: PLC0415

    return run_bench_limiter(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", "-c", default="config/gateway.yaml")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("fake-provider", help="run the scriptable fake OpenAI/Anthropic upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9911)
    p.add_argument("--recordings", help="directory of recorded streams it may replay")
    p.add_argument("--no-uvloop", action="store_true")
    p.set_defaults(func=cmd_fake_provider)

    p = sub.add_parser("healthcheck", help="exit 0 if the gateway answers /healthz")
    p.add_argument("--url", default="http://127.0.0.1:8080/healthz")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_healthcheck)

    p = sub.add_parser("demo", help="stream a completion through the gateway to the fake provider")
    p.add_argument("--config", default="config/demo.yaml")
    p.add_argument("--prompt", default="Say hello through the gateway.")
    p.add_argument("--chunks", type=int, default=24)
    p.add_argument("--gap-ms", type=int, default=40)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark the gateway against nginx and the fake provider")
    p.add_argument("--concurrency", default="1,50,200", help="comma-separated concurrency levels")
    p.add_argument("--gaps", default="0,20", help="comma-separated upstream chunk gaps (ms)")
    p.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    p.add_argument(
        "--streams", type=int, default=0, help="streams per run (default: max(200, 4 x conc))"
    )
    p.add_argument("--max-seconds", type=float, default=60, help="time bound of each run")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument(
        "--tracing",
        action="store_true",
        help="the gateways export every trace (100 %% sampled) to a local OTLP sink",
    )
    p.add_argument(
        "--targets",
        help="comma-separated, of direct,nginx,gateway,gateway-prod,gateway-budget,"
        "gateway-budget-redis "
        "(default: direct,nginx,gateway; with --soak: gateway)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of each target per cell")
    p.add_argument("--soak", type=int, default=0, help="hold N slow streams through each target")
    p.add_argument("--soak-chunks", type=int, default=30, help="content chunks per soak stream")
    p.add_argument("--soak-gap-ms", type=int, default=1000, help="gap between soak events (ms)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bench-limiter", help="what a limit check adds per request (memory vs Redis)"
    )
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument(
        "--concurrency",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 32],
        help="comma-separated concurrency levels",
    )
    p.add_argument("--redis-url", help="an existing Redis (default: start redis-server here)")
    p.set_defaults(func=cmd_bench_limiter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
