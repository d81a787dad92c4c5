"""Spend budgets, sans-I/O first: the calendar windows (gateway.limits.budget), what a state
says is left and spent, pricing and money; the SSE cut points (`event_ends`) and the observers'
`content_size`; then the stream meter (gateway.budget.BudgetMeter) against a MemoryLimiter with
a frozen wall clock, and admission's `check` with its 429 and headers.

The backend contract of `Limiter.budget` (memory and a real redis-server) is in
tests/test_limits_budget.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.budget import (
    CHARGE_INTERVAL_S,
    REMAINING,
    REMAINING_COST,
    BudgetMeter,
    BudgetTallies,
    charge_answer,
    check,
    remaining_headers,
)
from gateway.config.schema import TelemetryConfig
from gateway.errors import GatewayError, Kind
from gateway.limits.base import LimiterUnavailable
from gateway.limits.budget import (
    NANO,
    BudgetSpec,
    BudgetState,
    Pricing,
    WindowClock,
    Windows,
    money,
    retry_seconds,
    to_nano,
)
from gateway.limits.memory import MemoryLimiter
from gateway.providers.anthropic import MessagesObserver
from gateway.providers.base import Usage
from gateway.providers.openai import ChatObserver, ResponsesObserver
from gateway.report import Report
from gateway.sse import SSEDecoder, SSEEvent, event_ends
from gateway.telemetry import Telemetry

DAY = 86400.0


def utc(text: str) -> float:
    """Unix seconds of an ISO moment in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


NOW = utc("2027-01-15T10:00:00")  # a plain mid-month moment


# --- calendar windows ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "day", "month", "day_end", "month_end"),
    [
        ("2027-01-15T10:00:00", "2027-01-15", "2027-01", "2027-01-16", "2027-02-01"),
        # The last second of a year: the day and the month both end at the new year.
        ("2026-12-31T23:59:59", "2026-12-31", "2026-12", "2027-01-01", "2027-01-01"),
        ("2027-01-01T00:00:00", "2027-01-01", "2027-01", "2027-01-02", "2027-02-01"),
        # February: 28 days in 2027, 29 in the leap year 2028.
        ("2027-02-28T12:00:00", "2027-02-28", "2027-02", "2027-03-01", "2027-03-01"),
        ("2028-02-28T12:00:00", "2028-02-28", "2028-02", "2028-02-29", "2028-03-01"),
        ("2028-02-29T00:00:00", "2028-02-29", "2028-02", "2028-03-01", "2028-03-01"),
        ("2028-03-01T00:00:00", "2028-03-01", "2028-03", "2028-03-02", "2028-04-01"),
        # The last second (and the last millisecond) of a day still belongs to it.
        ("2027-06-30T23:59:59", "2027-06-30", "2027-06", "2027-07-01", "2027-07-01"),
        ("2027-06-30T23:59:59.999", "2027-06-30", "2027-06", "2027-07-01", "2027-07-01"),
    ],
)
def test_windows_at(moment: str, day: str, month: str, day_end: str, month_end: str) -> None:
    t = utc(moment)
    w = Windows.at(t)
    assert (w.day, w.month) == (day, month)
    assert w.day_start == utc(day + "T00:00:00")
    assert w.day_end == utc(day_end + "T00:00:00")
    assert w.month_end == utc(month_end + "T00:00:00")
    assert w.day_end - w.day_start == DAY
    assert w.holds(t)
    assert not w.holds(w.day_end)
    assert not w.holds(w.day_start - 0.001)


# Whole microseconds (the sub-microsecond edge has its own test below).
_MOMENTS = st.integers(
    int(utc("2000-01-01T00:00:00")) * 10**6, int(utc("2100-01-01T00:00:00")) * 10**6
)


@settings(max_examples=300, deadline=None)
@given(_MOMENTS.map(lambda us: us / 10**6))
def test_windows_hold_the_moment_they_are_made_for(t: float) -> None:
    w = Windows.at(t)
    assert w.holds(t)
    assert w.day_start <= t < w.day_end <= w.month_end
    assert w.day == iso(w.day_start)[:10]
    assert w.month == w.day[:7]


def test_the_last_instant_of_a_day_belongs_to_it() -> None:
    midnight = utc("2027-01-16T00:00:00")
    t = math.nextafter(midnight, 0)  # 2.4e-7 s before midnight
    w = Windows.at(t)
    assert w.day == "2027-01-15"
    assert w.holds(t)


def test_windows_are_utc_whatever_the_day_length_elsewhere() -> None:
    # 2027-03-28 is a 23-hour day in Europe; in UTC every day is 86400 s.
    w = Windows.at(utc("2027-03-28T01:30:00"))
    assert w.day == "2027-03-28"
    assert w.day_end - w.day_start == DAY


def test_window_clock_reuses_the_day_then_moves_on() -> None:
    clock = WindowClock()
    start = utc("2026-12-31T00:00:00")
    first = clock.at(start)
    assert clock.at(start + 1) is first
    assert clock.at(start + DAY - 1) is first  # the day's last second
    new_year = clock.at(start + DAY)
    assert new_year is not first
    assert (new_year.day, new_year.month) == ("2027-01-01", "2027-01")
    assert clock.at(start + DAY + 3600) is new_year
    # A clock stepped back (NTP) gets its own window again, not the later one.
    back = clock.at(start + 10)
    assert back.day == "2026-12-31"
    assert back == first


# --- what a state says is left and spent -----------------------------------------------------


def state(
    tokens_day: int = 0,
    cost_day: int = 0,
    tokens_month: int | None = None,
    cost_month: int | None = None,
    *,
    now: float = NOW,
    divisor: int = 1,
) -> BudgetState:
    return BudgetState(
        Windows.at(now),
        tokens_day,
        cost_day,
        tokens_day if tokens_month is None else tokens_month,
        cost_day if cost_month is None else cost_month,
        "memory",
        now,
        divisor=divisor,
    )


def test_remaining_is_none_without_such_a_budget() -> None:
    s = state(10, 10)
    assert s.remaining_tokens(BudgetSpec("t")) is None
    assert s.remaining_cost(BudgetSpec("t")) is None
    assert s.remaining_cost(BudgetSpec("t", tokens_per_day=100)) is None
    assert s.remaining_tokens(BudgetSpec("t", cost_per_month=100)) is None
    assert s.spent(BudgetSpec("t")) is None


def test_remaining_picks_the_tightest_window() -> None:
    spec = BudgetSpec("t", 100, 1000, 50, 500)
    # Early in the month: the day is tighter.
    s = state(30, 20, 40, 25)
    assert s.remaining_tokens(spec) == 70
    assert s.remaining_cost(spec) == 30
    # The month almost gone: the month is tighter than a fresh day.
    s = state(0, 0, 990, 495)
    assert s.remaining_tokens(spec) == 10
    assert s.remaining_cost(spec) == 5
    # Only one window set: that one.
    assert state(0, 0, 990, 0).remaining_tokens(BudgetSpec("t", tokens_per_day=100)) == 100
    assert state(0, 0, 990, 0).remaining_tokens(BudgetSpec("t", tokens_per_month=1000)) == 10
    # Overspent: negative (the headers clamp it, not the state).
    assert state(120).remaining_tokens(BudgetSpec("t", tokens_per_day=100)) == -20


def test_spent_is_none_until_a_budget_is_used_up() -> None:
    spec = BudgetSpec("t", tokens_per_day=100, cost_per_day=50)
    assert state(99, 49).spent(spec) is None
    s = state(100, 0)
    assert s.spent(spec) == ("tokens_per_day", s.windows.day_end - NOW)
    s = state(0, 50)
    assert s.spent(spec) == ("cost_per_day", s.windows.day_end - NOW)


