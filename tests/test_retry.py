"""Tests for gateway.retry: reset headers, status and first-event verdicts, backoff jitter."""

from __future__ import annotations

import calendar
import random

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.retry import (
    KeyAction,
    Verdict,
    backoff_s,
    classify_status,
    classify_stream_error,
    go_duration,
    retry_after_s,
)

# 2023-11-14T22:13:20Z: a fixed "now" so that dates in headers give exact waits.
NOW = 1_700_000_000.0
assert calendar.timegm((2023, 11, 14, 22, 13, 20)) == NOW


def at(hh: int, mm: int, ss: int) -> float:
    """Epoch seconds of a time on the same day as NOW (UTC)."""
    return float(calendar.timegm((2023, 11, 14, hh, mm, ss)))


# --- go_duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("2m30s", 150.0),
        ("1.5h", 5400.0),
        (" 7s ", 7.0),
    ],
)
def test_go_duration(text: str, seconds: float) -> None:
    assert go_duration(text) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "1x", "-1s", "s", "1", "1s abc", "1 s", "1m 5s", "1.s", ".5s"]
)
def test_go_duration_garbage_is_none(text: str) -> None:
    assert go_duration(text) is None


# --- retry_after_s: retry-after-ms and retry-after -------------------------------------------


def test_nothing_usable_is_none() -> None:
    assert retry_after_s({}, NOW) is None
    assert retry_after_s({"x-request-id": "req_1", "content-type": "application/json"}, NOW) is None


def test_retry_after_ms_is_preferred_over_retry_after() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9", "x-ratelimit-reset-requests": "1m"}
    assert retry_after_s(headers, NOW) == 1.5


def test_retry_after_ms_alone() -> None:
    assert retry_after_s({"retry-after-ms": "250"}, NOW) == 0.25
    assert retry_after_s({"retry-after-ms": "0"}, NOW) == 0.0
    assert retry_after_s({"retry-after-ms": "12.5"}, NOW) == 0.0125


@pytest.mark.parametrize(
    ("value", "seconds"), [("3", 3.0), ("0", 0.0), ("1.5", 1.5), (" 20 ", 20.0), ("120", 120.0)]
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert retry_after_s({"retry-after": value}, NOW) == seconds


def test_retry_after_http_date_in_the_future() -> None:
    # RFC 7231 IMF-fixdate, 100 s after NOW
    value = "Tue, 14 Nov 2023 22:15:00 GMT"
    assert retry_after_s({"retry-after": value}, NOW) == at(22, 15, 0) - NOW == 100.0


def test_retry_after_http_date_depends_on_now() -> None:
    value = "Tue, 14 Nov 2023 22:15:00 GMT"
    assert retry_after_s({"retry-after": value}, NOW + 60) == 40.0


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    value = "Tue, 14 Nov 2023 22:10:00 GMT"
    assert retry_after_s({"retry-after": value}, NOW) == 0.0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # an unparsable or negative ms value falls back to retry-after
        ({"retry-after-ms": "abc", "retry-after": "7"}, 7.0),
        ({"retry-after-ms": "-5", "retry-after": "7"}, 7.0),
        ({"retry-after-ms": "", "retry-after": "7"}, 7.0),
        ({"retry-after-ms": "nan", "retry-after": "7"}, 7.0),
        # an unparsable or negative retry-after falls back to the reset headers
        ({"retry-after": "soon", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"retry-after": "-3", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"retry-after": "", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"retry-after": "Tue, 99 Nov 2023 22:15:00 GMT", "x-ratelimit-reset-tokens": "3s"}, 3.0),
        # everything invalid: all the way down
        ({"retry-after-ms": "x", "retry-after": "y", "x-ratelimit-reset-requests": "z"}, None),
        # an invalid reset header is skipped, the valid one is used
        ({"x-ratelimit-reset-requests": "soon", "x-ratelimit-reset-tokens": "120ms"}, 0.12),
        (
            {
                "anthropic-ratelimit-requests-reset": "tomorrow",
                "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:50Z",
            },
            30.0,
        ),
    ],
)
def test_invalid_values_fall_through_to_the_next_source(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after_s(headers, NOW) == seconds


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "inf", "x-ratelimit-reset-requests": "2s"},
        {"retry-after": "1e400", "x-ratelimit-reset-requests": "2s"},
        {"retry-after-ms": "Infinity", "x-ratelimit-reset-requests": "2s"},
    ],
)
def test_non_finite_waits_are_ignored(headers: dict[str, str]) -> None:
    assert retry_after_s(headers, NOW) == 2.0


