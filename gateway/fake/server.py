"""The fake upstream server: `FakeProvider` (its routes, key checks, scripts, records and
counters) and the helpers that serve it on a real socket."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from gateway.fake.answers import body_payload, stream_plan, streams
from gateway.fake.errors import ErrorAnswer, Reject
from gateway.fake.recordings import Recordings
from gateway.fake.records import RequestRecord
from gateway.fake.respond import Exchange, send_error, serve_body, serve_stream
from gateway.fake.script import FakeScript, ScriptError, build_script, split_model
from gateway.fake.wire import Api, StreamPlan, Wire, rand_id


class FakeProvider:
    """A scripted fake OpenAI + Anthropic upstream; one instance per server.

    ``keys``: accepted API keys (``Authorization: Bearer`` on OpenAI routes; ``x-api-key``,
    else ``Authorization: Bearer``, on Anthropic routes); ``None`` accepts any non-empty key.
    A missing or rejected key is a 401 in the route's error format. ``recordings_dir``: where
    ``replay`` names resolve. ``record_sent=False`` keeps ``RequestRecord.sent`` empty, for
    long benchmarks where holding every body would grow memory; ``max_records`` bounds the
    records kept (the newest are kept; counters still count everything).

    State (records, counters, per-session attempt counts) lives on the instance; `reset`
    clears it. Use `make_app` to build the aiohttp application, or `start_fake_provider`.
    """

    def __init__(
        self,
        keys: set[str] | None = None,
        recordings_dir: Path | None = None,
        *,
        record_sent: bool = True,
        max_records: int | None = None,
    ) -> None:
        self.keys: frozenset[str] | None = frozenset(keys) if keys is not None else None
        self.recordings_dir = recordings_dir
        self.record_sent = record_sent
        self.max_records = max_records
        self.records: list[RequestRecord] = []
        self.open_streams = 0
        self.max_open_streams = 0
        self.requests = 0
        self.disconnects = 0
        self.by_path: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self._sessions: dict[str, int] = {}
        self._recordings = Recordings()
        self._waiters: list[asyncio.Future[None]] = []

    # ---- public helpers ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every record, counter and session attempt count (replay cache is kept).

        Streams still in flight keep their records but are no longer listed; the open-stream
        gauge keeps counting them, and ``max_open_streams`` restarts from it.
        """
        self.records.clear()
        self.requests = 0
        self.disconnects = 0
        self.max_open_streams = self.open_streams
        self.by_path.clear()
        self.by_key.clear()
        self.by_status.clear()
        self._sessions.clear()
        self._notify()

    def stats(self) -> dict[str, Any]:
        """The counters served by ``GET /_fake/stats`` (keys are listed raw: they are the
        fake's own test keys, and out-of-process tests need to see which one was used)."""
        return {
            "requests": self.requests,
            "open_streams": self.open_streams,
            "max_open_streams": self.max_open_streams,
            "disconnects": self.disconnects,
            "by_path": dict(self.by_path),
            "by_key": dict(self.by_key),
            "by_status": {str(k): v for k, v in self.by_status.items()},
        }

    # A plain timeout argument (not asyncio.timeout) keeps test call sites one line.
    async def wait_for_records(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[RequestRecord]:
        """Wait until at least ``n`` requests were recorded; return the first ``n`` records.

        Raises `TimeoutError` after ``timeout`` seconds.
        """
        await self.wait_until(lambda: len(self.records) >= n, timeout)
        return self.records[:n]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - see wait_for_records
    ) -> None:
        """Wait until ``predicate()`` is true, re-checking whenever any record changes.

        Records change when a request arrives, is answered, ends or disconnects. Raises
        `TimeoutError` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake provider: condition not met within {timeout} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                continue
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this provider's routes."""
        # Anthropic accepts 32 MB requests; long-prompt tests need more than aiohttp's 1 MB.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handler("openai", "chat"))
        app.router.add_post("/v1/completions", self._handler("openai", "completions"))
        app.router.add_post("/v1/responses", self._handler("openai", "responses"))
        app.router.add_post("/v1/embeddings", self._handler("openai", "embeddings"))
        app.router.add_get("/v1/models", self._handler("openai", "models"))
        app.router.add_post("/v1/messages", self._handler("anthropic", "messages"))
        app.router.add_post("/v1/messages/count_tokens", self._handler("anthropic", "count"))
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_post("/_fake/reset", self._handle_reset)
        return app

    # ---- bookkeeping --------------------------------------------------------------------------

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _mark_disconnected(self, record: RequestRecord) -> None:
        if record.disconnected or record.completed:
            return
        record.disconnected = True
        record.disconnected_at = asyncio.get_running_loop().time()
        record.outcome = "disconnected"
        self.disconnects += 1

    def _stream_opened(self) -> None:
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)

    # ---- control routes ---------------------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _handle_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    # ---- API routes ---------------------------------------------------------------------------

    def _handler(
        self, wire: Wire, api: Api
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, wire, api)

        return handle

    async def _handle(self, request: web.Request, wire: Wire, api: Api) -> web.StreamResponse:
        record = self._arrived(request)
        try:
            return await self._serve(request, wire, api, record)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away: record it, never swallow.
            self._mark_disconnected(record)
            raise
        finally:
            record.ended_at = asyncio.get_running_loop().time()
            if record.status:
                self.by_status[record.status] = self.by_status.get(record.status, 0) + 1
            self._notify()

    def _arrived(self, request: web.Request) -> RequestRecord:
        """Record and count a request that has just arrived."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RequestRecord(
            path=request.path,
            method=request.method,
            headers=headers,
            started_at=asyncio.get_running_loop().time(),
        )
        record.request_id = "req_" + rand_id()
        session = headers.get("x-fake-session")
        if session is not None:
            record.session = session
            record.attempt = self._sessions.get(session, 0)
            self._sessions[session] = record.attempt + 1
        self.records.append(record)
        cap = self.max_records
        if cap is not None and len(self.records) > 2 * cap:
            # Trim in batches: a long-running fake keeps the newest records, bounded memory.
            del self.records[:-cap]
        self.requests += 1
        self.by_path[record.path] = self.by_path.get(record.path, 0) + 1
        self._notify()
        return record

    def _check_key(self, wire: Wire, headers: Mapping[str, str], record: RequestRecord) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        key: str | None
        if wire == "openai":
            key = bearer
            missing = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            # anthropic-sdk-python 2.x sends api_key as a Bearer token, older ones x-api-key.
            key = headers.get("x-api-key") or bearer
            missing = "x-api-key header is required"
        if key is None:
            raise Reject(401, missing)
        record.api_key = key
        self.by_key[key] = self.by_key.get(key, 0) + 1
        if self.keys is not None and key not in self.keys:
            raise Reject(401)

    async def _serve(
        self, request: web.Request, wire: Wire, api: Api, record: RequestRecord
    ) -> web.StreamResponse:
        ex = Exchange(
            request=request,
            wire=wire,
            record=record,
            keep_sent=self.record_sent,
            disconnected=self._mark_disconnected,
            changed=self._notify,
        )
        # Read the body even when the key is bad, so that the record shows what was sent.
        record.body = await request.read()
        try:
            self._check_key(wire, record.headers, record)
            body = _parse_body(record, api)
            model = _parse_model(record, body)
        except ScriptError as exc:
            return await send_error(ex, ErrorAnswer(400, str(exc), param=exc.param))
        except Reject as rej:
            return await send_error(ex, rej.answer)
        record.stream = record.script.replay is not None or (
            streams(api) and body.get("stream") is True
        )
        if not record.stream:
            return await self._answer_body(ex, api, body, model)
        self._stream_opened()
        try:
            return await self._answer_stream(ex, api, body, model)
        finally:
            self.open_streams -= 1

    async def _answer_body(
        self, ex: Exchange, api: Api, body: Mapping[str, Any], model: str
    ) -> web.StreamResponse:
        record = ex.record
        try:
            payload = (
                b"" if _status_scripted(record.script) else body_payload(api, body, model, record)
            )
        except Reject as rej:
            return await send_error(ex, rej.answer)
        return await serve_body(ex, payload)

    async def _answer_stream(
        self, ex: Exchange, api: Api, body: Mapping[str, Any], model: str
    ) -> web.StreamResponse:
        record = ex.record
        plan: StreamPlan | None
        try:
            if _status_scripted(record.script):
                plan = None
            elif record.script.replay is not None:
                plan = await self._recordings.plan(self.recordings_dir, api, record)
            else:
                plan = stream_plan(api, body, model, record)
        except Reject as rej:
            return await send_error(ex, rej.answer)
        return await serve_stream(ex, plan)


def _status_scripted(script: FakeScript) -> bool:
    """Whether a scripted status answers instead of the API (nothing to build)."""
    return script.status is not None or script.raw_status is not None


def _parse_body(record: RequestRecord, api: Api) -> dict[str, Any]:
    """Parse the request body once into ``record.json``; GET /v1/models has none."""
    if api == "models":
        return {}
    try:
        parsed = orjson.loads(record.body)
    except orjson.JSONDecodeError as exc:
        raise Reject(400, "We could not parse the JSON body of your request.") from exc
    record.json = parsed
    if not isinstance(parsed, dict):
        raise Reject(400, "The request body must be a JSON object.")
    return parsed


def _parse_model(record: RequestRecord, body: Mapping[str, Any]) -> str:
    """Record the echoed model name and the request's script; return the name.

    Raises `ScriptError` for a bad model name suffix, ``x-fake-*`` header or plan.
    """
    model_field = body.get("model")
    model, suffix = split_model(model_field if isinstance(model_field, str) else "fake-model")
    record.model = model
    record.script = build_script(suffix, record.headers, record.attempt)
    return model


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_fake_provider(
    provider: FakeProvider,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> tuple[web.AppRunner, str]:
    """Serve ``provider`` on a real socket; return the runner and ``http://host:port``.

    OpenAI clients use ``<url>/v1`` as base URL, Anthropic clients ``<url>``. The runner uses
    ``handler_cancellation=True`` so that a client disconnect cancels the handler (and is
    recorded) even during a stall. The caller must ``await runner.cleanup()``; streams still
    open then are given ``shutdown_timeout`` seconds before they are cancelled.
    """
    runner = web.AppRunner(
        provider.make_app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _base_url(host, site.port)


_URL_RE: Final = re.compile(r"https?://[^\s,]+")


def run_fake_provider(host: str, port: int, recordings_dir: Path | None) -> None:
    """Serve a fresh `FakeProvider` until interrupted (the ``gateway fake-provider`` command).

    Accepts any non-empty key. Prints one line with the URL once listening.
    """
    # A long-lived process (demos, benchmarks, users' CI): bounded memory.
    provider = FakeProvider(recordings_dir=recordings_dir, record_sent=False, max_records=1000)

    def announce(message: str) -> None:
        urls = _URL_RE.findall(message)
        url = urls[0] if urls else _base_url(host, port)
        print(
            f"fake provider listening on {url} "
            f"(OpenAI base URL {url}/v1, Anthropic base URL {url})",
            flush=True,
        )

    web.run_app(
        provider.make_app(),
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        # aiohttp's default listen backlog (128) drops SYNs when hundreds of clients connect
        # at once; a dropped SYN costs the client a 1 s retransmit.
        backlog=1024,
        print=announce,
    )
