"""Tests for gateway.auth: where the caller's key is read from, and authenticate()'s answers
(never echoing the presented key)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from textwrap import dedent

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import auth
from gateway.auth import MAX_KEY_BYTES, presented_key
from gateway.config import Runtime, build_runtime, load_config_text
from gateway.config.runtime import Caller
from gateway.errors import GatewayError, Kind

FULL_KEY = "gw-full-access-key-0001"
LIMITED_KEY = "gw-limited-key-0002"
LONGEST_OK_KEY = "k" * MAX_KEY_BYTES
TOO_LONG_KEY = "k" * (MAX_KEY_BYTES + 1)
TOO_LONG_MULTIBYTE_KEY = "\u00e9" * (MAX_KEY_BYTES // 2 + 1)  # 257 chars, 514 bytes


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    # Even keys over the size limit are registered: authenticate must refuse them anyway.
    text = dedent(
        f"""\
        auth:
          api_keys:
            - {{id: full, sha256: {sha(FULL_KEY).upper()}}}
            - {{id: limited, sha256: {sha(LIMITED_KEY)}, models: [gpt]}}
            - {{id: longest, sha256: {sha(LONGEST_OK_KEY)}}}
            - {{id: too-long, sha256: {sha(TOO_LONG_KEY)}}}
            - {{id: too-long-mb, sha256: {sha(TOO_LONG_MULTIBYTE_KEY)}}}
        providers:
          oa:
            api: openai
            base_url: http://127.0.0.1:9/v1
            keys:
              - {{id: oa-1, secret: sk-upstream}}
        models:
          gpt:
            - {{provider: oa, model: gpt}}
          other:
            - {{provider: oa, model: other}}
        """
    )
    return build_runtime(load_config_text(text, env={}))


# --- presented_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"Authorization": "Bearer abc"}, "abc"),
        ({"Authorization": "bearer abc"}, "abc"),
        ({"Authorization": "BEARER abc"}, "abc"),
        ({"Authorization": "BeArEr abc"}, "abc"),
        ({"authorization": "Bearer   abc  "}, "abc"),
        ({"AUTHORIZATION": "Bearer abc"}, "abc"),
        ({"x-api-key": "k-1"}, "k-1"),
        ({"X-API-KEY": "  k-1 "}, "k-1"),
        ({"Authorization": "Bearer abc", "x-api-key": "k-1"}, "abc"),
        ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "k-1"}, "k-1"),
        ({"Authorization": "Bearer ", "x-api-key": "k-1"}, "k-1"),
        ({}, None),
        ({"Authorization": ""}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "Bearer     "}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "abc"}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "   "}, None),
        ({"Authorization": "Bearer  ", "x-api-key": " "}, None),
        ({"api-key": "azure-style"}, None),
    ],
)
def test_presented_key(given: dict[str, str], expected: str | None) -> None:
    assert presented_key(CIMultiDictProxy(CIMultiDict(given))) == expected


def test_presented_key_on_a_plain_lowercase_mapping() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"x-api-key": "k"}) == "k"


# --- authenticate -----------------------------------------------------------------------------


def authenticate(given: Mapping[str, str], runtime: Runtime) -> Caller:
    """The real (async) authenticate, driven to completion from these synchronous tests."""
    return asyncio.run(auth.authenticate(given, runtime))


def test_right_key_as_bearer(runtime: Runtime) -> None:
    caller = authenticate(headers(Authorization=f"Bearer {FULL_KEY}"), runtime)
    assert caller == Caller(id="full", models=None)


def test_right_key_as_x_api_key(runtime: Runtime) -> None:
    caller = authenticate(headers(x_api_key=LIMITED_KEY), runtime)
    assert caller == Caller(id="limited", models=frozenset({"gpt"}))
    assert caller is runtime.callers[sha(LIMITED_KEY)]


def test_key_of_exactly_the_size_limit_is_accepted(runtime: Runtime) -> None:
    assert len(LONGEST_OK_KEY.encode()) == MAX_KEY_BYTES
    assert authenticate(headers(x_api_key=LONGEST_OK_KEY), runtime).id == "longest"


def assert_rejected(runtime: Runtime, given: CIMultiDictProxy[str], key: str | None) -> str:
    with pytest.raises(GatewayError) as info:
        authenticate(given, runtime)
    err = info.value
    assert err.status == 401
    assert err.kind is Kind.AUTHENTICATION
    assert err.param is None
    if key:
        assert key not in err.message
        assert key not in str(err)
        assert key not in repr(err.args)
        assert all(key not in v for v in err.headers.values())
    return err.message


def test_missing_key(runtime: Runtime) -> None:
    message = assert_rejected(runtime, headers(), None)
    assert message == (
        "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    )


@pytest.mark.parametrize(
    "given",
    [
        {"Authorization": "Bearer "},
        {"x-api-key": "   "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_blank_or_unusable_key_is_missing(runtime: Runtime, given: dict[str, str]) -> None:
    message = assert_rejected(runtime, CIMultiDictProxy(CIMultiDict(given)), None)
    assert message.startswith("Missing API key")


@pytest.mark.parametrize(
    "wrong",
    [
        "gw-wrong-key-9999",
        FULL_KEY + "x",
        FULL_KEY.upper(),
        sha(FULL_KEY),  # the stored digest is not a key
        "\udcff\udcfe-surrogate-escaped-bytes",
    ],
)
def test_wrong_key(runtime: Runtime, wrong: str) -> None:
    assert assert_rejected(runtime, headers(Authorization=f"Bearer {wrong}"), wrong) == (
        "Invalid API key."
    )
    assert assert_rejected(runtime, headers(x_api_key=wrong), wrong) == "Invalid API key."


@pytest.mark.parametrize("key", [TOO_LONG_KEY, TOO_LONG_MULTIBYTE_KEY, "z" * 100_000])
def test_oversized_key_rejected_even_if_registered(runtime: Runtime, key: str) -> None:
    assert len(key.encode()) > MAX_KEY_BYTES
    assert assert_rejected(runtime, headers(x_api_key=key), key) == "Invalid API key."
    assert assert_rejected(runtime, headers(Authorization=f"Bearer {key}"), key) == (
        "Invalid API key."
    )


def test_bearer_wins_over_x_api_key(runtime: Runtime) -> None:
    given = headers(Authorization=f"Bearer {LIMITED_KEY}", x_api_key=FULL_KEY)
    assert authenticate(given, runtime).id == "limited"
    wrong_bearer = headers(Authorization="Bearer gw-nope", x_api_key=FULL_KEY)
    assert assert_rejected(runtime, wrong_bearer, "gw-nope") == "Invalid API key."


def test_no_callers_configured_rejects_everyone() -> None:
    text = dedent(
        """\
        providers:
          oa:
            api: openai
            base_url: http://127.0.0.1:9/v1
            keys:
              - {id: oa-1, secret: sk-upstream}
        models:
          gpt:
            - {provider: oa, model: gpt}
        """
    )
    empty = build_runtime(load_config_text(text, env={}))
    assert assert_rejected(empty, headers(x_api_key=FULL_KEY), FULL_KEY) == "Invalid API key."
