"""Client side of stream resumption: httpx transports that reattach a broken gateway stream.

With ``resume: {enabled: true}`` the gateway names every streamed answer
(``x-gateway-stream-id: gs_…``) and keeps its bytes after the client connection drops.
``GET <prefix>/v1/streams/{id}?offset=N``, with the credentials of the original request,
answers the stream from byte N on. These transports do that by themselves: the SDK above
them sees one unbroken body, with the original status and headers.

Usage (the official SDKs take an httpx client; current ones are built on ``httpx2``, older
ones on ``httpx``: this module uses ``httpx2`` when it is installed, else ``httpx``)::

    import anthropic, httpx2, openai
    from gateway.client import AsyncResumingTransport, ResumingTransport

    oa = openai.OpenAI(
        base_url="https://gateway.example/v1",
        api_key=KEY,
        http_client=httpx2.Client(transport=ResumingTransport()),
    )
    an = anthropic.Anthropic(
        base_url="https://gateway.example",
        api_key=KEY,
        http_client=httpx2.Client(transport=ResumingTransport()),
    )
    aoa = openai.AsyncOpenAI(
        base_url="https://gateway.example/v1",
        api_key=KEY,
        http_client=httpx2.AsyncClient(transport=AsyncResumingTransport()),
    )
    aan = anthropic.AsyncAnthropic(
        base_url="https://gateway.example",
        api_key=KEY,
        http_client=httpx2.AsyncClient(transport=AsyncResumingTransport()),
    )

What resumes. A body that breaks with ``ReadError`` (reset, broken pipe) or
``RemoteProtocolError`` (the peer closed before the end of the body) is resumed: both mean
the connection broke. A ``ReadTimeout`` (the request's own read timeout, e.g. the SDK's
``timeout=``) is resumed too, because a silently dead connection (a NAT or load balancer that
dropped it) looks exactly like that; but when a reattached stream also times out before a
single byte arrived, the ``ReadTimeout`` is raised: the stream is slow, not broken, and the
caller's timeout is honoured (it fires after at most twice its value). Nothing else resumes;
errors before the response headers are the SDK's to retry, as without this transport.

Reattaching. Each reattach is ``GET <prefix>/v1/streams/{id}?offset=<bytes yielded so far>``
through the inner transport, carrying the original request's ``Authorization``,
``x-api-key``, ``anthropic-version``, ``anthropic-beta`` and ``User-Agent`` headers and its
extensions (so its timeouts). ``<prefix>`` is what precedes the last ``/v1/`` in the original
path. The first reattach after a break is immediate; a failed one (connect error, timeout,
408/429/5xx) is retried after ``backoff_s``, doubling each time. A reattach answer is used
only when it is 200 ``text/event-stream`` and, if it says where it starts
(``x-gateway-stream-offset``), starts at the offset asked for. ``max_resumes`` bounds the
reattach requests of one stream in all; when they are spent, or the gateway answers that the
stream cannot be resumed (404 unknown or expired, 410 too large, 416, any other 4xx), the
error that broke the stream is raised, with a note saying why it was not resumed.

Untouched. A response that is not 200 ``text/event-stream`` with a well-formed stream id (and
no content-encoding) is returned as the inner transport gave it: the only cost is one header
lookup.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio

if TYPE_CHECKING:
    import httpx2 as httpx
else:
    try:
        import httpx2 as httpx
    except ImportError:  # the SDKs before httpx2 (openai 1.x, anthropic 0.x): the same API
        import httpx

__all__ = ["AsyncResumingTransport", "ResumingTransport"]

STREAM_ID_HEADER: Final = "x-gateway-stream-id"
# The gateway mints gs_ + 22 url-safe characters and accepts 16 to 64 of them.
_STREAM_ID: Final = re.compile(r"gs_[A-Za-z0-9_-]{16,64}")
OFFSET_HEADER: Final = "x-gateway-stream-offset"
# The request headers a reattach carries: the credentials (the gateway answers another
# caller 404) and the user agent (for its logs). Never the body's headers.
_CARRIED_HEADERS: Final = frozenset(
    {"authorization", "x-api-key", "anthropic-version", "anthropic-beta", "user-agent"}
)
# What a broken body raises (see the module docstring for why ReadTimeout is here).
_BREAKS: Final = (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout)
# Answers to a reattach worth another try: the gateway or the way to it is struggling.
_RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})


class _Verdict(enum.Enum):
    ACCEPT = "accept"  # the stream goes on from this response
    RETRY = "retry"  # try again after a backoff
    REFUSED = "refused"  # the stream cannot be resumed


def _stream_url(request: httpx.Request, response: httpx.Response) -> httpx.URL | None:
    """``<prefix>/v1/streams/{id}`` when `response` is a resumable gateway stream, else None."""
    stream_id = response.headers.get(STREAM_ID_HEADER)
    if stream_id is None or response.status_code != 200:
        return None
    content_type = response.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "text/event-stream":
        return None
    # Offsets count the bytes on the wire; a compressed body's cannot be spliced.
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    # The id goes into a URL path: only the documented shape, never whatever a server sent.
    if _STREAM_ID.fullmatch(stream_id) is None:
        return None
    path = request.url.raw_path.partition(b"?")[0]
    cut = path.rfind(b"/v1/")
    if cut < 0:
        return None
    return request.url.copy_with(
        raw_path=path[:cut] + b"/v1/streams/" + stream_id.encode("ascii"), fragment=None
    )


@dataclass(slots=True)
class _Resume:
    """The sans-I/O state of one resumable stream: what was yielded and what to do next.

    The I/O shells call ``received`` for every chunk yielded, ``broke`` when the body raised,
    then ``next_try`` / ``answered`` / ``failed`` for each reattach request.
    """

    request: httpx.Request
    url: httpx.URL
    max_resumes: int
    backoff_s: float
    offset: int = 0
    tries: int = 0  # reattach requests sent for this stream, in all
    failures: int = 0  # failed reattach requests since the last one that worked
    stalled: bool = False  # the last break was a read timeout and no byte came since
    why: str = ""  # the last reason a reattach did not work, for the error's note

    def received(self, size: int) -> None:
        if size:
            self.offset += size
            self.stalled = False

    def broke(self, error: Exception) -> bool:
        """Whether the break is worth reattaching (False: re-raise `error`, noted)."""
        if isinstance(error, httpx.ReadTimeout):
            if self.stalled:
                self.why = "a read timeout again, with no byte since the last one"
                self.give_up(error, refused=True)
                return False
            self.stalled = True
        return True

    def next_try(self) -> tuple[float, httpx.Request] | None:
        """The delay before the next reattach and its request; None when none is left."""
        if self.tries >= self.max_resumes:
            return None
        self.tries += 1
        delay = self.backoff_s * 2 ** (self.failures - 1) if self.failures else 0.0
        headers = [
            (name, value)
            for name, value in self.request.headers.multi_items()
            if name.lower() in _CARRIED_HEADERS
        ]
        headers += [("accept", "text/event-stream"), ("accept-encoding", "identity")]
        request = httpx.Request(
            "GET",
            self.url.copy_with(params={"offset": str(self.offset)}),
            headers=headers,
            extensions=dict(self.request.extensions),
        )
        return delay, request

    def answered(self, response: httpx.Response) -> _Verdict:
        status = response.status_code
        content_type = response.headers.get("content-type", "").lower()
        if status == 200 and content_type.startswith("text/event-stream"):
            # A gateway that says where its answer starts must start where we asked.
            echoed = response.headers.get(OFFSET_HEADER)
            if echoed is None or echoed.strip() == str(self.offset):
                self.failures = 0
                return _Verdict.ACCEPT
            self.why = f"the reattach started at byte {echoed.strip()}, not {self.offset}"
            return _Verdict.REFUSED
        self.why = f"the reattach was answered {status}"
        if status in _RETRY_STATUSES:
            self.failures += 1
            return _Verdict.RETRY
        return _Verdict.REFUSED

    def failed(self, error: Exception) -> None:
        self.failures += 1
        self.why = f"the reattach failed: {type(error).__name__}"

    def give_up(self, error: Exception, *, refused: bool) -> Exception:
        """`error` (what broke the stream), noted with why it was not resumed."""
        if refused:
            reason = self.why
        else:
            reason = f"{self.tries} reattach(es) spent (max_resumes={self.max_resumes})"
            if self.why:
                reason += f", the last: {self.why}"
        stream_id = self.url.path.rpartition("/")[2]
        error.add_note(
            f"gateway.client: stream {stream_id} not resumed at byte {self.offset}: {reason}"
        )
        return error


def _sync_stream(response: httpx.Response) -> httpx.SyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.SyncByteStream):
        raise TypeError("a sync transport returned a response with an async stream")
    return stream


def _async_stream(response: httpx.Response) -> httpx.AsyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise TypeError("an async transport returned a response with a sync stream")
    return stream


class _ResumingStream(httpx.SyncByteStream):
    """The body of a resumable stream: the original response's, then each reattach's."""

    def __init__(
        self, inner: httpx.BaseTransport, plan: _Resume, first: httpx.SyncByteStream
    ) -> None:
        self._inner = inner
        self._plan = plan
        self._current = first  # the body being read: the original's, then a reattach's

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._current)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except _BREAKS as error:
                if not self._plan.broke(error):
                    raise
                self._current.close()
                self._current = self._reattach(error)
                chunks = iter(self._current)
                continue
            self._plan.received(len(chunk))
            yield chunk

    def _reattach(self, error: Exception) -> httpx.SyncByteStream:
        while (attempt := self._plan.next_try()) is not None:
            delay, request = attempt
            if delay:
                time.sleep(delay)
            try:
                response = self._inner.handle_request(request)
            except httpx.TransportError as exc:
                self._plan.failed(exc)
                continue
            verdict = self._plan.answered(response)
            if verdict is _Verdict.ACCEPT:
                return _sync_stream(response)
            response.close()
            if verdict is _Verdict.REFUSED:
                raise self._plan.give_up(error, refused=True)
        raise self._plan.give_up(error, refused=False)

    def close(self) -> None:
        self._current.close()


class _AsyncResumingStream(httpx.AsyncByteStream):
    """The async twin of `_ResumingStream`."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, plan: _Resume, first: httpx.AsyncByteStream
    ) -> None:
        self._inner = inner
        self._plan = plan
        self._current = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._current)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except _BREAKS as error:
                if not self._plan.broke(error):
                    raise
                await self._current.aclose()
                self._current = await self._reattach(error)
                chunks = aiter(self._current)
                continue
            self._plan.received(len(chunk))
            yield chunk

    async def _reattach(self, error: Exception) -> httpx.AsyncByteStream:
        while (attempt := self._plan.next_try()) is not None:
            delay, request = attempt
            if delay:
                await anyio.sleep(delay)
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as exc:
                self._plan.failed(exc)
                continue
            verdict = self._plan.answered(response)
            if verdict is _Verdict.ACCEPT:
                return _async_stream(response)
            await response.aclose()
            if verdict is _Verdict.REFUSED:
                raise self._plan.give_up(error, refused=True)
        raise self._plan.give_up(error, refused=False)

    async def aclose(self) -> None:
        await self._current.aclose()