def test_spent_waits_for_the_latest_spent_window_month_beats_day() -> None:
    spec = BudgetSpec("t", tokens_per_day=100, tokens_per_month=150, cost_per_day=10)
    s = state(100, 10, 150, 10)  # every budget spent
    name, wait = s.spent(spec) or ("", 0.0)
    assert name == "tokens_per_month"
    assert wait == s.windows.month_end - NOW
    assert wait > s.windows.day_end - NOW
    # Only the day spent: until midnight.
    name, wait = state(100, 0, 120, 0).spent(spec) or ("", 0.0)
    assert (name, wait) == ("tokens_per_day", s.windows.day_end - NOW)
    # A cost month budget spent, a token day budget spent: the month wins, whatever its kind.
    spec = BudgetSpec("t", tokens_per_day=100, cost_per_month=10)
    name, wait = state(100, 0, 100, 10).spent(spec) or ("", 0.0)
    assert (name, wait) == ("cost_per_month", s.windows.month_end - NOW)


def test_spent_on_the_last_day_of_a_month_names_the_month() -> None:
    now = utc("2027-01-31T18:00:00")
    spec = BudgetSpec("t", tokens_per_day=100, tokens_per_month=100)
    s = state(100, now=now)
    assert s.spent(spec) == ("tokens_per_month", 6 * 3600.0)


def test_divisor_scales_every_budget() -> None:
    spec = BudgetSpec("t", tokens_per_day=100, tokens_per_month=1000, cost_per_day=10)
    assert spec.scaled(1) is spec
    assert spec.scaled(0) is spec
    assert spec.scaled(3) == BudgetSpec("t", 33, 333, 3, None)
    assert BudgetSpec("t", tokens_per_day=2).scaled(5).tokens_per_day == 1  # at least 1
    s = state(20, 2, divisor=3)
    assert s.remaining_tokens(spec) == 13
    assert s.remaining_cost(spec) == 1
    assert s.spent(spec) is None
    s = state(33, 0, divisor=3)
    assert s.spent(spec) == ("tokens_per_day", s.windows.day_end - NOW)
    assert state(33, 0).spent(spec) is None  # undivided, 33 of 100 is not spent


# --- pricing and money -----------------------------------------------------------------------


def test_pricing_of_units_per_million_tokens() -> None:
    p = Pricing.of(0.15, 0.6)
    assert p == Pricing(150_000_000, 600_000_000)
    assert p.cost(1_000_000, 0) == 150_000_000
    assert p.cost(0, 1_000_000) == 600_000_000
    assert p.cost(1000, 500) == 150_000 + 300_000
    assert p.output_cost(1) == 600
    assert p.cost(0, 0) == 0
    assert p.output_cost(0) == 0


def test_pricing_rounds_up_never_under() -> None:
    p = Pricing(1, 3)  # nano-units per million tokens: a fraction of a nano-unit a token
    assert p.cost(1, 0) == 1
    assert p.cost(0, 1) == 1
    assert p.output_cost(1) == 1
    assert p.cost(1_000_000, 1_000_000) == 4
    assert p.cost(1_000_001, 0) == 2
    half = Pricing(0, 1_500_000)  # 1.5 nano-units a token
    assert [half.output_cost(n) for n in range(5)] == [0, 2, 3, 5, 6]
    for n in range(50):
        assert half.output_cost(n) * 2 >= n * 3  # never under the exact figure
        assert half.output_cost(n) * 2 - n * 3 < 2  # and less than one nano-unit over


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (4_999_850_000, "4.99985"),
        (50_000_000, "0.05"),
        (1, "0.000000001"),
        (1_500_000_001, "1.500000001"),
        (123 * NANO + 400_000_000, "123.4"),
        # Whole amounts without a fraction; nothing left (or less) is "0".
        (5 * NANO, "5"),
        (10 * NANO, "10"),
        (100 * NANO + 10, "100.00000001"),
        (0, "0"),
        (-5, "0"),
        (-NANO, "0"),
    ],
)
def test_money(nano: int, text: str) -> None:
    assert money(nano) == text


def test_to_nano_and_retry_seconds() -> None:
    assert to_nano(None) is None
    assert to_nano(0) == 0
    assert to_nano(0.05) == 50_000_000
    assert to_nano(4.99985) == 4_999_850_000
    assert to_nano(1e-9) == 1
    assert to_nano(12) == 12 * NANO
    assert [retry_seconds(w) for w in (0.0, 0.2, 1.0, 1.01, 3600.5)] == [1, 1, 1, 2, 3601]


# --- event_ends: where a read may be cut -----------------------------------------------------


def pieces(chunk: bytes) -> list[bytes]:
    out, start = [], 0
    for end in event_ends(chunk):
        out.append(chunk[start:end])
        start = end
    return out


def dispatches(chunks: list[bytes]) -> list[tuple[bytes, list[SSEEvent]]]:
    """Each piece (of each chunk, cut at its event_ends) with the events it completed."""
    decoder = SSEDecoder()
    return [(p, decoder.feed(p)) for chunk in chunks for p in pieces(chunk)]


def whole(stream: bytes) -> list[SSEEvent]:
    return SSEDecoder().feed(stream)


def test_event_ends_lf() -> None:
    chunk = b"data: a\n\ndata: b\n\n"
    assert event_ends(chunk) == [9, 18]
    assert [len(e) for _, e in dispatches([chunk])] == [1, 1]


def test_event_ends_cr() -> None:
    chunk = b"data: a\r\rdata: b\r\r"
    assert event_ends(chunk) == [9, 18]
    assert [len(e) for _, e in dispatches([chunk])] == [1, 1]


def test_event_ends_crlf() -> None:
    chunk = b"data: a\r\n\r\ndata: b\r\n\r\npartial"
    ends = event_ends(chunk)
    # Every blank line's end is there (and the chunk's end); spare offsets dispatch nothing.
    assert {11, 22, len(chunk)} <= set(ends)
    assert ends == sorted(ends)
    assert ends[-1] == len(chunk)
    got = dispatches([chunk])
    assert [(p, [e.data for e in events]) for p, events in got if events] == [
        (b"\r\n", [b"a"]),
        (b"\r\n", [b"b"]),
    ]
    assert b"".join(p for p, _ in got) == chunk


def test_event_ends_comment_block_and_fields() -> None:
    chunk = b": keep-alive\n\nevent: x\nid: 7\ndata: a\n\n:c\ndata: b\n\n"
    ends = event_ends(chunk)
    assert 14 in ends  # the comment block ends (nothing dispatched there)
    got = dispatches([chunk])
    assert [len(e) for _, e in got] == [0, 1, 1]
    assert [e for _, events in got for e in events] == whole(chunk)


def test_event_ends_chunk_opening_with_a_line_end() -> None:
    # The previous read ended the data line: the first byte of this one is the blank line.
    first, second = b"data: a\n", b"\ndata: b\n\n"
    assert event_ends(second)[0] == 1
    got = dispatches([first, second])
    assert [(p, [e.data for e in events]) for p, events in got] == [
        (b"data: a\n", []),
        (b"\n", [b"a"]),
        (b"data: b\n\n", [b"b"]),
    ]
    # The same with CRLF, and with CR.
    assert event_ends(b"\r\ndata: b\r\n\r\n")[0] == 2
    assert event_ends(b"\rdata: b\r\r")[0] == 1
    got = dispatches([b"data: a\r\n", b"\r\ndata: b\r\n\r\n"])
    assert [(p, [e.data for e in events]) for p, events in got if p] == [
        (b"data: a\r\n", []),
        (b"\r\n", [b"a"]),
        (b"data: b\r\n", []),
        (b"\r\n", [b"b"]),
    ]


def test_event_ends_chunk_split_inside_a_crlf() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    # The blank line's CR ends the first read; its LF opens the second.
    first, second = stream[:10], stream[10:]
    assert first.endswith(b"\r")
    assert second.startswith(b"\n")
    got = dispatches([first, second])
    assert got[0][0] == b"data: a\r\n"
    assert [e.data for e in got[1][1]] == [b"a"]  # the CR dispatched it
    assert got[2] == (b"\n", [])  # the LF of that CRLF dispatches nothing more
    assert [e for _, events in got for e in events] == whole(stream)
    # Split between the data line's CR and LF.
    first, second = stream[:8], stream[8:]
    got = dispatches([first, second])
    assert [e for _, events in got for e in events] == whole(stream)
    assert all(len(events) <= 1 for _, events in got)


