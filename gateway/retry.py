"""Retry decisions, sans-I/O: what an upstream failure means for the request, the key and the
provider, and how long to wait. Pure functions of their inputs (the clock and the random source
are passed in), so every rule is unit-tested without sockets.

The boundary itself is not decided here: the attempt planner (attempts.py) only asks before
anything reached the client. After that, nothing is retried.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

import orjson

# Statuses worth another attempt (possibly on another key or deployment).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
# The provider as a whole is struggling: another key of the same provider will not help.
PROVIDER_OVERLOAD_STATUSES = frozenset({503, 529})
# The gateway's key is at fault (bad, revoked, unpaid): never the caller's fault.
KEY_FAULT_STATUSES = frozenset({401, 402, 403})
# Quota/spend errors: waiting does not help, the key must leave rotation.
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_error", "billing_hard_limit_reached"})

# A wait beyond this is not a wait but garbage (or `inf`): ignored, the next source is used.
_MAX_WAIT_S = 7 * 86400.0
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_GO_DURATION_FULL = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|h|m|s))+$")
_RESET_HEADERS_OPENAI = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_RESET_HEADERS_ANTHROPIC = (
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
)


class KeyAction(enum.Enum):
    NONE = "none"
    COOLDOWN = "cooldown"  # rate limited: out of rotation until the reset
    DISABLE = "disable"  # bad, revoked or out of quota: out until re-probed


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one failed attempt means."""

    retryable: bool
    reason: str  # bounded label for logs and metrics
    key_action: KeyAction = KeyAction.NONE
    provider_backoff: bool = False  # 503/529: prefer another deployment; back off this one
    wait_s: float | None = None  # what the upstream asked for (retry-after or a reset header)
    # The next attempt goes at once (no backoff): waiting would not change the answer.
    immediate: bool = False
    # Only another key may help (a key this request tried is not tried again).
    other_key: bool = False
    # Only another upstream model may help (the prompt exceeds this model's context window):
    # the next attempt goes to a deployment whose upstream model this request has not tried.
    other_model: bool = False


def go_duration(text: str) -> float | None:
    """Seconds of an OpenAI reset header such as `1s`, `6m0s`, `120ms`, `1h2m3.5s`."""
    text = text.strip()
    if not text or not _GO_DURATION_FULL.match(text):
        return None
    unit_s = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * unit_s[u] for n, u in _GO_DURATION.findall(text))