# --- retry_after_s: provider reset headers ---------------------------------------------------


def test_openai_reset_headers_take_the_later_of_both() -> None:
    headers = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}
    assert retry_after_s(headers, NOW) == 360.0
    headers = {"x-ratelimit-reset-requests": "1h2m3.5s", "x-ratelimit-reset-tokens": "120ms"}
    assert retry_after_s(headers, NOW) == 3723.5


def test_openai_reset_header_alone() -> None:
    assert retry_after_s({"x-ratelimit-reset-tokens": "120ms"}, NOW) == pytest.approx(0.12)
    assert retry_after_s({"x-ratelimit-reset-requests": "0s"}, NOW) == 0.0


@pytest.mark.parametrize(
    ("stamp", "seconds"),
    [
        ("2023-11-14T22:15:00Z", 100.0),
        ("2023-11-14T22:15:00+00:00", 100.0),
        ("2023-11-14T23:15:00+01:00", 100.0),
        ("2023-11-14T22:13:20.5Z", 0.5),
        ("2023-11-14T22:13:20Z", 0.0),
        ("2023-11-14T22:00:00Z", 0.0),  # in the past
        ("2023-11-14T22:00:00+00:00", 0.0),
    ],
)
def test_anthropic_reset_rfc3339(stamp: str, seconds: float) -> None:
    assert retry_after_s({"anthropic-ratelimit-requests-reset": stamp}, NOW) == seconds


@pytest.mark.parametrize(
    "name",
    [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-reset",
    ],
)
def test_each_anthropic_reset_header_is_read(name: str) -> None:
    assert retry_after_s({name: "2023-11-14T22:14:00Z"}, NOW) == 40.0


def test_anthropic_resets_take_the_latest() -> None:
    headers = {
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:30Z",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:15:00+00:00",
        "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:14:00Z",
        "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:00:00Z",
    }
    assert retry_after_s(headers, NOW) == 100.0


def test_anthropic_reset_all_in_the_past_is_zero_not_none() -> None:
    headers = {
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:00:00Z",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T21:00:00+00:00",
    }
    assert retry_after_s(headers, NOW) == 0.0


def test_anthropic_reset_without_timezone_is_ignored() -> None:
    assert retry_after_s({"anthropic-ratelimit-requests-reset": "2023-11-14T22:15:00"}, NOW) is None


def test_retry_after_wins_over_anthropic_resets() -> None:
    headers = {"retry-after": "5", "anthropic-ratelimit-tokens-reset": "2023-11-14T22:15:00Z"}
    assert retry_after_s(headers, NOW) == 5.0


# --- retry_after_s: case-insensitive headers (aiohttp's CIMultiDict in production) ------------


def test_ci_multidict_with_mixed_case_names() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        {"Retry-After-Ms": "250", "Retry-After": "9", "X-Request-Id": "req_1"}
    )
    assert retry_after_s(headers, NOW) == 0.25
    assert retry_after_s(CIMultiDictProxy(headers), NOW) == 0.25


def test_ci_multidict_reset_headers() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        {"X-RateLimit-Reset-Requests": "1s", "X-RateLimit-Reset-Tokens": "6m0s"}
    )
    assert retry_after_s(headers, NOW) == 360.0
    headers = CIMultiDict(
        {
            "Anthropic-RateLimit-Tokens-Reset": "2023-11-14T22:15:00Z",
            "ANTHROPIC-RATELIMIT-REQUESTS-RESET": "2023-11-14T22:14:00Z",
        }
    )
    assert retry_after_s(headers, NOW) == 100.0


def test_ci_multidict_http_date() -> None:
    headers: CIMultiDict[str] = CIMultiDict({"RETRY-AFTER": "Tue, 14 Nov 2023 22:15:00 GMT"})
    assert retry_after_s(headers, NOW) == 100.0