@pytest.mark.parametrize(
    "chunk",
    [
        # A data line's end and the blank line's end of different kinds: CRLF then LF is
        # no CRLF CRLF (two matches overlap there).
        b"data: a\r\n\ndata: b\n\n",
        b"data: a\n\r\ndata: b\r\n\r\n",
        b"data: a\r\r\ndata: b\r\n\r",
        b"data: a\r\n\rdata: b\n\r\n",
        b"data: a\n\n\ndata: b\n\n\n\ndata: c\n\n",
    ],
)
def test_event_ends_mixed_line_ends(chunk: bytes) -> None:
    got = dispatches([chunk])
    assert all(len(events) <= 1 for _, events in got)
    assert [e for _, events in got for e in events] == whole(chunk)
    assert len(whole(chunk)) >= 2


def test_event_ends_edges() -> None:
    assert event_ends(b"") == [0]
    assert event_ends(b"\n") == [1]
    assert event_ends(b"data: a") == [7]
    assert event_ends(b"data: a\n") == [8]


_SSE_TOKENS = [
    b"data: a",
    b"data: \xc3\xa9",
    b"data:b",
    b"data",
    b"event: e",
    b": c",
    b"id: 1",
    b"retry: 5",
    b"x",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"\r\r",
]


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    stream = bom + b"".join(draw(st.lists(st.sampled_from(_SSE_TOKENS), max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=1000, deadline=None)
@given(chunked_streams())
def test_feeding_at_event_ends_is_feeding_whole(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    got = dispatches(chunks)
    # Each piece ends where at most one event can complete...
    assert all(len(events) <= 1 for _, events in got)
    # ...and together they are the stream, decoded as if it came whole.
    assert b"".join(p for p, _ in got) == stream
    assert [e for _, events in got for e in events] == whole(stream)
    for chunk in chunks:
        ends = event_ends(chunk)
        assert ends == sorted(ends)
        assert ends[-1] == len(chunk)


def test_pending_bytes_counts_the_event_being_assembled() -> None:
    decoder = SSEDecoder()
    assert decoder.pending_bytes == 0
    decoder.feed(b"data: abc\ndata: de")
    assert decoder.pending_bytes == 3 + len(b"data: de")
    decoder.feed(b"\n")
    assert decoder.pending_bytes == 5
    assert len(decoder.feed(b"\n")) == 1
    assert decoder.pending_bytes == 0


# --- content_size of each observer -----------------------------------------------------------


def chat(delta: dict[str, object], **extra: object) -> SSEEvent:
    obj: dict[str, object] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta}],
    }
    obj.update(extra)
    return SSEEvent("", orjson.dumps(obj), None, None)


def typed(name: str, obj: dict[str, object], *, named: bool = True) -> SSEEvent:
    return SSEEvent(name if named else "", orjson.dumps({"type": name, **obj}), None, None)


@pytest.mark.parametrize(
    ("event", "size"),
    [
        (chat({"content": "Hello"}), 5),
        (chat({"content": "héllo 日本語"}), 9),  # characters, not the 15 UTF-8 bytes
        (chat({"content": "👍"}), 1),
        (chat({"reasoning_content": "think"}), 5),
        (chat({"reasoning": "hmm"}), 3),
        (chat({"refusal": "No."}), 3),
        (chat({"content": "ab", "reasoning_content": "cd"}), 4),
        (
            chat(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":'},
                        },
                        {"index": 1, "function": {"arguments": '"Paris"}'}},
                    ]
                }
            ),
            len("get_weather") + len('{"city":') + len('"Paris"}'),
        ),
        (chat({"function_call": {"name": "f", "arguments": "{}"}}), 3),
        (chat({"role": "assistant"}), 0),
        (chat({"role": "assistant", "content": ""}), 0),
        (chat({"content": None}), 0),
        (chat({}, usage={"prompt_tokens": 3, "completion_tokens": 5}), 0),
        (SSEEvent("", b"[DONE]", None, None), 0),
        (SSEEvent("", b"not json", None, None), 0),
        (SSEEvent("", b'{"choices":"x"}', None, None), 0),
    ],
)
def test_chat_content_size(event: SSEEvent, size: int) -> None:
    assert ChatObserver().content_size(event) == size


def test_chat_content_size_sums_every_choice() -> None:
    obj = {"choices": [{"index": 0, "delta": {"content": "abc"}}, {"delta": {"content": "de"}}]}
    assert ChatObserver().content_size(SSEEvent("", orjson.dumps(obj), None, None)) == 5


def test_legacy_completions_content_size() -> None:
    observer = ChatObserver(text_completion=True)
    event = SSEEvent(
        "", b'{"object":"text_completion","choices":[{"text":"h\xc3\xa9y"}]}', None, None
    )
    assert observer.content_size(event) == 3
    assert observer.content_size(SSEEvent("", b'{"choices":[{"text":""}]}', None, None)) == 0
    assert observer.content_size(SSEEvent("", b"[DONE]", None, None)) == 0
    # A completions observer reads `text`, not a chat delta.
    assert observer.content_size(chat({"content": "abc"})) == 0


@pytest.mark.parametrize("named", [True, False])
def test_responses_content_size(named: bool) -> None:
    observer = ResponsesObserver()

    def size(name: str, **obj: object) -> int:
        return observer.content_size(typed(name, obj, named=named))

    assert size("response.output_text.delta", delta="Hi thére", sequence_number=3) == 8
    assert size("response.refusal.delta", delta="no") == 2
    assert size("response.reasoning_summary_text.delta", delta="why") == 3
    assert size("response.function_call_arguments.delta", delta='{"a":1}') == 7
    assert size("response.output_text.delta", delta="") == 0
    assert size("response.output_text.delta", delta=None) == 0
    assert size("response.created", response={"id": "r"}) == 0
    assert size("response.output_text.done", text="Hi there") == 0
    assert size("response.completed", response={"usage": {"output_tokens": 4}}) == 0
    assert size("error", message="boom") == 0


def test_responses_content_size_trusts_the_event_name() -> None:
    observer = ResponsesObserver()
    # The name says it is no delta: the payload is not even read.
    event = SSEEvent("response.completed", b'{"type":"x.delta","delta":"abc"}', None, None)
    assert observer.content_size(event) == 0
    assert observer.content_size(SSEEvent("response.output_text.delta", b"{", None, None)) == 0


