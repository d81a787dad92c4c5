"""`gateway demo`: the fake provider and the gateway on loopback, and a real streamed completion
through the gateway with the official openai SDK, printed token by token with its TTFT."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.appkeys import OPS
from gateway.config import ConfigError, build_runtime, load_config
from gateway.fake import FakeProvider, start_fake_provider
from gateway.logs import configure_logging

DEMO_CALLER_KEY = "demo-key-not-secret"  # its sha256 is in config/demo.yaml


async def _demo(config_path: str, prompt: str, chunks: int, gap_ms: int) -> int:
    try:
        from openai import AsyncOpenAI  # noqa: PLC0415  (a client-side extra)
    except ImportError:
        print("the demo needs the openai SDK: pip install 'llm-stream-gateway[clients]'")
        return 2
    fake_runner, fake_url = await start_fake_provider(FakeProvider())
    env = {
        **os.environ,
        "FAKE_PROVIDER_URL": fake_url,
        "GATEWAY_PORT": "0",
        "GATEWAY_ADMIN_PORT": "0",
    }
    try:
        runtime = build_runtime(load_config(config_path, env=env))
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        await fake_runner.cleanup()
        return 2
    # Access logs would interleave with the tokens; the demo prints its own summary.
    configure_logging("console", "warning")
    app = create_app(runtime)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    gateway_url = f"http://{host}:{port}"
    print(f"fake provider: {fake_url}   gateway: {gateway_url}   config: {config_path}")
    if app[OPS].admin_url:
        print(f"admin listener: {app[OPS].admin_url}  (/metrics, /readyz; /status with the token)")
    print(f"POST {gateway_url}/v1/chat/completions  model=gpt-4o-mini  stream=true")
    client = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=DEMO_CALLER_KEY, max_retries=0)
    try:
        # One tiny stream first: the SDK's first streamed call pays ~100 ms of one-time set-up
        # (lazy imports, model classes, connection pools) that is not the gateway's.
        warm = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "warm-up"}],
            stream=True,
            extra_headers={"x-fake-chunks": "1"},
        )
        async for _ in warm:
            pass
        started = time.perf_counter()
        ttft: float | None = None
        n = 0
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-chunks": str(chunks), "x-fake-gap-ms": str(gap_ms)},
        )
        usage = None
        finish = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    n += 1
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
                finish = choice.finish_reason or finish
        total = time.perf_counter() - started
        print()
        print(
            f"-- {n} chunks, TTFT {ttft * 1000 if ttft else float('nan'):.1f} ms "
            "(client-observed, after one warm-up request), "
            f"total {total * 1000:.1f} ms, finish_reason={finish}, "
            f"usage={usage.prompt_tokens if usage else '?'} in / "
            f"{usage.completion_tokens if usage else '?'} out"
        )
        return 0 if n == chunks and finish == "stop" else 1
    finally:
        await client.close()
        await runner.cleanup()
        await fake_runner.cleanup()


def run_demo(config_path: str, *, prompt: str, chunks: int, gap_ms: int) -> int:
    if not Path(config_path).exists():
        print(f"gateway: {config_path} not found (run from the repository root)", file=sys.stderr)
        return 2
    return asyncio.run(_demo(config_path, prompt, chunks, gap_ms))