class ResumingTransport(httpx.BaseTransport):
    """An httpx transport that resumes broken gateway streams (see the module docstring).

    `transport` is the transport requests really go through (default ``HTTPTransport()``;
    pass your own for TLS, HTTP/2 or proxy settings: an httpx client given a transport
    ignores its own). `max_resumes` bounds the reattach requests of one stream; `backoff_s`
    is the wait after a failed reattach, doubling with each further failure.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        max_resumes: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        if max_resumes < 0 or backoff_s < 0:
            raise ValueError("max_resumes and backoff_s must not be negative")
        self._inner = transport if transport is not None else httpx.HTTPTransport()
        self._max_resumes = max_resumes
        self._backoff_s = backoff_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        url = _stream_url(request, response)
        if url is not None:
            plan = _Resume(request, url, self._max_resumes, self._backoff_s)
            response.stream = _ResumingStream(self._inner, plan, _sync_stream(response))
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """The async twin of `ResumingTransport` (default inner ``AsyncHTTPTransport()``); the
    backoff sleeps through anyio, so it runs under asyncio and trio alike."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        max_resumes: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        if max_resumes < 0 or backoff_s < 0:
            raise ValueError("max_resumes and backoff_s must not be negative")
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._max_resumes = max_resumes
        self._backoff_s = backoff_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        url = _stream_url(request, response)
        if url is not None:
            plan = _Resume(request, url, self._max_resumes, self._backoff_s)
            response.stream = _AsyncResumingStream(self._inner, plan, _async_stream(response))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