@pytest.mark.parametrize("named", [True, False])
def test_messages_content_size(named: bool) -> None:
    observer = MessagesObserver()

    def size(name: str, **obj: object) -> int:
        return observer.content_size(typed(name, obj, named=named))

    delta = "content_block_delta"
    assert size(delta, index=0, delta={"type": "text_delta", "text": "Bonjour à tous"}) == 14
    assert size(delta, index=1, delta={"type": "input_json_delta", "partial_json": '{"q":'}) == 5
    assert size(delta, index=0, delta={"type": "thinking_delta", "thinking": "so…"}) == 3
    assert size(delta, index=0, delta={"type": "signature_delta", "signature": "EqQB"}) == 0
    assert size(delta, index=0, delta={"type": "text_delta", "text": ""}) == 0
    assert size(delta, index=0, delta="text") == 0
    message = {"id": "m", "usage": {"input_tokens": 9, "output_tokens": 1}}
    assert size("message_start", message=message) == 0
    assert size("content_block_start", index=0, content_block={"type": "text", "text": "x"}) == 0
    assert size("content_block_stop", index=0) == 0
    assert size("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 5}) == 0
    assert size("message_stop") == 0
    assert size("ping") == 0
    assert size("error", error={"type": "overloaded_error", "message": "x"}) == 0


# --- the stream meter, against a MemoryLimiter -----------------------------------------------


class Wall:
    """A frozen wall clock (unix seconds) that moves only when told."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Spent:
    """An `on_spent` callback that counts its calls."""

    calls: int = 0

    def __call__(self) -> None:
        self.calls += 1


async def turns(n: int = 5) -> None:
    """A few loop turns: a charge the meter sends is back by then (MemoryLimiter answers
    without waiting); one it does not send by then is not sent at all without another count
    (the meter has no timer)."""
    for _ in range(n):
        await asyncio.sleep(0)


def due() -> float:
    """A `now` (perf_counter) at least CHARGE_INTERVAL_S after every charge already back: far
    from the edge, a count then starts a charge. (A `now` read before a charge was sent is
    less than CHARGE_INTERVAL_S after its return: a count then, or up to CHARGE_INTERVAL_S
    later, is batched.)"""
    return time.perf_counter() + CHARGE_INTERVAL_S


def used(limiter: MemoryLimiter, subject: str = "alice") -> tuple[int, int]:
    s = limiter.budget_now(subject, 0, 0)
    assert (s.tokens_day, s.cost_day) == (s.tokens_month, s.cost_month)
    return s.tokens_day, s.cost_day


def figures(s: BudgetState) -> tuple[int, int, int, int]:
    return s.tokens_day, s.cost_day, s.tokens_month, s.cost_month


async def meter_for(
    limiter: MemoryLimiter,
    spec: BudgetSpec,
    *,
    prompt: int = 0,
    pricing: Pricing | None = None,
    subject: str = "alice",
) -> BudgetMeter:
    standing = await limiter.budget(subject, spec, 0, 0)
    return BudgetMeter(limiter, subject, spec, standing, pricing, prompt)


async def test_an_event_counts_a_quarter_of_its_characters_rounded_up_at_least_one() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=10_000))
    counted = []
    for chars in (1, 2, 3, 4, 5, 8, 9, 400, 401):
        before = meter.output_tokens
        meter.count(chars, time.perf_counter())
        counted.append(meter.output_tokens - before)
    assert counted == [1, 1, 1, 1, 2, 2, 3, 100, 101]
    assert await meter.close(None, complete=True) == (sum(counted), 0)
    assert used(limiter) == (sum(counted), 0)


async def test_count_is_true_exactly_when_the_tokens_left_reach_zero() -> None:
    limiter = MemoryLimiter(wall=Wall())
    spec = BudgetSpec("t", tokens_per_day=20)
    meter = await meter_for(limiter, spec, prompt=4)  # 16 left once the prompt is counted
    spent = Spent()
    t0 = time.perf_counter()
    meter.start(spent)
    assert meter.count(16, t0) is False  # 4 tokens: 12 left
    assert meter.count(44, t0) is False  # 11 tokens: 1 left
    assert not meter.spent
    assert meter.count(1, t0) is True  # 1 token: 0 left
    assert (meter.spent, meter.spent_by) == (True, "tokens")
    assert meter.count(4, t0) is True  # stays spent
    await turns()
    # The first charge (sent at the first loop turn after start) carries all of them.
    assert used(limiter) == (4 + 4 + 11 + 1 + 1, 0)
    assert spent.calls == 0  # spent by its own count: the relay knows from `count`
    assert await meter.close(None, complete=True) == (21, 0)


async def test_count_is_true_when_an_event_overshoots() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_month=10))
    t0 = time.perf_counter()
    assert meter.count(36, t0) is False  # 9 tokens: 1 left
    assert meter.count(9, t0) is True  # 3 tokens: -2 left
    assert meter.output_tokens == 12
    assert await meter.close(None, complete=True) == (12, 0)


async def test_count_reaching_exactly_zero_spends() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_month=10))
    assert meter.count(40, time.perf_counter()) is True  # 10 tokens: 0 left
    assert await meter.close(None, complete=True) == (10, 0)


async def test_the_prompt_is_charged_first_with_its_cost() -> None:
    limiter = MemoryLimiter(wall=Wall())
    price = Pricing.of(1.0, 3.0)  # 1000 and 3000 nano-units a token
    spec = BudgetSpec("t", tokens_per_day=1000, cost_per_day=10 * NANO)
    meter = await meter_for(limiter, spec, prompt=37, pricing=price)
    assert used(limiter) == (0, 0)  # nothing charged before the stream starts
    meter.start(Spent())
    assert used(limiter) == (0, 0)  # the charge goes out at the next loop turn
    await turns()
    assert used(limiter) == (37, 37_000)
    meter.count(8, due())
    await turns()
    assert used(limiter) == (39, 37_000 + 6_000)
    assert await meter.close(None, complete=True) == (39, 43_000)


async def test_a_prompt_that_spends_the_budget_spends_it_at_once() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=10), prompt=10)
    assert (meter.spent, meter.spent_by) == (True, "tokens")
    assert not meter.roomy(1)
    assert await meter.close(None, complete=True) == (10, 0)
    assert used(limiter) == (10, 0)


async def test_the_meter_starts_from_the_shared_figures() -> None:
    limiter = MemoryLimiter(wall=Wall())
    limiter.budget_now("alice", 90, 0)  # spent elsewhere earlier today
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=100), prompt=5)
    t0 = time.perf_counter()
    assert meter.count(16, t0) is False  # 4 tokens: 1 left
    assert meter.count(1, t0) is True
    assert await meter.close(None, complete=True) == (10, 0)
    assert used(limiter) == (100, 0)


async def test_cost_budget_counts_each_event_at_the_output_price_rounded_cumulatively() -> None:
    limiter = MemoryLimiter(wall=Wall())
    price = Pricing(0, 1_500_000)  # 1.5 nano-units an output token
    spec = BudgetSpec("t", cost_per_day=100)
    meter = await meter_for(limiter, spec, pricing=price)
    meter.start(Spent())
    t0 = time.perf_counter()
    results = [meter.count(1, t0) for _ in range(70)]  # one token each
    # Rounded on the running total (100.5 -> 101 at 67 tokens), not per event (2 each: 50).
    assert results.index(True) == 66
    assert (meter.spent, meter.spent_by) == (True, "cost")
    await turns()
    assert used(limiter) == (70, price.output_cost(70))
    assert price.output_cost(70) == 105
    assert await meter.close(None, complete=True) == (70, 105)


async def test_cost_budget_without_pricing_costs_nothing() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", cost_per_day=1), prompt=100)
    t0 = time.perf_counter()
    assert not any(meter.count(400, t0) for _ in range(10))
    assert await meter.close(None, complete=True) == (1100, 0)
    assert used(limiter) == (1100, 0)


async def test_charges_reach_the_limiter_in_the_background() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=10_000), prompt=3)
    meter.start(Spent())
    t0 = time.perf_counter()
    for _ in range(10):
        meter.count(40, t0)  # 10 tokens each
    assert used(limiter) == (0, 0)  # counted here; the charge waits for a loop turn
    await turns()
    assert used(limiter) == (103, 0)  # the first charge takes all of it
    meter.count(4, due())
    assert used(limiter) == (103, 0)
    await turns()
    assert used(limiter) == (104, 0)
    assert await meter.close(None, complete=True) == (104, 0)
    assert used(limiter) == (104, 0)
    assert meter.failures == 0


async def test_a_second_meter_sees_the_first_ones_charges() -> None:
    limiter = MemoryLimiter(wall=Wall())
    spec = BudgetSpec("t", tokens_per_day=100)
    standing = await limiter.budget("alice", spec, 0, 0)
    first = BudgetMeter(limiter, "alice", spec, standing, None, 10)
    second = BudgetMeter(limiter, "alice", spec, standing, None, 10)
    spent_first, spent_second = Spent(), Spent()
    t0 = time.perf_counter()
    first.start(spent_first)
    second.start(spent_second)
    await turns()
    assert used(limiter) == (20, 0)
    # The first charged its prompt before the second did: it knows of 90 left.
    assert first.count(4 * 90, t0) is True  # 90 tokens: spent as far as it knows
    await turns()  # (at the edge: charged at once)
    assert used(limiter) == (110, 0)
    # The second goes on its own (stale) figures, 79 left: far from the edge, and within
    # CHARGE_INTERVAL_S of its last charge, this count is only counted.
    assert second.count(4, t0) is False
    await turns()
    assert used(limiter) == (110, 0)
    assert (second.spent, spent_second.calls) == (False, 0)
    # A count CHARGE_INTERVAL_S later sends both; the reply brings the shared figures.
    assert second.count(4, due()) is False
    await turns()
    assert used(limiter) == (112, 0)
    assert spent_second.calls == 1
    assert (second.spent, second.spent_by) == (True, "tokens")
    assert second.count(4, t0) is True  # past the edge: charged at once, whatever `now`
    await turns()
    assert used(limiter) == (113, 0)
    assert spent_second.calls == 1  # once
    assert spent_first.calls == 0  # it knew from `count`
    assert await first.close(None, complete=True) == (100, 0)
    assert await second.close(None, complete=True) == (13, 0)
    assert used(limiter) == (113, 0)


async def test_on_spent_is_called_when_another_stream_spends_the_budget() -> None:
    limiter = MemoryLimiter(wall=Wall())
    spec = BudgetSpec("t", tokens_per_day=50)
    meter = await meter_for(limiter, spec)
    spent = Spent()
    meter.start(spent)
    await turns()  # no prompt: nothing to charge
    assert used(limiter) == (0, 0)
    meter.count(4, due())
    await turns()
    assert used(limiter) == (1, 0)
    t1 = time.perf_counter()  # (after that charge is back)
    limiter.budget_now("alice", 60, 0)  # another instance, or a whole answer
    assert meter.count(4, t1) is False  # its own figures: 48 left; batched
    await turns()
    assert (spent.calls, meter.spent) == (0, False)
    assert used(limiter) == (61, 0)
    assert meter.count(4, due()) is False
    await turns()
    assert used(limiter) == (63, 0)
    assert spent.calls == 1
    assert (meter.spent, meter.spent_by) == (True, "tokens")
    assert await meter.close(None, complete=True) == (3, 0)


async def test_close_with_the_upstream_usage_charges_the_difference() -> None:
    limiter = MemoryLimiter(wall=Wall())
    price = Pricing.of(1.0, 2.0)
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=10, pricing=price)
    meter.start(Spent())
    t0 = time.perf_counter()
    for _ in range(5):
        meter.count(24, t0)  # 6 tokens each: 30 counted
    await turns()
    assert used(limiter) == (40, 10_000 + 60_000)  # in the first charge, with the prompt
    # The upstream says 12 + 35: 7 more than charged.
    assert await meter.close(Usage(12, 35), complete=True) == (47, price.cost(12, 35))
    assert used(limiter) == (47, 12_000 + 70_000)


async def test_close_with_the_upstream_usage_can_refund() -> None:
    limiter = MemoryLimiter(wall=Wall())
    price = Pricing.of(1.0, 2.0)
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=50, pricing=price)
    meter.start(Spent())
    meter.count(400, time.perf_counter())  # 100 tokens
    await turns()
    assert used(limiter) == (150, 50_000 + 200_000)
    assert await meter.close(Usage(20, 60), complete=True) == (80, price.cost(20, 60))
    assert used(limiter) == (80, 20_000 + 120_000)


async def test_close_of_a_cut_stream_keeps_the_counted_output() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=50)
    meter.start(Spent())
    meter.count(120, time.perf_counter())  # 30 tokens
    # A cut stream's output count is not final; its prompt count is.
    assert await meter.close(Usage(12, 3), complete=False) == (42, 0)
    assert used(limiter) == (42, 0)


async def test_close_of_a_cut_stream_without_a_prompt_count_keeps_the_estimate() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=50)
    meter.start(Spent())
    meter.count(120, time.perf_counter())
    assert await meter.close(Usage(None, 3), complete=False) == (80, 0)
    assert used(limiter) == (80, 0)


async def test_close_of_a_complete_stream_without_usage_keeps_the_estimate() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=50)
    meter.start(Spent())
    meter.count(120, time.perf_counter())
    assert await meter.close(None, complete=True) == (80, 0)
    assert await meter.close(None, complete=True) == (80, 0)  # twice: nothing more
    assert used(limiter) == (80, 0)


async def test_close_without_start_charges_everything() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=7)
    meter.count(8, time.perf_counter())
    assert await meter.close(None, complete=True) == (9, 0)
    assert used(limiter) == (9, 0)


# --- the stream meter across UTC midnight ----------------------------------------------------


async def test_a_refund_after_midnight_never_takes_the_new_day_below_what_it_was() -> None:
    wall = Wall(utc("2027-01-15T23:59:59"))
    limiter = MemoryLimiter(wall=wall)
    price = Pricing.of(1.0, 2.0)  # 1000 and 2000 nano-units a token
    spec = BudgetSpec("t", tokens_per_day=100_000)
    meter = await meter_for(limiter, spec, prompt=1000, pricing=price)
    meter.start(Spent())
    await turns()
    day1 = Windows.at(wall.now)
    assert figures(limiter.budget_now("alice", 0, 0)) == (1000, 10**6, 1000, 10**6)
    wall.now = utc("2027-01-16T00:00:01")  # midnight has passed
    day2 = Windows.at(wall.now)
    assert day2.day == "2027-01-16"
    limiter.budget_now("alice", 30, 5000)  # another of the caller's streams, on day 2
    meter.count(400, due())  # 100 output tokens, charged to day 2
    await turns()
    assert figures(limiter.budget_now("alice", 0, 0)) == (130, 205_000, 1130, 1_205_000)
    # The upstream counted a prompt of 10 (990 fewer than charged, on day 1). The correction
    # goes to day 2 (the last charge's windows), and takes back no more than this stream
    # charged there: day 2 is back at what it was before (uncorrected: 130 - 990 = -860).
    # What the close returns is what was charged in all, not the 110 tokens it computed.
    assert await meter.close(Usage(10, None), complete=True) == (1000, 10**6)
    assert figures(limiter.budget_now("alice", 0, 0)) == (30, 5000, 1030, 10**6 + 5000)
    # Day 1 keeps its charge.
    assert figures(limiter.budget_now("alice", 0, 0, day1)) == (1000, 10**6, 1030, 10**6 + 5000)


@pytest.mark.parametrize("prompt", [1200, 10])
async def test_the_last_correction_goes_to_the_windows_of_the_last_charge(prompt: int) -> None:
    wall = Wall(utc("2027-01-31T23:59:59"))  # the last second of a day and of a month
    limiter = MemoryLimiter(wall=wall)
    spec = BudgetSpec("t", tokens_per_month=100_000)
    meter = await meter_for(limiter, spec, prompt=1000)
    meter.start(Spent())
    await turns()
    january = Windows.at(wall.now)
    wall.now = utc("2027-02-01T00:00:30")  # a new day and a new month
    # Closed there, the stream's only charge went to January 31: so does its correction
    # (+200 or -990, well within what it charged there).
    assert await meter.close(Usage(prompt, None), complete=True) == (prompt, 0)
    assert figures(limiter.budget_now("alice", 0, 0)) == (0, 0, 0, 0)
    assert figures(limiter.budget_now("alice", 0, 0, january)) == (prompt, 0, prompt, 0)


# --- the stream meter: when charges go out ---------------------------------------------------


class FlakyLimiter:
    """A MemoryLimiter's budgets that records every charge it takes (and the windows it was
    asked for). Its `budget` raises LimiterUnavailable at once (as a Redis known to be down
    does) for the next `down` calls; while `gate` is clear, a charge waits for it (in
    flight)."""

    def __init__(self, down: int = 0) -> None:
        self.inner = MemoryLimiter(wall=Wall())
        self.name = "flaky"
        self.down = down
        self.calls = 0
        self.charges: list[tuple[int, int]] = []  # what the backend took
        self.ats: list[Windows | None] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        self.calls += 1
        if self.down > 0:
            self.down -= 1
            raise LimiterUnavailable("down")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        self.charges.append((tokens, cost))
        self.ats.append(at)
        return self.inner.budget_now(subject, tokens, cost, at)


def flaky_meter(
    limiter: FlakyLimiter, spec: BudgetSpec, prompt: int, pricing: Pricing | None = None
) -> BudgetMeter:
    standing = limiter.inner.budget_now("alice", 0, 0)
    return BudgetMeter(limiter, "alice", spec, standing, pricing, prompt)  # type: ignore[arg-type]


async def test_far_from_the_edge_charges_are_batched() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=10_000), prompt=10)
    t0 = time.perf_counter()  # the prompt's charge is back after this
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(10, 0)]  # the prompt, at once
    # Less than CHARGE_INTERVAL_S after that charge came back: counted, not charged.
    meter.count(4, t0)
    meter.count(8, t0 + 0.01)
    meter.count(4, t0 + CHARGE_INTERVAL_S * 0.98)
    await turns()
    assert limiter.charges == [(10, 0)]
    # CHARGE_INTERVAL_S after it: this count starts a charge that carries all four.
    t1 = time.perf_counter()
    meter.count(12, due())
    await turns()
    assert limiter.charges == [(10, 0), (1 + 2 + 1 + 3, 0)]
    # The interval starts again from that charge's return.
    meter.count(4, t1 + CHARGE_INTERVAL_S * 0.98)
    await turns()
    assert limiter.charges == [(10, 0), (7, 0)]
    meter.count(4, due())
    await turns()
    assert limiter.charges == [(10, 0), (7, 0), (2, 0)]
    assert await meter.close(None, complete=True) == (19, 0)
    assert limiter.charges == [(10, 0), (7, 0), (2, 0)]  # nothing left to charge
    assert limiter.most_in_flight == 1


async def test_far_from_the_edge_no_timer_charges_what_is_pending() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=10_000), prompt=10)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    meter.count(40, t0)  # 10 tokens, batched
    await asyncio.sleep(CHARGE_INTERVAL_S * 1.5)  # the interval passes: still no charge
    assert limiter.charges == [(10, 0)]
    # The next count due, or the close, takes it: here the close, to the last charge's windows.
    assert await meter.close(None, complete=True) == (20, 0)
    assert limiter.charges == [(10, 0), (10, 0)]
    assert limiter.ats == [None, Windows.at(NOW)]


class PerfClock:
    """Stands in for the `time` module in gateway.budget: perf_counter() is `now`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now