def retry_after_s(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """How long the upstream asked us to wait, from the most precise header it sent.

    Order: `retry-after-ms`, `retry-after` (seconds or HTTP date), then the providers' reset
    headers (the latest of them: every limit must have reset). None when nothing usable.
    """
    value = headers.get("retry-after-ms")
    if value:
        try:
            ms = float(value)
        except ValueError:
            ms = -1
        if 0 <= ms < _MAX_WAIT_S * 1000:
            return ms / 1000
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        seconds: float | None
        try:
            seconds = float(value)
        except ValueError:
            seconds = _http_date_delta(value, now_epoch)
        if seconds is not None and 0 <= seconds < _MAX_WAIT_S:
            return seconds
    waits = []
    for name in _RESET_HEADERS_OPENAI:
        raw = headers.get(name)
        if raw:
            parsed = go_duration(raw)
            if parsed is not None:
                waits.append(parsed)
    for name in _RESET_HEADERS_ANTHROPIC:
        raw = headers.get(name)
        if raw:
            try:
                at = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
            except ValueError:
                continue
            if at.tzinfo is not None:
                waits.append(max(0.0, at.timestamp() - now_epoch))
    return max(waits) if waits else None


def _http_date_delta(value: str, now_epoch: float) -> float | None:
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at is None or at.tzinfo is None:
        return None
    return max(0.0, at.timestamp() - now_epoch)


@dataclass(frozen=True, slots=True)
class ErrorFacts:
    """The `error` object of a provider's error body: code, type and message (any may be
    missing; bounded)."""

    code: str | None = None
    type: str | None = None
    message: str = ""

    @property
    def label(self) -> str | None:
        """The most specific of code/type (a quota code wins wherever it appears)."""
        for value in (self.code, self.type):
            if value in _QUOTA_CODES:
                return value
        return self.code or self.type


def error_facts(body: bytes) -> ErrorFacts:
    """What an error body says (OpenAI or Anthropic shape); empty facts for anything else."""
    if not body or len(body) > 65536:
        return ErrorFacts()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ErrorFacts()
    if not isinstance(obj, dict):
        return ErrorFacts()
    error = obj.get("error")
    if not isinstance(error, dict):
        return ErrorFacts()
    code, kind, message = error.get("code"), error.get("type"), error.get("message")
    return ErrorFacts(
        code=code[:128] if isinstance(code, str) else None,
        type=kind[:128] if isinstance(kind, str) else None,
        message=message[:2048] if isinstance(message, str) else "",
    )


# A 400 that says the prompt does not fit the model's context window (OpenAI's code; the
# Anthropic API's invalid_request_error "prompt is too long"; vLLM and other compatible
# servers' "maximum context length").
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_PHRASES = ("prompt is too long", "maximum context length", "context length exceeded")
# 403s caused by what a request asks for, not by the credential: Anthropic's permission_error
# (a model or beta the key is not entitled to), OpenAI's invalid_request_error ("You are not
# allowed to sample from this model"). A 403 that says neither (no body, an unknown type) is
# treated as a credential failure, as a 401 is.
_REQUEST_403 = frozenset({"permission_error", "invalid_request_error"})


def is_context_length_error(facts: ErrorFacts) -> bool:
    if facts.code in _CONTEXT_CODES or facts.type in _CONTEXT_CODES:
        return True
    message = facts.message.lower()
    return any(phrase in message for phrase in _CONTEXT_PHRASES)


def classify_status(
    status: int, headers: Mapping[str, str], body: bytes, now_epoch: float
) -> Verdict:
    """The verdict on an upstream answer with a non-2xx status."""
    should_retry = headers.get("x-should-retry", "").strip().lower()
    wait = retry_after_s(headers, now_epoch)
    facts = error_facts(body)
    code = facts.label
    if status == 403 and facts.type in _REQUEST_403 and code not in _QUOTA_CODES:
        # Caused by what this request asks for: the key stays in rotation for everyone; a
        # key this request has not tried may be entitled, and the caller gets the 403.
        return Verdict(True, "upstream_403", immediate=True, other_key=True)
    if status in KEY_FAULT_STATUSES:
        # Another key may well work; this one must leave rotation.
        return Verdict(True, f"upstream_{status}", KeyAction.DISABLE)
    if status == 400 and is_context_length_error(facts):
        return Verdict(True, "context_length_exceeded", immediate=True, other_model=True)
    if status == 429:
        if code in _QUOTA_CODES:
            return Verdict(True, "quota_exhausted", KeyAction.DISABLE)
        return Verdict(True, "rate_limited", KeyAction.COOLDOWN, wait_s=wait)
    if status in RETRYABLE_STATUSES:
        if should_retry == "false":
            return Verdict(False, f"upstream_{status}")
        return Verdict(
            True,
            f"upstream_{status}",
            provider_backoff=status in PROVIDER_OVERLOAD_STATUSES,
            wait_s=wait,
        )
    if should_retry == "true" and status >= 500:
        return Verdict(True, f"upstream_{status}", wait_s=wait)
    return Verdict(False, f"upstream_{status}")


def classify_stream_error(error_type: str | None) -> Verdict:
    """The verdict on a 200 stream whose first event was an error (nothing sent yet)."""
    kind = (error_type or "").lower()
    if kind in _QUOTA_CODES:
        return Verdict(True, "quota_exhausted", KeyAction.DISABLE)
    if kind in ("rate_limit_error", "rate_limit_exceeded", "rate_limited"):
        return Verdict(True, "first_event_rate_limited", KeyAction.COOLDOWN)
    if kind in ("authentication_error", "permission_error", "invalid_api_key"):
        return Verdict(True, "first_event_key_error", KeyAction.DISABLE)
    if kind in ("overloaded_error", "overloaded", "server_is_overloaded"):
        return Verdict(True, "first_event_overloaded", provider_backoff=True)
    if kind in ("invalid_request_error", "not_found_error", "request_too_large"):
        return Verdict(False, "first_event_invalid_request")
    return Verdict(True, "first_event_error")


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before attempt number `attempt` (1 = the first retry)."""
    ceiling = min(max_s, base_s * (2 ** min(max(0, attempt - 1), 30)))
    return rng.uniform(0.0, ceiling)
