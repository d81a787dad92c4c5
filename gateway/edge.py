"""The edge: read the request body (bounded in size, time and shared memory), bound what it
costs to parse, parse it once, check the fields the gateway itself acts on, resolve the
route and estimate the tokens: a frozen `Request` that every later stage reads.

Order matters: everything cheap is checked before anything expensive. The body's size is
checked against `Content-Length` before a byte is read; the bytes being read by all requests
at once are bounded by one `BodyBudget`; the whole body must arrive within
`server.body_timeout_s`; a body whose parsed form would cost more than a fixed multiple of its
size (millions of tiny JSON values) is refused from byte counts alone, before the parser runs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.config.runtime import Caller, Route, Runtime
from gateway.errors import GatewayError, Kind
from gateway.providers import WIRE_APIS
from gateway.providers.base import ApiFamily, Endpoint, ParsedRequest, as_int
from gateway.telemetry import attrs

if TYPE_CHECKING:
    from gateway.report import Report

MAX_MODEL_CHARS = 256
# Output estimate when neither the request nor the route bounds it.
DEFAULT_OUTPUT_ESTIMATE = 1024

# What one JSON value costs once parsed, at worst (measured: an empty object or a one-letter
# string in a large array): the parser's own node (16 bytes), the Python object, and the
# reference to it in its container. Numbers and literals cost less.
_VALUE_COST = 88
# A body may cost this multiple of its size, plus the allowance, to parse (its raw bytes are
# held meanwhile too): a 32 MiB body stays under 4x its size in all; small bodies may hold
# dense values (token-id arrays for embeddings, large tool schemas).
_PARSE_FACTOR = 2
_PARSE_ALLOWANCE = 24 * 1024 * 1024
# A JSON string (escapes included): used to discount brackets and commas inside strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# Integers the gateway reads (max_tokens, n) are bounded like the providers' own int32 fields.
_MAX_INT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """The `server` settings that bound one request body."""

    max_bytes: int
    timeout_s: float
    max_containers: int
    max_depth: int
    in_flight_bytes: int  # the shared budget of bodies being read

    @classmethod
    def of(cls, runtime: Runtime) -> BodyLimits:
        server = runtime.server
        return cls(
            max_bytes=server.max_request_bytes,
            timeout_s=server.body_timeout_s,
            max_containers=server.max_json_containers,
            max_depth=server.max_json_depth,
            in_flight_bytes=server.max_body_bytes_in_flight,
        )


@dataclass(frozen=True, slots=True)
class Request:
    """The caller's request as every later stage uses it: parsed once, routed, estimated."""

    parsed: ParsedRequest
    caller: Caller
    route: Route
    estimate: int  # tokens the request may cost (its reservation under token limits)
    prompt_estimate: int = 0  # of those, the prompt's (charged to a budget without usage)

    @property
    def endpoint(self) -> Endpoint:
        return self.parsed.endpoint


class Edge:
    """The edge stage of one endpoint."""

    def __init__(self, endpoint: Endpoint, budget: BodyBudget, *, capture_content: bool) -> None:
        self.endpoint = endpoint
        self.budget = budget
        self.capture_content = capture_content  # the prompt on the server span (opt-in)
        self._limits: tuple[Runtime, BodyLimits] | None = None  # of the runtime last seen

    def limits(self, runtime: Runtime) -> BodyLimits:
        """The body bounds of `runtime` (compiled once per runtime: a reload swaps it)."""
        cached = self._limits
        if cached is None or cached[0] is not runtime:
            cached = self._limits = (runtime, BodyLimits.of(runtime))
        return cached[1]

    async def accept(
        self, request: web.Request, runtime: Runtime, caller: Caller, report: Report
    ) -> Request:
        """Read the body (bounded), parse it once, route it and estimate its tokens. The
        body's bytes count against the shared budget until the parse is done; only the parsed
        request lives on. Raises GatewayError in the caller's terms."""
        limits = self.limits(runtime)
        body = await read_body(request, limits, self.budget)
        try:
            raw = body.data
            parsed = parse_request(self.endpoint, raw, request.headers, limits)
            if self.capture_content:
                report.span.set_attribute(
                    "gen_ai.input.messages", raw[:65536].decode(errors="replace")
                )
            size = len(raw)
            del raw
        finally:
            body.release()
        report.parsed(parsed.model, parsed.stream)
        span = report.span
        if span.is_recording():  # attribute dicts cost time even for a no-op tracer
            span.set_attributes(
                attrs(
                    gen_ai__request__model=parsed.model,
                    gen_ai__operation__name=self.endpoint.operation,
                    gateway__caller=caller.id,
                    gateway__tier=caller.tier,
                )
            )
        route = resolve_route(runtime, caller, parsed)
        spec = caller.limits
        counted = caller.budget is not None or (
            spec is not None and spec.tokens_per_minute is not None
        )
        if counted and WIRE_APIS[parsed.endpoint.family].injects_usage(parsed):
            parsed = dataclasses.replace(parsed, inject_usage=True)
        estimate = estimate_tokens(size, parsed, route)
        report.routed(route.name, estimate)
        return Request(parsed, caller, route, estimate, prompt_estimate(size))