async def test_the_interval_runs_from_the_return_of_the_last_charge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = PerfClock(1000.0)
    monkeypatch.setattr("gateway.budget.time", clock)
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=10_000), prompt=10)
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(10, 0)]  # back at 1000.0
    meter.count(4, math.nextafter(1000.0 + CHARGE_INTERVAL_S, 0))
    await turns()
    assert limiter.charges == [(10, 0)]
    limiter.gate.clear()
    meter.count(4, 1000.0 + CHARGE_INTERVAL_S)  # exactly due
    await turns()
    assert limiter.calls == 2  # sent at 1000.05...
    clock.now = 1003.0
    limiter.gate.set()  # ...and back at 1003.0
    await turns()
    assert limiter.charges == [(10, 0), (2, 0)]
    meter.count(4, math.nextafter(1003.0 + CHARGE_INTERVAL_S, 0))  # from the return: not due
    await turns()
    assert limiter.charges == [(10, 0), (2, 0)]
    meter.count(4, 1003.0 + CHARGE_INTERVAL_S)
    await turns()
    assert limiter.charges == [(10, 0), (2, 0), (2, 0)]
    await meter.close(None, complete=True)


async def test_far_from_the_edge_a_count_during_a_charge_waits_for_the_interval_after_it() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=10_000), prompt=10)
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(10, 0)]
    limiter.gate.clear()
    meter.count(4, due())  # due: a charge goes out and stays in flight
    await turns()
    assert (limiter.calls, limiter.charges) == (2, [(10, 0)])
    # While it is out: a count less than CHARGE_INTERVAL_S before that charge will be back.
    meter.count(4, due())
    await turns()
    assert limiter.calls == 2  # one charge in flight at a time
    limiter.gate.set()
    await turns()
    # That count waits for the next count due (or the close); not sent back to back.
    assert limiter.charges == [(10, 0), (1, 0)]
    assert await meter.close(None, complete=True) == (12, 0)


