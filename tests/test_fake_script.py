"""Scripts: parsing, validation and the ``x-fake-*`` header round trip."""

from __future__ import annotations

import pytest

from gateway.fake import FakeScript, ScriptError, parse_script


def test_parse_script_validates_and_names_the_parameter() -> None:
    script = parse_script({"gap-ms": "20", "tool": "true", "status": 429})
    assert script == FakeScript(gap_ms=20.0, tool=True, status=429)
    assert parse_script({"status": None}, script).status is None
    with pytest.raises(ScriptError, match="'chunks'"):
        parse_script({"chunks": "many"})
    with pytest.raises(ScriptError, match="'bogus'"):
        parse_script({"bogus": "1"})
    headers = script.to_headers()
    assert headers == {"x-fake-gap-ms": "20.0", "x-fake-status": "429", "x-fake-tool": "true"}
    assert parse_script({k.removeprefix("x-fake-"): v for k, v in headers.items()}) == script


def test_new_parameters_round_trip_and_validate() -> None:
    script = FakeScript(
        raw_status=101, content_encoding="gzip", echo_key=True, omit_done=True, event_bytes=4096
    )
    headers = script.to_headers()
    assert headers == {
        "x-fake-raw-status": "101",
        "x-fake-content-encoding": "gzip",
        "x-fake-echo-key": "true",
        "x-fake-omit-done": "true",
        "x-fake-event-bytes": "4096",
    }
    assert parse_script({k.removeprefix("x-fake-"): v for k, v in headers.items()}) == script
    assert parse_script({"content_encoding": "DEFLATE"}).content_encoding == "deflate"
    assert parse_script({"content-encoding": "none"}, script).content_encoding is None
    assert parse_script({"raw_status": 999, "event_bytes": 64 * 1024 * 1024}).raw_status == 999
    bad = (
        ("raw_status", "99"),
        ("raw_status", 1000),
        ("content_encoding", "br"),
        ("echo_key", "maybe"),
        ("omit_done", 2),
        ("event_bytes", -1),
        ("event_bytes", 64 * 1024 * 1024 + 1),
    )
    for name, value in bad:
        with pytest.raises(ScriptError, match=f"'{name}'"):
            parse_script({name: value})