# --- classify_status -------------------------------------------------------------------------


def error_body(**error: object) -> bytes:
    return orjson.dumps({"error": error})


OPENAI_QUOTA = error_body(
    message="You exceeded your current quota, please check your plan and billing details.",
    type="insufficient_quota",
    param=None,
    code="insufficient_quota",
)
OPENAI_RATE_LIMIT = error_body(
    message="Rate limit reached for requests",
    type="requests",
    param=None,
    code="rate_limit_exceeded",
)
ANTHROPIC_BILLING = orjson.dumps(
    {"type": "error", "error": {"type": "billing_error", "message": "Your credit balance is low."}}
)
ANTHROPIC_RATE_LIMIT = orjson.dumps(
    {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of requests..."}}
)


@pytest.mark.parametrize("status", [401, 402, 403])
def test_key_fault_statuses_disable_the_key(status: int) -> None:
    verdict = classify_status(status, {}, b"", NOW)
    assert verdict == Verdict(True, f"upstream_{status}", KeyAction.DISABLE)


@pytest.mark.parametrize("status", [401, 402, 403])
def test_key_fault_ignores_x_should_retry_false(status: int) -> None:
    # The caller is not at fault: another key may work whatever the upstream says.
    verdict = classify_status(status, {"x-should-retry": "false"}, b"", NOW)
    assert verdict.retryable is True
    assert verdict.key_action is KeyAction.DISABLE


def test_anthropic_402_billing_error_disables() -> None:
    verdict = classify_status(402, {}, ANTHROPIC_BILLING, NOW)
    assert verdict.retryable is True
    assert verdict.key_action is KeyAction.DISABLE
    assert verdict.provider_backoff is False


def test_429_plain_cools_down_with_the_wait_from_headers() -> None:
    verdict = classify_status(429, {"retry-after": "30"}, ANTHROPIC_RATE_LIMIT, NOW)
    assert verdict == Verdict(True, "rate_limited", KeyAction.COOLDOWN, wait_s=30.0)


def test_429_openai_rate_limit_uses_reset_headers() -> None:
    headers = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}
    verdict = classify_status(429, headers, OPENAI_RATE_LIMIT, NOW)
    assert verdict == Verdict(True, "rate_limited", KeyAction.COOLDOWN, wait_s=360.0)


def test_429_without_any_reset_information_has_no_wait() -> None:
    verdict = classify_status(429, {}, b"", NOW)
    assert verdict == Verdict(True, "rate_limited", KeyAction.COOLDOWN, wait_s=None)


def test_429_with_ci_headers() -> None:
    headers: CIMultiDict[str] = CIMultiDict({"Retry-After-Ms": "1500"})
    assert classify_status(429, headers, b"", NOW).wait_s == 1.5


def test_429_insufficient_quota_disables() -> None:
    verdict = classify_status(429, {"retry-after": "20"}, OPENAI_QUOTA, NOW)
    assert verdict == Verdict(True, "quota_exhausted", KeyAction.DISABLE)


@pytest.mark.parametrize(
    "body",
    [
        error_body(type="insufficient_quota", code=None),
        error_body(type="invalid_request_error", code="insufficient_quota"),
        error_body(type="billing_error"),
        error_body(code="billing_hard_limit_reached"),
    ],
)
def test_429_quota_codes_in_either_field(body: bytes) -> None:
    verdict = classify_status(429, {}, body, NOW)
    assert verdict.reason == "quota_exhausted"
    assert verdict.key_action is KeyAction.DISABLE


@pytest.mark.parametrize("status", [500, 502, 504, 408])
def test_transient_statuses_retry_without_key_action_or_backoff(status: int) -> None:
    verdict = classify_status(status, {}, b"", NOW)
    assert verdict == Verdict(True, f"upstream_{status}")


def test_transient_status_carries_the_wait() -> None:
    assert classify_status(502, {"retry-after": "2"}, b"", NOW).wait_s == 2.0