def resolve_route(runtime: Runtime, caller: Caller, parsed: ParsedRequest) -> Route:
    """The route of the request's model. Raises GatewayError 404 (unknown), 403 (not this
    caller's), 400 (served through the other wire API)."""
    route = runtime.routes.get(parsed.model)
    if route is None:
        raise GatewayError(
            404,
            Kind.NOT_FOUND,
            f"The model '{parsed.model}' does not exist or you do not have access to it.",
            param="model",
        )
    if not caller.may_use(parsed.model):
        raise GatewayError(
            403,
            Kind.PERMISSION,
            f"This API key is not allowed to use the model '{parsed.model}'.",
            param="model",
        )
    if route.family is not parsed.endpoint.family:
        where = "/v1/messages" if route.family is ApiFamily.ANTHROPIC else "/v1/chat/completions"
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"The model '{parsed.model}' is served through the {route.family.value} API "
            f"({where}), not {parsed.endpoint.path}.",
            param="model",
        )
    return route


def prompt_estimate(body_bytes: int) -> int:
    """About 4 bytes a token, JSON included: errs on the high side."""
    return math.ceil(body_bytes / 4)


def estimate_tokens(body_bytes: int, parsed: ParsedRequest, route: Route) -> int:
    """Prompt estimate (`prompt_estimate`) plus the output the request may produce: its
    effective output cap for every choice it asks for (`n`, and legacy Completions'
    `best_of`, which are generated even when not returned)."""
    prompt = prompt_estimate(body_bytes)
    endpoint = parsed.endpoint
    if not endpoint.cap_fields:
        return prompt  # embeddings, count_tokens: no output tokens
    asked = None
    for name in endpoint.cap_fields:
        value = as_int(parsed.body.get(name))
        if value is not None:
            asked = value
            break
    cap = route.max_tokens_cap
    if asked is None:
        output = cap if cap is not None else DEFAULT_OUTPUT_ESTIMATE
    else:
        output = min(asked, cap) if cap is not None else asked
    choices = 1
    for name in endpoint.choice_fields:
        value = as_int(parsed.body.get(name))
        if value is not None:
            choices = max(choices, value)
    return prompt + max(0, output) * choices


class BodyBudget:
    """Bytes of request bodies being read by all requests at once, bounded.

    A reader asks for each chunk's bytes once it has them; past the bound it waits (in order
    of arrival) until other readers give theirs back, so memory held by slow or huge uploads
    is capped while each reader still gets TCP backpressure toward its client."""

    __slots__ = ("_waiters", "capacity", "used")

    def __init__(self, capacity: int) -> None:
        # Set from `server.max_body_bytes_in_flight` by each reader (a reload may change it).
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int) -> None:
        """Take `n` bytes, waiting while the budget is spent. Cancellation-safe."""
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.used -= n  # granted just as the wait was cancelled: give it back
                self._wake()
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            # A body larger than the whole budget still goes, alone (the schema keeps the
            # budget >= max_request_bytes, so this only matters if that changes).
            if self.used + n > self.capacity and self.used > 0:
                return
            self._waiters.popleft()
            self.used += n
            future.set_result(None)


@dataclass(slots=True)
class Body:
    """A request body that has been read; give its bytes back to the budget with `release`."""

    data: bytearray
    _budget: BodyBudget | None

    def release(self) -> None:
        if self._budget is not None:
            self._budget.release(len(self.data))
            self._budget = None


