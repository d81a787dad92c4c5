"""Log hygiene, last in the run (the file name sorts after every other test file).

A whole mixed workload (clean, retried and killed streams, client cancels, a revoked key, an
upstream error echoing a key, rate limits, bad API keys, JWTs good and bad, bad JSON,
embeddings, Anthropic) runs twice: against the gateway in this process with logging
configured exactly as in production (JSON, debug level, stderr captured at the file
descriptor), and against a real `python -m gateway serve` process (its own log file, a config
reload rejected, a drain on SIGTERM). Not one caller key, upstream key, JWT, JWT secret,
canary prompt or completion text may appear in either output; and the output must hold one
access line per request, so the check cannot pass on an empty log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import structlog
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.appkeys import OUTCOME_SINKS
from gateway.fake import fake_tokens
from gateway.logs import configure_logging
from gateway.report import Report
from tests.support import (
    ANTHROPIC_KEYS,
    CALLER_KEY,
    JWT_TEST_SECRET,
    OTHER_CALLER_KEY,
    PROMPT_CANARIES,
    REVOKED_KEYS,
    UNKNOWN_CALLER_KEY,
    UPSTREAM_KEYS,
    Fake,
    GatewayFactory,
    Served,
    base_config,
    deep_merge,
    one_bad_key,
    sensitive_strings,
    serve_gateway,
    sha,
)

ROOT = Path(__file__).parents[1]
ISSUER = "https://idp.hygiene.test/"
AUDIENCE = "llm-gateway"
# Completion text: the fake's first tokens, as a client would read them joined.
COMPLETION = "".join(fake_tokens(3))
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def hygiene_extra(fake_url: str) -> dict[str, Any]:
    return {
        "auth": {
            "api_keys": [
                {"id": "test-app", "sha256": sha(CALLER_KEY)},
                {"id": "limited-app", "sha256": sha(OTHER_CALLER_KEY), "tier": "one"},
            ],
            "jwt": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "algorithms": ["HS256"],
                "secret": JWT_TEST_SECRET,
            },
        },
        "tiers": {"one": {"requests_per_minute": 1}},
        **one_bad_key(fake_url),
        "policy": {"timeouts": {"chunk_s": 0.3}},
        "telemetry": {"log_format": "json", "log_level": "debug", "access_log": True},
    }


def token(secret: str = JWT_TEST_SECRET, *, expires_in: float = 300) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "jwt-user-1",
        "iat": now,
        "exp": now + int(expires_in),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass
class Workload:
    """The requests sent and the credentials minted for them."""

    url: str
    sent: int = 0
    tokens: list[str] = field(default_factory=list)
    _prompts: Iterator[str] = field(default_factory=lambda: itertools.cycle(PROMPT_CANARIES))

    def secrets(self) -> frozenset[str]:
        extra = [*self.tokens, *(t.rsplit(".", 1)[1] for t in self.tokens)]
        # A partial key (providers echo "sk-...1111") must not show up either.
        partial = [k[-8:] for k in (*UPSTREAM_KEYS, *REVOKED_KEYS, *ANTHROPIC_KEYS)]
        return sensitive_strings((*extra, *partial, COMPLETION))

    def chat(self, model: str = "gpt-test", *, stream: bool = True) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": next(self._prompts)},
                {"role": "user", "content": next(self._prompts)},
            ],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def post(
        self,
        session: aiohttp.ClientSession,
        path: str,
        data: bytes,
        headers: dict[str, str],
        expect: int,
    ) -> bytes:
        self.sent += 1
        async with session.post(self.url + path, data=data, headers=headers) as resp:
            body = await resp.read()
            assert resp.status == expect, body[:500]
            return body

    async def run(self) -> None:
        bearer = {"authorization": f"Bearer {CALLER_KEY}"}
        chat = "/v1/chat/completions"
        good, forged, expired = (
            token(),
            token("a-different-secret-of-at-least-32-bytes!"),
            token(expires_in=-3600),
        )
        self.tokens += [good, forged, expired]
        async with aiohttp.ClientSession() as s:
            await self.post(s, chat, self.chat(), {**bearer, "x-fake-chunks": "3"}, 200)
            await self.post(s, chat, self.chat(stream=False), bearer, 200)
            anthropic = orjson.dumps(
                {
                    "model": "claude-test",
                    "max_tokens": 20,
                    "stream": True,
                    "messages": [{"role": "user", "content": next(self._prompts)}],
                }
            )
            await self.post(
                s,
                "/v1/messages",
                anthropic,
                {"x-api-key": CALLER_KEY, "anthropic-version": "2023-06-01"},
                200,
            )
            plan = orjson.dumps([{"status": 500}, {}]).decode()
            retried = {**bearer, "x-fake-plan": plan, "x-fake-session": f"h{id(self)}"}
            await self.post(s, chat, self.chat(), retried, 200)
            await self.post(s, chat, self.chat("one-bad-key"), bearer, 200)
            # The upstream's in-band error echoes a key: relayed to the client, never logged.
            echo = f"Incorrect API key provided: {UPSTREAM_KEYS[1]}"
            error = {**bearer, "x-fake-error-after": "1", "x-fake-error-message": echo}
            await self.post(s, chat, self.chat(), error, 200)
            await self.post(s, chat, self.chat(), {**bearer, "x-fake-status": "400"}, 400)
            await self.post(s, chat, self.chat(), {**bearer, "x-fake-stall-after": "1"}, 200)
            await self.cancel(s, self.chat(), bearer)
            unknown = {"authorization": f"Bearer {UNKNOWN_CALLER_KEY}"}
            await self.post(s, chat, self.chat(), unknown, 401)
            await self.post(s, chat, self.chat(), {}, 401)
            limited = {"authorization": f"Bearer {OTHER_CALLER_KEY}"}
            await self.post(s, chat, self.chat(), limited, 200)
            await self.post(s, chat, self.chat(), limited, 429)
            await self.post(s, chat, self.chat(), {"authorization": f"Bearer {good}"}, 200)
            await self.post(s, chat, self.chat(), {"authorization": f"Bearer {forged}"}, 401)
            await self.post(s, chat, self.chat(), {"authorization": f"Bearer {expired}"}, 401)
            embed = orjson.dumps({"model": "embed-test", "input": next(self._prompts)})
            await self.post(s, "/v1/embeddings", embed, bearer, 200)
            await self.post(s, chat, self.chat("no-such-model"), bearer, 404)
            broken = b'{"model": "gpt-test", "messages": [' + next(self._prompts).encode()
            await self.post(s, chat, broken, bearer, 400)

    async def cancel(self, s: aiohttp.ClientSession, data: bytes, headers: dict[str, str]) -> None:
        self.sent += 1
        resp = await s.post(
            self.url + "/v1/chat/completions",
            data=data,
            headers={**headers, "x-fake-stall-after": "2"},
        )
        assert resp.status == 200
        seen = 0
        async for piece in resp.content.iter_any():
            seen += piece.count(b"\n\n")
            if seen >= 3:
                break
        resp.close()


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


def assert_clean(text: str, secrets: frozenset[str], where: str) -> None:
    leaked = sorted(s for s in secrets if s in text)
    assert not leaked, f"{where} logs contain {leaked}"


ACCESS_FIELDS = (
    "caller",
    "model",
    "deployment",
    "key_id",
    "status",
    "outcome",
    "attempts",
    "duration_ms",
)


def assert_access_lines(lines: list[dict[str, Any]], sent: int) -> list[dict[str, Any]]:
    access = [line for line in lines if line.get("event") == "request"]
    assert len(access) == sent, f"{len(access)} access lines for {sent} requests"
    for line in access:
        assert line["level"] == "info"
        for name in ACCESS_FIELDS:
            assert name in line, f"access line without {name}: {line}"
    ok = [a for a in access if a["outcome"] == "ok" and a["stream"] and a["caller"] == "test-app"]
    assert ok
    for line in ok:
        for name in ("ttft_ms", "input_tokens", "output_tokens", "overhead_ms", "key_fp"):
            assert name in line, f"ok stream access line without {name}: {line}"
    outcomes = {a["outcome"] for a in access}
    assert {"ok", "chunk_timeout", "client_cancel", "authentication", "rate_limited"} <= outcomes
    return access


@contextlib.contextmanager
def production_logging() -> Iterator[None]:
    """structlog as the CLI configures it (JSON to stderr, debug level), the defaults again
    afterwards. Entered inside the test: the logger factory binds the stderr of the moment,
    which must be capfd's for this test's call phase."""
    configure_logging("json", "debug")
    try:
        yield
    finally:
        structlog.reset_defaults()


async def test_in_process_logs_hold_no_secret_or_prompt(
    gateway_factory: GatewayFactory,
    fake: Fake,
    capfd: pytest.CaptureFixture[str],
) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    gw = await gateway_factory(hygiene_extra(fake.url), tracer_provider=provider)
    finished: list[Report] = []
    gw.app[OUTCOME_SINKS].append(lambda o, _now: finished.append(o))
    work = Workload(gw.url)
    with production_logging():
        await work.run()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while len(finished) < work.sent and loop.time() < deadline:
            await asyncio.sleep(0.01)
        captured = capfd.readouterr()
    assert len(finished) == work.sent
    text = captured.out + captured.err
    assert_clean(text, work.secrets() | {k.decode() for k in gw.runtime.secrets}, "in-process")
    lines = json_lines(captured.err)
    access = assert_access_lines(lines, work.sent)

    # Every access line of a traced request carries its trace and span ids; warnings and
    # errors carry the trace id of the request they belong to.
    traced = {a["trace_id"] for a in access if "trace_id" in a}
    for line in access:
        assert HEX32.match(line["trace_id"]) and HEX16.match(line["span_id"]), line
    notable = [line for line in lines if line["level"] in ("warning", "error")]
    events = {line["event"] for line in notable}
    assert {"upstream key disabled", "stream killed"} <= events
    for line in notable:
        assert line.get("trace_id") in traced, f"no request trace id: {line}"
        assert HEX16.match(line["span_id"])


@pytest.fixture
async def served(fake: Fake, tmp_path: Path) -> AsyncIterator[Served]:
    config = deep_merge(base_config(fake.url), hygiene_extra(fake.url))
    async with serve_gateway(config, tmp_path) as gw:
        yield gw


async def test_served_process_logs_hold_no_secret_or_prompt(served: Served) -> None:
    work = Workload(served.url)
    await work.run()
    # A rejected reload: the error names the bad field, never a secret next to it.
    config = yaml.safe_load(served.config.read_text())
    config["providers"]["oa"]["keys"][0]["weight"] = "heavy"
    served.config.write_text(yaml.safe_dump(config))
    served.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if b"config reload rejected" in served.log.read_bytes():
            break
        await asyncio.sleep(0.05)
    # Every answer of the admin listener after that workload (a stream open and cancelled,
    # the rejected reload on /status): no secret, no caller key, no prompt either.
    answers = await admin_answers(served, work)
    assert "weight" in answers  # /status shows the rejection
    assert_clean(answers, work.secrets(), "admin listener")
    served.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.proc.wait, 15) == 0

    text = served.log.read_text()
    assert "config reload rejected" in text and "weight" in text
    assert_clean(text, work.secrets(), "served")
    lines = json_lines(text)
    assert_access_lines(lines, work.sent)
    assert {"upstream key disabled", "stream killed", "gateway starting"} <= {
        line["event"] for line in lines
    }


async def admin_answers(served: Served, work: Workload) -> str:
    """The text of every admin endpoint's answer, with and without the token, while one of
    the workload's streams is open (it shows in /admin/streams, then is cancelled)."""
    texts: list[str] = []
    headers = served.admin_headers
    async with aiohttp.ClientSession() as session:
        body = work.chat()
        work.sent += 1
        async with session.post(
            served.url + "/v1/chat/completions",
            data=body,
            headers={
                "authorization": f"Bearer {CALLER_KEY}",
                "content-type": "application/json",
                "x-fake-chunks": "200",
                "x-fake-gap-ms": "20",
            },
        ) as stream:
            assert stream.status == 200
            await stream.content.readany()
            stream_id = stream.headers["x-gateway-stream-id"]
            for path in (
                "/metrics",
                "/healthz",
                "/readyz",
                "/admin/keys",
                "/admin/streams",
                "/admin/limits/test-app",
                "/status",
                "/status/data",
            ):
                for auth in (headers, {}):
                    async with session.get(served.admin_url + path, headers=auth) as resp:
                        texts.append(await resp.text())
            assert stream_id in "".join(texts)
            cancel = f"{served.admin_url}/admin/streams/{stream_id}/cancel"
            async with session.post(cancel, headers=headers) as resp:
                assert resp.status == 200
                texts.append(await resp.text())
            texts.append((await stream.read()).decode())
    return "\n".join(texts)


async def test_access_line_bytes_out_counts_every_byte_sent(
    gateway_factory: GatewayFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    gw = await gateway_factory()
    body = orjson.dumps(
        {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    with production_logging():
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gw.url + "/v1/chat/completions",
                data=body,
                headers={"authorization": f"Bearer {CALLER_KEY}", "x-fake-chunks": "4"},
            ) as resp,
        ):
            received = await resp.read()
        await asyncio.sleep(0.05)
        err = capfd.readouterr().err
    (line,) = [x for x in json_lines(err) if x.get("event") == "request"]
    assert line["outcome"] == "ok"
    assert line["bytes_out"] == len(received)