async def test_near_the_edge_every_count_is_charged_at_once() -> None:
    limiter = FlakyLimiter()
    spec = BudgetSpec("t", tokens_per_day=10_000, tokens_per_month=100)  # the edge: 10 left
    meter = flaky_meter(limiter, spec, prompt=91)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(91, 0)]
    for n in range(1, 4):
        meter.count(4, t0)  # a moment that, far from the edge, is batched
        await turns()
        assert limiter.charges == [(91, 0)] + [(1, 0)] * n
    assert await meter.close(None, complete=True) == (94, 0)
    assert limiter.charges == [(91, 0), (1, 0), (1, 0), (1, 0)]


async def test_reaching_the_edge_ends_the_batching() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=100), prompt=0)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    assert limiter.charges == []  # nothing to charge yet
    meter.count(4 * 89, t0)  # 11 left: more than a tenth, batched
    await turns()
    assert limiter.charges == []
    meter.count(4, t0)  # 10 left: within the last tenth
    await turns()
    assert limiter.charges == [(90, 0)]  # both, at once
    assert await meter.close(None, complete=True) == (90, 0)
    assert used(limiter.inner) == (90, 0)


async def test_reaching_the_edge_of_a_cost_budget_ends_the_batching() -> None:
    limiter = FlakyLimiter()
    price = Pricing(0, 1_000_000)  # 1 nano-unit an output token
    meter = flaky_meter(limiter, BudgetSpec("t", cost_per_day=1000), prompt=0, pricing=price)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    meter.count(4 * 899, t0)  # 101 left: batched
    await turns()
    assert limiter.charges == []
    meter.count(4, t0)  # 100 left: a tenth
    await turns()
    assert limiter.charges == [(900, 900)]
    assert await meter.close(None, complete=True) == (900, 900)


async def test_near_the_edge_counts_during_a_charge_go_out_together_right_after_it() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=100), prompt=91)  # 9 left
    t0 = time.perf_counter()
    limiter.gate.clear()  # the prompt's charge stays out
    meter.start(Spent())
    await turns()
    assert (limiter.calls, limiter.charges) == (1, [])
    for _ in range(3):
        meter.count(4, t0)
        await turns()
    assert limiter.calls == 1  # one charge in flight at a time: these accumulate
    limiter.gate.set()
    await turns()
    assert limiter.charges == [(91, 0), (3, 0)]  # together, at once
    assert limiter.most_in_flight == 1
    assert await meter.close(None, complete=True) == (94, 0)


async def test_a_reply_that_says_near_the_edge_sends_what_was_counted_meanwhile() -> None:
    limiter = FlakyLimiter()
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=100), prompt=10)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(10, 0)]  # 90 left
    limiter.gate.clear()
    meter.count(4, due())
    await turns()
    assert limiter.calls == 2  # in flight
    meter.count(4, t0)  # 88 left as far as it knows, and batched: no wake-up of its own
    limiter.inner.budget_now("alice", 80, 0)  # another stream, meanwhile
    limiter.gate.set()
    await turns()
    # The reply says 91 used: 8 left with the pending token, near the edge: sent at once.
    assert limiter.charges == [(10, 0), (1, 0), (1, 0)]
    assert used(limiter.inner) == (92, 0)
    assert await meter.close(None, complete=True) == (12, 0)


async def test_a_charge_the_backend_did_not_take_is_charged_later() -> None:
    limiter = FlakyLimiter(down=1)
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=5)
    meter.start(Spent())
    await turns()  # the prompt's charge fails
    assert (meter.failures, limiter.calls) == (1, 1)
    assert used(limiter.inner) == (0, 0)
    meter.count(8, due())
    await turns()
    assert limiter.charges == [(7, 0)]  # the next charge takes both
    assert limiter.calls == 2
    assert await meter.close(None, complete=True) == (7, 0)
    assert used(limiter.inner) == (7, 0)