async def read_body(request: web.Request, limits: BodyLimits, budget: BodyBudget) -> Body:
    """The whole request body: 413 past `limits.max_bytes` (from Content-Length before
    reading anything, else as soon as it is exceeded), 408 when it does not arrive within
    `limits.timeout_s` (the connection is then closed: the rest of the body is never read),
    503 when the shared budget stays spent that long. The caller releases the result."""
    limit = limits.max_bytes
    too_large = GatewayError(
        413,
        Kind.TOO_LARGE,
        f"Request body is larger than this gateway's limit of {limit} bytes.",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    budget.capacity = limits.in_flight_bytes
    buf = bytearray()
    held = 0
    waiting_on_budget = False
    content = request.content
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if len(buf) + len(chunk) > limit:
                    raise too_large
                waiting_on_budget = True
                await budget.acquire(len(chunk))
                waiting_on_budget = False
                held += len(chunk)
                buf += chunk
    except TimeoutError:
        budget.release(held)
        if waiting_on_budget:
            raise GatewayError(
                503,
                Kind.OVERLOADED,
                "The gateway is reading too many request bodies at once; retry shortly.",
                headers={"retry-after": "1"},
            ) from None
        raise GatewayError(
            408,
            Kind.REQUEST_TIMEOUT,
            f"The request body did not arrive within {limits.timeout_s:g} s.",
            close=True,
        ) from None
    except BaseException:
        budget.release(held)
        raise
    return Body(buf, budget)


def parse_cost_error(raw: bytes | bytearray, max_containers: int) -> str | None:
    """Why parsing `raw` would cost too much, or None. From byte counts only: upper bounds
    first (brackets and commas anywhere), exact counts (outside strings) only when the upper
    bounds fail, and never a scan whose cost the body itself can inflate."""
    size = len(raw)
    allowed_values = (_PARSE_FACTOR * size + _PARSE_ALLOWANCE) // _VALUE_COST
    containers = raw.count(b"{") + raw.count(b"[")
    values = containers + raw.count(b",") + 1
    if containers <= max_containers and values <= allowed_values:
        return None
    # Brackets or commas inside strings (code, prose) inflate the bounds. Removing strings
    # costs one regex match per string: do it only when the strings alone could not
    # already be too many values (and not at all when there are none).
    quotes = raw.count(b'"')
    if quotes // 2 > allowed_values:
        return _too_many_values(allowed_values)
    rest = _STRING.sub(b"", raw) if quotes else raw
    containers = rest.count(b"{") + rest.count(b"[")
    if containers > max_containers:
        return (
            f"Request body has more than {max_containers} JSON objects and arrays "
            "(this gateway's limit)."
        )
    if containers + rest.count(b",") + 1 > allowed_values:
        return _too_many_values(allowed_values)
    return None


def _too_many_values(allowed: int) -> str:
    return (
        f"Request body has more than {allowed} JSON values for its size; this gateway "
        "refuses bodies made mostly of tiny values."
    )


def too_deep(value: Any, max_depth: int) -> bool:
    """Whether `value` nests containers deeper than `max_depth` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def parse_request(
    endpoint: Endpoint, raw: bytes | bytearray, headers: Mapping[str, str], limits: BodyLimits
) -> ParsedRequest:
    """Parse and check the JSON body once. Raises GatewayError (400/413) with a precise
    message naming the offending field."""
    if not raw:
        raise GatewayError(400, Kind.INVALID_REQUEST, "Request body is empty; expected JSON.")
    problem = parse_cost_error(raw, limits.max_containers)
    if problem is not None:
        raise GatewayError(413, Kind.TOO_LARGE, problem)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"Request body is not valid JSON: {str(exc).splitlines()[0][:200]}",
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, Kind.INVALID_REQUEST, "Request body must be a JSON object.")
    # Only a body with more containers than the depth bound can be nested deeper than it.
    if raw.count(b"{") + raw.count(b"[") > limits.max_depth and too_deep(body, limits.max_depth):
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"Request body nests JSON deeper than {limits.max_depth} levels.",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(
            400, Kind.INVALID_REQUEST, "'model' is required and must be a string.", param="model"
        )
    if len(model) > MAX_MODEL_CHARS:
        raise GatewayError(400, Kind.INVALID_REQUEST, "'model' is too long.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise GatewayError(400, Kind.INVALID_REQUEST, "'stream' must be a boolean.", param="stream")
    for name in endpoint.cap_fields:
        _check_int(body, name, low=1)
    for name in endpoint.choice_fields:
        _check_int(body, name, low=1)
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream and endpoint.streams,
        headers=headers,
    )


def _check_int(body: Mapping[str, Any], name: str, *, low: int) -> None:
    """A field the gateway acts on (an output cap, a choice count) must be a JSON integer in
    range when present (null = absent): `5000.0`, `"5000"`, `5e3` or `2**64` would otherwise
    slip past the cap or the token reservation."""
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayError(400, Kind.INVALID_REQUEST, f"'{name}' must be an integer.", param=name)
    if not low <= value <= _MAX_INT:
        raise GatewayError(
            400,
            Kind.INVALID_REQUEST,
            f"'{name}' must be between {low} and {_MAX_INT}.",
            param=name,
        )