@pytest.mark.parametrize("status", [503, 529])
def test_overload_statuses_back_the_provider_off(status: int) -> None:
    verdict = classify_status(status, {}, b"", NOW)
    assert verdict == Verdict(True, f"upstream_{status}", provider_backoff=True)
    verdict = classify_status(status, {"retry-after": "4"}, b"", NOW)
    assert verdict == Verdict(True, f"upstream_{status}", provider_backoff=True, wait_s=4.0)


@pytest.mark.parametrize("status", [400, 404, 413, 422, 409, 418])
def test_caller_faults_are_not_retried(status: int) -> None:
    verdict = classify_status(status, {"retry-after": "1"}, b"", NOW)
    assert verdict.retryable is False
    assert verdict.key_action is KeyAction.NONE
    assert verdict.provider_backoff is False


def test_501_is_not_retried_by_default() -> None:
    assert classify_status(501, {}, b"", NOW).retryable is False


@pytest.mark.parametrize("value", ["false", "False", " FALSE "])
def test_x_should_retry_false_on_500_is_not_retried(value: str) -> None:
    verdict = classify_status(500, {"x-should-retry": value}, b"", NOW)
    assert verdict == Verdict(False, "upstream_500")


def test_x_should_retry_true_on_501_is_retried() -> None:
    verdict = classify_status(501, {"x-should-retry": "true", "retry-after": "3"}, b"", NOW)
    assert verdict == Verdict(True, "upstream_501", wait_s=3.0)


def test_x_should_retry_with_ci_headers() -> None:
    headers: CIMultiDict[str] = CIMultiDict({"X-Should-Retry": "False"})
    assert classify_status(502, headers, b"", NOW).retryable is False
    headers = CIMultiDict({"X-Should-Retry": "True"})
    assert classify_status(501, headers, b"", NOW).retryable is True


def test_x_should_retry_true_does_not_make_a_400_retryable() -> None:
    assert classify_status(400, {"x-should-retry": "true"}, b"", NOW).retryable is False


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"null",
        b"[1, 2, 3]",
        b'"insufficient_quota"',
        b'{"error": "insufficient_quota"}',
        b'{"error": {"code": 429, "type": null}}',
        b'{"error": {"code": ["insufficient_quota"]}}',
        b"[" * 100_000,  # deeper than any JSON parser's recursion limit
        b"{" * 1_000_000,
        # a quota body padded beyond the parse limit is not parsed, and does not raise
        OPENAI_QUOTA + b" " * 100_000,
    ],
)
def test_odd_bodies_never_raise(body: bytes) -> None:
    assert classify_status(429, {}, body, NOW) == Verdict(True, "rate_limited", KeyAction.COOLDOWN)
    assert classify_status(500, {}, body, NOW) == Verdict(True, "upstream_500")


# --- classify_stream_error -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "verdict"),
    [
        ("overloaded_error", Verdict(True, "first_event_overloaded", provider_backoff=True)),
        ("rate_limit_error", Verdict(True, "first_event_rate_limited", KeyAction.COOLDOWN)),
        ("rate_limit_exceeded", Verdict(True, "first_event_rate_limited", KeyAction.COOLDOWN)),
        ("insufficient_quota", Verdict(True, "quota_exhausted", KeyAction.DISABLE)),
        ("billing_error", Verdict(True, "quota_exhausted", KeyAction.DISABLE)),
        ("authentication_error", Verdict(True, "first_event_key_error", KeyAction.DISABLE)),
        ("permission_error", Verdict(True, "first_event_key_error", KeyAction.DISABLE)),
        ("invalid_request_error", Verdict(False, "first_event_invalid_request")),
        ("not_found_error", Verdict(False, "first_event_invalid_request")),
        ("request_too_large", Verdict(False, "first_event_invalid_request")),
        ("api_error", Verdict(True, "first_event_error")),
        ("something_new", Verdict(True, "first_event_error")),
        ("", Verdict(True, "first_event_error")),
        (None, Verdict(True, "first_event_error")),
    ],
)
def test_classify_stream_error(error_type: str | None, verdict: Verdict) -> None:
    assert classify_stream_error(error_type) == verdict


def test_classify_stream_error_is_case_insensitive() -> None:
    assert classify_stream_error("Overloaded_Error").provider_backoff is True
    assert classify_stream_error("RATE_LIMIT_ERROR").key_action is KeyAction.COOLDOWN