async def test_a_charge_lost_at_close_is_counted_as_a_failure() -> None:
    limiter = FlakyLimiter(down=10)
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=1000), prompt=5)
    meter.count(8, time.perf_counter())
    # What was charged (acknowledged by the backend): nothing.
    assert await meter.close(None, complete=True) == (0, 0)
    assert meter.failures == 1
    assert used(limiter.inner) == (0, 0)


async def test_close_returns_what_the_backend_took_not_the_total() -> None:
    limiter = FlakyLimiter()
    price = Pricing.of(1.0, 2.0)
    spec = BudgetSpec("t", tokens_per_day=1000)
    meter = flaky_meter(limiter, spec, prompt=5, pricing=price)
    t0 = time.perf_counter()
    meter.start(Spent())
    await turns()
    assert limiter.charges == [(5, 5000)]
    meter.count(8, t0)  # batched: still pending at the close
    limiter.down = 1  # the close's charge is lost
    assert await meter.close(Usage(6, 4), complete=True) == (5, 5000)
    assert meter.failures == 1
    assert used(limiter.inner) == (5, 5000)


async def test_a_backend_that_refuses_at_once_does_not_make_the_charger_spin() -> None:
    limiter = FlakyLimiter(down=100)  # refuses 100 times, then takes the charge
    meter = flaky_meter(limiter, BudgetSpec("t", tokens_per_day=100), prompt=95)  # 5 left
    meter.start(Spent())
    await asyncio.sleep(0)  # one loop turn
    # At most a retry per wake-up; not 100 in one turn.
    assert limiter.calls <= 2
    await meter.close(None, complete=True)


async def test_roomy_bounds_for_tokens() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", tokens_per_day=100), prompt=10)  # 90 left
    assert meter.roomy(89)
    assert not meter.roomy(90)  # 90 bytes may hold 90 one-character events
    meter.count(40, time.perf_counter())  # 80 left
    assert meter.roomy(79)
    assert not meter.roomy(80)
    await meter.close(None, complete=True)


async def test_roomy_bounds_for_cost() -> None:
    limiter = MemoryLimiter(wall=Wall())
    price = Pricing(0, 1_500_000)  # 1.5 nano-units an output token
    meter = await meter_for(limiter, BudgetSpec("t", cost_per_day=30), pricing=price)
    assert meter.roomy(19)  # at most 19 tokens: 28.5 -> 29 < 30
    assert not meter.roomy(20)  # 20 tokens cost 30
    meter.count(1, time.perf_counter())  # costs 2: 28 left; 18 more tokens cost 27, 19 cost 28
    assert meter.roomy(18)
    assert not meter.roomy(19)
    await meter.close(None, complete=True)


async def test_roomy_without_budgets_that_apply() -> None:
    limiter = MemoryLimiter(wall=Wall())
    meter = await meter_for(limiter, BudgetSpec("t", cost_per_day=1))  # no pricing: free
    assert meter.roomy(10**9)
    await meter.close(None, complete=True)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 400),
    cost_limit=st.one_of(st.none(), st.integers(1, 2000)),
    price=st.integers(0, 20_000_000),
    earlier=st.lists(st.integers(1, 80), max_size=10),
    events=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 40)), min_size=1, max_size=20),
)
def test_a_roomy_read_never_spends_the_budget(
    limit: int,
    cost_limit: int | None,
    price: int,
    earlier: list[int],
    events: list[tuple[int, int]],
) -> None:
    """Whatever events a read of `size` bytes holds (each at least as many bytes as it has
    characters), when `roomy(size)` says so, counting them all does not spend a budget."""
    spec = BudgetSpec("t", tokens_per_day=limit, cost_per_day=cost_limit)
    meter = BudgetMeter(MemoryLimiter(), "a", spec, state(), Pricing(0, price), 0)
    if any(meter.count(chars, 0.0) for chars in earlier):
        return
    size = sum(chars + framing for chars, framing in events)
    if meter.roomy(size):
        assert not any(meter.count(chars, 0.0) for chars, _ in events)


# --- charge_answer: a whole answer -----------------------------------------------------------


async def test_charge_answer_charges_the_usage_or_the_estimate() -> None:
    limiter = MemoryLimiter(wall=Wall())
    spec = BudgetSpec("t", tokens_per_day=1000)
    price = Pricing.of(1.0, 2.0)
    assert await charge_answer(limiter, "alice", spec, price, Usage(12, 30), 50) == (
        42,
        price.cost(12, 30),
    )
    assert used(limiter) == (42, 72_000)
    # No prompt count: the estimate; no output count: nothing more.
    assert await charge_answer(limiter, "alice", spec, None, Usage(None, None), 50) == (50, 0)
    assert await charge_answer(limiter, "alice", spec, None, None, 8) == (8, 0)
    assert await charge_answer(limiter, "alice", spec, None, None, 0) == (0, 0)
    assert used(limiter) == (100, 72_000)


async def test_charge_answer_does_not_raise_when_the_backend_is_down() -> None:
    limiter = FlakyLimiter(down=1)
    spec = BudgetSpec("t", tokens_per_day=1000)
    got = await charge_answer(limiter, "alice", spec, None, Usage(1, 2), 0)  # type: ignore[arg-type]
    assert got == (3, 0)
    assert limiter.calls == 1


# --- admission: check and the headers --------------------------------------------------------


def report() -> Report:
    return Report(
        started=0.0, started_loop=0.0, request_id="req_test", operation="chat", api="openai"
    )


def telemetry() -> Telemetry:
    return Telemetry(TelemetryConfig())


def denials(tel: Telemetry, tier: str) -> float:
    value = tel.metrics.registry.get_sample_value(
        "llm_gateway_budget_exceeded_total", {"tier": tier, "at": "admission"}
    )
    return value or 0.0


async def test_check_passes_with_the_remaining_headers() -> None:
    limiter = MemoryLimiter(wall=Wall())
    spec = BudgetSpec("gold", tokens_per_day=1000, cost_per_month=5 * NANO)
    limiter.budget_now("alice", 250, 150_000)
    rep, tel = report(), telemetry()
    standing = await check(limiter, "alice", spec, rep, tel)
    assert (standing.tokens_day, standing.cost_month) == (250, 150_000)
    assert rep.extra_headers == {REMAINING: "750", REMAINING_COST: "4.99985"}
    assert rep.limiter is None
    assert denials(tel, "gold") == 0
    # A read charges nothing.
    assert used(limiter) == (250, 150_000)


async def test_check_without_cost_budget_sends_no_cost_header() -> None:
    limiter = MemoryLimiter(wall=Wall())
    rep = report()
    await check(limiter, "alice", BudgetSpec("t", tokens_per_month=10), rep, telemetry())
    assert rep.extra_headers == {REMAINING: "10"}


@pytest.mark.parametrize(
    ("spec", "charged", "name", "wait"),
    [
        # 2027-01-15 10:00 UTC: 14 h until midnight, 16 days and 14 h until February.
        (BudgetSpec("t", tokens_per_day=100), (100, 0), "tokens per day", 14 * 3600),
        (BudgetSpec("t", tokens_per_day=100), (130, 0), "tokens per day", 14 * 3600),
        (BudgetSpec("t", cost_per_day=1000), (0, 1000), "cost per day", 14 * 3600),
        (
            BudgetSpec("t", tokens_per_day=100, tokens_per_month=100),
            (100, 0),
            "tokens per month",
            (16 * 24 + 14) * 3600,
        ),
    ],
)
async def test_check_refuses_a_spent_budget_until_its_window_ends(
    spec: BudgetSpec, charged: tuple[int, int], name: str, wait: int
) -> None:
    limiter = MemoryLimiter(wall=Wall())
    limiter.budget_now("alice", *charged)
    rep, tel = report(), telemetry()
    with pytest.raises(GatewayError) as caught:
        await check(limiter, "alice", spec, rep, tel)
    err = caught.value
    assert (err.status, err.kind) == (429, Kind.BUDGET_EXCEEDED)
    assert err.headers["retry-after"] == str(wait)
    assert name in err.message
    assert "'t'" in err.message
    if spec.has_tokens:
        assert err.headers[REMAINING] == "0"
    assert rep.limiter == "denied_budget"
    assert denials(tel, "t") == 1
    assert rep.extra_headers == {}


