"""Admission: a caller's limits checked (and charged) before any upstream call, reconciled when
the real usage is known, and told to the caller in headers.

Token limits cannot know the output size up front, so a request reserves an estimate (its
prompt size / 4 plus its effective output cap) and the difference is charged or refunded when
the upstream reports usage. A stream that ends without usage keeps its reservation.
"""

from __future__ import annotations

import math

from gateway.config.runtime import Route
from gateway.errors import GatewayError, Kind
from gateway.limits.base import Decision, LimitSpec
from gateway.providers.base import ParsedRequest, Usage, as_int

# Output estimate when neither the request nor the route bounds it.
DEFAULT_OUTPUT_ESTIMATE = 1024
_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute"}
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Limits on what is open at once (no time window): streams, and every in-flight request.
_CONCURRENCY = frozenset({"concurrency", "requests"})


def estimate_tokens(body_bytes: int, parsed: ParsedRequest, route: Route) -> int:
    """Prompt estimate (about 4 bytes a token, JSON included: errs on the high side) plus the
    output the request may produce: its effective output cap for every choice it asks for
    (`n`, and legacy Completions' `best_of`, which are generated even when not returned)."""
    prompt = math.ceil(body_bytes / 4)
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


def wants_injected_usage(parsed: ParsedRequest, spec: LimitSpec | None) -> bool:
    """An OpenAI chat/completions stream under a token limit whose caller did not ask for the
    usage chunk: the gateway asks upstream and strips it again before the client sees it."""
    if spec is None or spec.tokens_per_minute is None or not parsed.stream:
        return False
    if parsed.endpoint.path not in _CHAT_PATHS:
        return False
    options = parsed.body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def used_tokens(usage: Usage | None) -> int | None:
    if usage is None or (usage.input_tokens is None and usage.output_tokens is None):
        return None
    return (usage.input_tokens or 0) + (usage.output_tokens or 0)


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """IETF draft RateLimit-Policy / RateLimit headers (one item per configured limit)."""
    if not decision.usage:
        return {}
    policy = []
    state = []
    for u in decision.usage:
        window = ";w=60" if u.name not in _CONCURRENCY else ""
        policy.append(f'"{u.name}";q={u.limit}{window}')
        state.append(f'"{u.name}";r={u.remaining};t={math.ceil(u.reset_s)}')
    return {"RateLimit-Policy": ", ".join(policy), "RateLimit": ", ".join(state)}


def rate_limited(decision: Decision, spec: LimitSpec) -> GatewayError:
    """The 429 for a denied decision, with retry-after (s), retry-after-ms and the drafts."""
    wait = max(decision.retry_after_s, 0.001)
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
        **ratelimit_headers(decision),
    }
    if decision.denied_by == "concurrency":
        message = (
            f"Too many concurrent streams for tier '{spec.tier}' "
            f"(limit {spec.concurrent_streams}). Retry when one of them ends."
        )
    elif decision.denied_by == "requests":
        message = (
            f"Too many concurrent requests for tier '{spec.tier}' "
            f"(limit {spec.concurrent_requests}). Retry when one of them ends."
        )
    else:
        name = decision.denied_by or "rpm"
        limit = spec.requests_per_minute if name == "rpm" else spec.tokens_per_minute
        message = (
            f"Rate limit reached for {_NAMES.get(name, name)} (tier '{spec.tier}', limit "
            f"{limit}). Retry in {wait:.3f} s."
        )
    return GatewayError(429, Kind.RATE_LIMITED, message, headers=headers)


class UsageStripper:
    """Removes what `stream_options.include_usage` added to an OpenAI stream: the `"usage":null`
    member of every chunk and the usage-only chunk before `[DONE]`, so that the client's bytes
    are what it would have got had the gateway not asked. Works on whole events (LF framing,
    as OpenAI sends); an event still incomplete is held until its end arrives, up to
    `MAX_HELD` bytes: past that (an event longer than any real chunk) the stripper stops for
    the rest of the stream and passes bytes through unchanged, so memory and work per stream
    stay bounded."""

    __slots__ = ("_pending", "active")

    MAX_HELD = 64 * 1024
    _NULL = b',"usage":null'
    _BOUNDARY = b"\n\n"

    def __init__(self) -> None:
        self._pending = b""
        self.active = True

    def feed(self, chunk: bytes) -> bytes:
        if not self.active:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        if not self._pending and b"\r" in chunk:
            # Not the framing this was built for: pass everything through untouched.
            self.active = False
            return data
        end = data.rfind(self._BOUNDARY)
        if end < 0:
            if len(data) > self.MAX_HELD:
                self.active = False
                self._pending = b""
                return data
            self._pending = data
            return b""
        complete, rest = data[: end + 2], data[end + 2 :]
        if len(rest) > self.MAX_HELD:
            self.active = False
            self._pending = b""
            return self._strip(complete) + rest
        self._pending = rest
        return self._strip(complete)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _strip(self, events: bytes) -> bytes:
        if b'"choices":[]' in events and b'"usage":{' in events:
            kept = [
                e
                for e in events.split(self._BOUNDARY)
                if not (b'"choices":[]' in e and b'"usage":{' in e)
            ]
            events = self._BOUNDARY.join(kept)
        return events.replace(self._NULL, b"")