def test_stream_errors_carry_no_wait() -> None:
    for kind in ("overloaded_error", "rate_limit_error", "insufficient_quota", None):
        assert classify_stream_error(kind).wait_s is None


# --- backoff_s -------------------------------------------------------------------------------


class TopRandom(random.Random):
    """Always draws the top of the range, so a jittered value equals its ceiling."""

    def random(self) -> float:
        return 1.0


class BottomRandom(random.Random):
    def random(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (20, 8.0)],
)
def test_backoff_ceiling_grows_then_caps(attempt: int, ceiling: float) -> None:
    assert backoff_s(attempt, 0.5, 8.0, TopRandom()) == ceiling
    assert backoff_s(attempt, 0.5, 8.0, BottomRandom()) == 0.0


def test_backoff_first_retry_ceiling_is_the_base() -> None:
    assert backoff_s(1, 0.25, 100.0, TopRandom()) == 0.25
    assert backoff_s(1, 3.0, 100.0, TopRandom()) == 3.0


def test_backoff_cap_below_the_base() -> None:
    assert backoff_s(1, 5.0, 2.0, TopRandom()) == 2.0


@pytest.mark.parametrize("attempt", range(1, 9))
def test_backoff_full_jitter_bounds_and_spread(attempt: int) -> None:
    base, cap = 0.5, 8.0
    ceiling = min(cap, base * 2 ** (attempt - 1))
    rng = random.Random(1234 + attempt)
    samples = [backoff_s(attempt, base, cap, rng) for _ in range(1000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    # full jitter: the whole range is used, not a narrow band near the ceiling
    assert max(samples) > 0.98 * ceiling
    assert min(samples) < 0.02 * ceiling
    assert 0.4 * ceiling < sum(samples) / len(samples) < 0.6 * ceiling
    assert len(set(samples)) > 990


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = [backoff_s(n, 0.5, 8.0, random.Random(7)) for n in range(1, 6)]
    second = [backoff_s(n, 0.5, 8.0, random.Random(7)) for n in range(1, 6)]
    assert first == second


def test_backoff_huge_attempt_stays_capped() -> None:
    assert backoff_s(1100, 0.5, 8.0, TopRandom()) == 8.0


# --- 403s the request causes, and prompts too long for the model ------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"type": "error", "error": {"type": "permission_error", "message": "not entitled"}},
        {
            "error": {
                "message": "You are not allowed to sample from this model",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    ],
)
def test_a_403_the_request_causes_keeps_the_key(body: dict[str, object]) -> None:
    verdict = classify_status(403, {}, orjson.dumps(body), NOW)
    assert verdict.key_action is KeyAction.NONE
    assert verdict.retryable and verdict.other_key and verdict.immediate
    assert verdict.reason == "upstream_403"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"forbidden",
        orjson.dumps({"error": {"type": "authentication_error", "message": "bad key"}}),
        orjson.dumps(
            {"error": {"code": "unsupported_country_region_territory", "type": "request_forbidden"}}
        ),
    ],
)
def test_a_403_that_names_no_request_cause_is_a_credential_failure(body: bytes) -> None:
    verdict = classify_status(403, {}, body, NOW)
    assert verdict == Verdict(True, "upstream_403", KeyAction.DISABLE)


@pytest.mark.parametrize(
    "body",
    [
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 250000 tokens > 200000 maximum",
            },
        },
        {
            "object": "error",
            "error": {
                "message": "This model's maximum context length is 4096 tokens. "
                "However, you requested 5000 tokens",
                "type": "BadRequestError",
            },
        },
    ],
)
def test_context_length_400s_ask_for_another_model(body: dict[str, object]) -> None:
    verdict = classify_status(400, {}, orjson.dumps(body), NOW)
    assert verdict.retryable and verdict.other_model and verdict.immediate
    assert verdict.key_action is KeyAction.NONE and not verdict.provider_backoff
    assert verdict.reason == "context_length_exceeded"


def test_other_400s_are_still_final() -> None:
    body = orjson.dumps({"error": {"message": "bad temperature", "type": "invalid_request_error"}})
    assert classify_status(400, {}, body, NOW) == Verdict(False, "upstream_400")