async def test_check_retry_after_rounds_up_in_the_last_second_of_a_day() -> None:
    wall = Wall(utc("2027-01-15T23:59:59.250"))
    limiter = MemoryLimiter(wall=wall)
    spec = BudgetSpec("t", tokens_per_day=10)
    limiter.budget_now("alice", 10, 0)
    with pytest.raises(GatewayError) as caught:
        await check(limiter, "alice", spec, report(), telemetry())
    assert caught.value.headers["retry-after"] == "1"
    wall.now = utc("2027-01-16T00:00:00")  # a new day: whole again
    rep = report()
    await check(limiter, "alice", spec, rep, telemetry())
    assert rep.extra_headers == {REMAINING: "10"}


async def test_check_of_a_spent_cost_budget_says_zero_left() -> None:
    limiter = MemoryLimiter(wall=Wall())
    limiter.budget_now("alice", 0, 1200)
    with pytest.raises(GatewayError) as caught:
        await check(limiter, "alice", BudgetSpec("t", cost_per_day=1000), report(), telemetry())
    assert caught.value.headers[REMAINING_COST] == "0"


async def test_check_when_budgets_are_unavailable_is_a_503() -> None:
    limiter = FlakyLimiter(down=1)
    rep = report()
    with pytest.raises(GatewayError) as caught:
        await check(limiter, "alice", BudgetSpec("t", tokens_per_day=1), rep, telemetry())  # type: ignore[arg-type]
    err = caught.value
    assert (err.status, err.kind) == (503, Kind.LIMITER_UNAVAILABLE)
    assert err.headers == {"retry-after": "1"}


def test_remaining_headers() -> None:
    spec = BudgetSpec("t", tokens_per_day=100, cost_per_day=10 * NANO)
    overspent = state(150, 2 * NANO + 500_000_000)
    assert remaining_headers(spec, overspent) == {REMAINING: "0", REMAINING_COST: "7.5"}
    assert remaining_headers(BudgetSpec("t"), state(1, 1)) == {}
    # The local fallback's share: 100 / 2 instances.
    degraded = state(10, 0, divisor=2)
    assert remaining_headers(BudgetSpec("t", tokens_per_day=100), degraded) == {REMAINING: "40"}


async def test_the_edge_moves_up_when_the_callers_other_streams_spend_fast() -> None:
    """Far from the tenth, a stream whose shared figures show the caller spending fast (other
    streams, other instances) stops batching: the edge is twice what the caller spent in one
    CHARGE_INTERVAL_S, so that streams racing for the last of a budget see each other."""
    limiter = FlakyLimiter()
    spec = BudgetSpec("t", tokens_per_day=100_000)  # a tenth: 10,000
    meter = flaky_meter(limiter, spec, prompt=10)
    meter.start(lambda: None)
    await turns(5)
    assert limiter.charges == [(10, 0)]  # the prompt: the figures the rate starts from
    # Another stream of the caller spends 30,000 while this one streams slowly.
    limiter.inner.budget_now("alice", 30_000, 0)
    await asyncio.sleep(CHARGE_INTERVAL_S * 0.6)
    meter.count(4, due())
    await turns(5)
    assert limiter.charges[-1] == (1, 0)
    # 30,001 spent in about 0.6 intervals: the edge is now ~100,000, above what is left
    # (~70,000), so every count is charged as it comes, though none is due.
    for _ in range(3):
        meter.count(4, time.perf_counter())
        await turns(5)
    assert limiter.charges[-3:] == [(1, 0)] * 3
    assert await meter.close(None, complete=False) == (14, 0)


async def test_a_slow_caller_keeps_its_charges_batched() -> None:
    limiter = FlakyLimiter()
    spec = BudgetSpec("t", tokens_per_day=100_000)
    meter = flaky_meter(limiter, spec, prompt=10)
    meter.start(lambda: None)
    await turns(5)
    await asyncio.sleep(CHARGE_INTERVAL_S * 0.6)
    meter.count(4, due())
    await turns(5)
    for _ in range(3):
        meter.count(4, time.perf_counter())  # not due, far from the edge: batched
        await turns(5)
    assert limiter.charges == [(10, 0), (1, 0)]
    assert await meter.close(None, complete=False) == (14, 0)


async def test_streams_of_one_caller_share_a_tally_on_one_instance() -> None:
    """Two meters of one caller in one process see each other's counts at once (before any
    charge), the one that spends the budget is told by `count`, the other by `on_spent`; a
    third caller's meter is not touched; closing both leaves no tally behind."""
    limiter = MemoryLimiter(wall=Wall())
    tallies = BudgetTallies()
    spec = BudgetSpec("t", tokens_per_day=100)
    standing = await limiter.budget("alice", spec, 0, 0)
    spent: list[str] = []
    a = BudgetMeter(limiter, "alice", spec, standing, None, 10, tallies)
    b = BudgetMeter(limiter, "alice", spec, standing, None, 10, tallies)
    other = BudgetMeter(
        limiter, "bob", spec, await limiter.budget("bob", spec, 0, 0), None, 10, tallies
    )
    a.start(lambda: spent.append("a"))
    b.start(lambda: spent.append("b"))
    other.start(lambda: spent.append("bob"))
    assert len(tallies) == 2
    early = time.perf_counter() - 1  # never due: only the shared tally can tell them
    assert b.roomy(70)  # 80 left as b sees it (both prompts)
    assert a.count(4 * 40, early) is False  # 40 tokens: 40 left, for both
    assert not b.roomy(40) and b.roomy(39)
    assert b.count(4 * 39, early) is False  # 1 left
    assert a.count(4, early) is True  # a spends the last token: told by its answer
    assert spent == ["b"]  # b learns it at once (it ends at its next boundary)
    assert b.spent and not other.spent
    await a.close(None, complete=False)
    await b.close(None, complete=False)
    assert len(tallies) == 1
    await other.close(None, complete=False)
    assert len(tallies) == 0
    assert used(limiter) == (100, 0)  # 10 + 40 + 1 and 10 + 39: exactly what was counted


class _Outage:
    """The prompt's charge goes to a local fallback (Redis down: degraded), every later one
    to the shared store (Redis back)."""

    name = "outage"

    def __init__(self) -> None:
        self.fallback = MemoryLimiter(wall=Wall())
        self.shared = MemoryLimiter(wall=Wall())
        self.calls = 0

    async def budget(
        self, subject: str, spec: BudgetSpec, tokens: int, cost: int, at: Windows | None = None
    ) -> BudgetState:
        self.calls += 1
        if self.calls == 1:
            state = self.fallback.budget_now(subject, tokens, cost, at)
            return dataclasses.replace(state, degraded=True)
        return self.shared.budget_now(subject, tokens, cost, at)


async def test_a_refund_never_takes_from_the_shared_store_what_the_fallback_got() -> None:
    limiter = _Outage()
    spec = BudgetSpec("t", tokens_per_day=100_000)
    standing = limiter.shared.budget_now("alice", 0, 0)
    meter = BudgetMeter(limiter, "alice", spec, standing, None, 1000)  # type: ignore[arg-type]
    meter.start(lambda: None)
    await turns(5)
    assert used(limiter.fallback) == (1000, 0)  # the prompt estimate, during the outage
    meter.count(40, due())  # 10 tokens, once Redis is back
    await turns(5)
    assert used(limiter.shared) == (10, 0)
    # The upstream counted a 6-token prompt: the shared store ends with what the stream
    # used (6 + 10), corrected against what it took, not against the fallback's 1000.
    await meter.close(Usage(input_tokens=6, output_tokens=None), complete=False)
    assert used(limiter.shared) == (16, 0)
