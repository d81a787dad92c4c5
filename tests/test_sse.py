"""Tests for gateway.sse: the WHATWG SSE grammar rule by rule, then properties over chunking."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEError, SSEEvent, SSELineTooLong

BOM = b"\xef\xbb\xbf"
RECORDED = Path(__file__).parent / "data" / "recorded-streams"


def feed_all(chunks: list[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    decoder = decoder or SSEDecoder()
    out: list[SSEEvent] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.close())
    return out


def decode(raw: bytes) -> list[SSEEvent]:
    return feed_all([raw])


def ev(data: bytes, event: str = "", id: str | None = None, retry: int | None = None) -> SSEEvent:
    return SSEEvent(event=event, data=data, id=id, retry=retry)


# --- grammar, rule by rule ---------------------------------------------------------------


def test_single_data_event() -> None:
    assert decode(b"data: hello\n\n") == [ev(b"hello")]


def test_event_field_and_absent_event_is_empty_not_message() -> None:
    assert decode(b"event: ping\ndata: {}\n\ndata: x\n\n") == [ev(b"{}", "ping"), ev(b"x")]


def test_last_event_field_wins() -> None:
    assert decode(b"event: a\nevent: b\ndata: x\n\n") == [ev(b"x", "b")]


def test_comments_are_ignored() -> None:
    raw = b": keep-alive\ndata: a\n:another\ndata: b\n\n:\n\n"
    assert decode(raw) == [ev(b"a\nb")]


def test_multiline_data_joined_with_lf() -> None:
    assert decode(b"data: one\ndata: two\ndata: three\n\n") == [ev(b"one\ntwo\nthree")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_each_line_ending(eol: bytes) -> None:
    raw = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert decode(raw) == [ev(b"a\nb", "e"), ev(b"c")]


def test_mixed_line_endings_in_one_stream() -> None:
    raw = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert decode(raw) == [ev(b"a\nb\nc"), ev(b"d")]


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    # Had the LF counted as a blank line, "a" and "b" would be two events.
    assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [ev(b"a\nb")]


def test_cr_blank_line_at_chunk_end_then_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [ev(b"a")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\n\n") == [ev(b"b")]
    assert decoder.events == 2


def test_cr_then_non_lf_chunk() -> None:
    assert feed_all([b"data: a\r", b"\r", b"data: b\r", b"\r"]) == [ev(b"a"), ev(b"b")]


def test_lf_after_cr_only_skipped_once() -> None:
    # CR LF LF: one line end, then a blank line.
    assert feed_all([b"data: a\r", b"\n", b"\n"]) == [ev(b"a")]


def test_bom_stripped() -> None:
    assert decode(BOM + b"data: x\n\n") == [ev(b"x")]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"\xef", b"\xbb\xbfdata: x\n\n"],
        [b"\xef\xbb", b"\xbfdata: x\n\n"],
        [b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"],
        [b"\xef\xbb\xbf", b"data: x\n\n"],
    ],
)
def test_bom_split_across_chunks(chunks: list[bytes]) -> None:
    assert feed_all(chunks) == [ev(b"x")]


def test_bom_stripped_only_once() -> None:
    # A second BOM belongs to the field name, which is then unknown.
    assert decode(BOM + BOM + b"data: x\n\ndata: y\n\n") == [ev(b"y")]


def test_bom_only_at_stream_start() -> None:
    assert decode(b"data: x\n\n" + BOM + b"data: y\n\n") == [ev(b"x")]


def test_partial_bom_that_is_not_a_bom_is_kept() -> None:
    # "\xef\xbb" followed by something else is just the start of an (unknown) field name.
    assert feed_all([b"\xef\xbb", b"data: x\n\ndata: y\n\n"]) == [ev(b"y")]
    assert feed_all([b"\xef", b"\n", b"data: y\n\n"]) == [ev(b"y")]


def test_line_without_colon_is_field_with_empty_value() -> None:
    assert decode(b"data\n\n") == [ev(b"")]
    assert decode(b"event\ndata: x\n\n") == [ev(b"x", "")]
    assert decode(b"id\ndata: x\n\n") == [ev(b"x", id="")]


def test_value_without_space_and_only_one_space_removed() -> None:
    assert decode(b"data:x\n\n") == [ev(b"x")]
    assert decode(b"data:  x\n\n") == [ev(b" x")]
    assert decode(b"data: \n\n") == [ev(b"")]
    assert decode(b"event:  spaced\ndata:x:y\n\n") == [ev(b"x:y", " spaced")]


def test_field_name_is_case_sensitive_and_exact() -> None:
    assert decode(b"Data: x\n\ndata : y\n\ndata: z\n\n") == [ev(b"z")]


def test_unknown_field_ignored() -> None:
    assert decode(b"foo: bar\ndata: x\nbaz\n\n") == [ev(b"x")]
    assert decode(b"foo: bar\n\n") == []


def test_id_field() -> None:
    assert decode(b"id: 42\ndata: x\n\n") == [ev(b"x", id="42")]
    assert decode(b"id:\ndata: x\n\n") == [ev(b"x", id="")]
    assert decode(b"id: 1\nid: 2\ndata: x\n\n") == [ev(b"x", id="2")]


def test_id_with_nul_ignored() -> None:
    assert decode(b"id: a\x00b\ndata: x\n\n") == [ev(b"x")]
    assert decode(b"id: 7\nid: a\x00b\ndata: x\n\n") == [ev(b"x", id="7")]


def test_id_is_per_event_only() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid: 9\n\ndata: c\n\n"
    assert decode(raw) == [ev(b"a", id="1"), ev(b"b"), ev(b"c")]


def test_retry_field() -> None:
    assert decode(b"retry: 1500\ndata: x\n\n") == [ev(b"x", retry=1500)]
    assert decode(b"retry:0\ndata: x\n\n") == [ev(b"x", retry=0)]


@pytest.mark.parametrize(
    "value", [b"12a", b"-1", b"+1", b"1.5", b"", b" 12", b"\xd9\xa1\xd9\xa2", b"1 "]
)
def test_retry_not_all_ascii_digits_ignored(value: bytes) -> None:
    # b"\xd9\xa1\xd9\xa2" is Arabic-Indic "12": digits, but not ASCII digits.
    assert decode(b"retry: " + value + b"\ndata: x\n\n") == [ev(b"x")]


def test_retry_beyond_int_digit_limit_ignored() -> None:
    assert decode(b"retry: " + b"9" * 5000 + b"\ndata: x\n\n") == [ev(b"x")]


def test_event_without_data_not_dispatched_and_resets_type() -> None:
    raw = b"event: a\nretry: 5\nid: 3\n\ndata: x\n\n"
    decoder = SSEDecoder()
    assert decoder.feed(raw) == [ev(b"x")]
    assert decoder.events == 1


def test_empty_data_is_dispatched() -> None:
    assert decode(b"data:\n\n") == [ev(b"")]
    assert decode(b"data:\ndata:\n\n") == [ev(b"\n")]
    assert decode(b"event: e\ndata\n\n") == [ev(b"", "e")]


def test_trailing_unterminated_event_not_dispatched_by_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [ev(b"a")]
    assert decoder.close() == []
    assert decoder.events == 1
    assert not decoder.at_boundary


def test_data_is_raw_bytes_never_decoded() -> None:
    payload = "中文 😀".encode() + b"\xff\xfe"
    assert decode(b"data: " + payload + b"\n\n") == [ev(payload)]


def test_multibyte_character_split_across_chunks() -> None:
    raw = "data: 中文😀\n\n".encode()
    cut = raw.index("文".encode()) + 1
    assert feed_all([raw[:cut], raw[cut:]]) == [ev("中文😀".encode())]


def test_non_ascii_event_name_and_id_decoded() -> None:
    assert decode("event: ü\nid: ñ\ndata: x\n\n".encode()) == [ev(b"x", "ü", "ñ")]


def test_several_events_in_one_chunk_in_order() -> None:
    raw = b"".join(b"data: %d\n\n" % i for i in range(50))
    assert decode(raw) == [ev(b"%d" % i) for i in range(50)]


def test_accepts_bytearray_and_memoryview_and_copies() -> None:
    decoder = SSEDecoder()
    buf = bytearray(b"data: abc")
    assert decoder.feed(buf) == []
    buf[:] = b"XXXXXXXXX"  # the caller may reuse its buffer
    assert decoder.feed(memoryview(b"def\n\n")) == [ev(b"abcdef")]


def test_empty_chunk_is_noop() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [ev(b"x")]


def test_counters() -> None:
    decoder = SSEDecoder()
    chunks = [BOM, b"data: a\n\n: c\n\n", b"data: b", b"\n\n"]
    for chunk in chunks:
        decoder.feed(chunk)
    assert decoder.events == 2
    assert decoder.bytes_fed == sum(map(len, chunks))


# --- size caps ---------------------------------------------------------------------------


def test_line_at_cap_is_fine() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    assert decoder.feed(b"data: abcd\n\n") == [ev(b"abcd")]


def test_pending_line_too_long_raises_and_decoder_stays_dead() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    decoder.feed(b"data: ")
    decoder.feed(b"abcd")
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"e")
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"\n\n")


def test_complete_line_too_long_in_one_chunk_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=10)
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"data: 12345\n\n")


def test_line_too_long_is_an_sse_error() -> None:
    decoder = SSEDecoder(max_line_bytes=4)
    with pytest.raises(SSEError):
        decoder.feed(b": long comment")


def test_long_line_in_many_small_chunks() -> None:
    decoder = SSEDecoder(max_line_bytes=1 << 20)
    assert decoder.feed(b"data: ") == []
    for _ in range(1000):
        assert decoder.feed(b"x" * 1000) == []
    assert decoder.feed(b"\n\n") == [ev(b"x" * 1_000_000)]


def test_accumulated_event_data_capped() -> None:
    decoder = SSEDecoder(max_line_bytes=20)
    # 3 lines of 8 bytes joined = 26 bytes > 20, though every line is short.
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"data: 12345678\ndata: 12345678\ndata: 12345678\n")


def test_accumulated_event_data_at_cap_is_fine() -> None:
    decoder = SSEDecoder(max_line_bytes=20)
    # 2 + 1 + 8 + 1 + 8 = 20 bytes of data.
    raw = b"data:12\ndata:12345678\ndata:12345678\n\n"
    assert decoder.feed(raw) == [ev(b"12\n12345678\n12345678")]


def test_invalid_cap_rejected() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        SSEDecoder(max_line_bytes=0)


# --- at_boundary -------------------------------------------------------------------------


def test_at_boundary_transitions() -> None:
    decoder = SSEDecoder()
    steps: list[tuple[bytes, bool]] = [
        (b"", True),
        (b"da", False),  # partial line
        (b"ta: x", False),
        (b"\n", False),  # field line of an undispatched event
        (b"\n", True),  # dispatched
        (b": keep", False),  # partial comment line
        (b"-alive\n", True),  # a comment-only block is a boundary once its line ended
        (b"event: e\n", False),
        (b"id: 1\n", False),
        (b"\n", True),  # block without data ended: nothing dispatched, still a boundary
        (b"unknown\n", False),  # unknown fields are field lines too
        (b"\r", True),
        (b"\n", True),  # LF completing the CRLF
        (b"\xef", False),  # mid-line bytes
        (b"\n\n", True),
    ]
    for chunk, expected in steps:
        decoder.feed(chunk)
        assert decoder.at_boundary is expected, chunk


def test_at_boundary_while_bom_pending() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"\xef\xbb")
    assert not decoder.at_boundary
    decoder.feed(b"\xbf")
    assert decoder.at_boundary
    assert decoder.feed(b"data: x\n\n") == [ev(b"x")]
    assert decoder.at_boundary


# --- recorded provider streams -----------------------------------------------------------


def _framed(path: Path) -> tuple[bytes, list[SSEEvent]]:
    """Frame a recorded stream as the provider sends it (see the recordings' README)."""
    chat = path.parent.name == "openai-chat"
    parts: list[bytes] = []
    expected: list[SSEEvent] = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        name = "" if chat else str(json.loads(line)["type"])
        if name:
            parts.append(b"event: " + name.encode() + b"\n")
        parts.append(b"data: " + line + b"\n\n")
        expected.append(ev(line, name))
    if chat:
        parts.append(b"data: [DONE]\n\n")
        expected.append(ev(b"[DONE]"))
    return b"".join(parts), expected


@pytest.mark.parametrize(
    "path", sorted(RECORDED.glob("*/*.chunks.jsonl")), ids=lambda p: p.stem.split(".")[0]
)
def test_recorded_streams_in_random_chunks(path: Path) -> None:
    raw, expected = _framed(path)
    rng = random.Random(path.name)
    cuts = sorted(rng.sample(range(1, len(raw)), k=min(len(raw) - 1, len(raw) // 37)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    decoder = SSEDecoder()
    assert feed_all(chunks, decoder) == expected
    assert decoder.at_boundary
    assert decoder.events == len(expected)


# --- properties --------------------------------------------------------------------------

EOLS = ["\n", "\r\n", "\r"]

line_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_characters="\r\n"),
        st.sampled_from("中文字語😀🎉é\ufeff\x00 :"),
    ),
    max_size=12,
)


@dataclass(frozen=True)
class Stream:
    raw: bytes
    expected: list[SSEEvent]
    ends_at_boundary: bool


def _sep(draw: st.DrawFn, value: str) -> str:
    """Colon plus optional space; the space is mandatory when the value starts with one."""
    return ": " if value.startswith(" ") or draw(st.booleans()) else ":"


@st.composite
def event_lines(draw: st.DrawFn) -> tuple[list[str], SSEEvent]:
    data = draw(st.lists(line_text, min_size=1, max_size=4))
    lines = [f"data{_sep(draw, d)}{d}" for d in data]
    extras: list[str] = []
    name = draw(line_text)
    if name or draw(st.booleans()):
        extras.append(f"event{_sep(draw, name)}{name}")
    event_id = draw(st.none() | line_text.filter(lambda s: "\x00" not in s))
    if event_id is not None:
        extras.append(f"id{_sep(draw, event_id)}{event_id}")
    if draw(st.booleans()):
        extras.append("id: bad\x00id")  # ignored wherever it lands
    retry = draw(st.none() | st.integers(0, 10**9))
    if retry is not None:
        extras.append(f"retry{_sep(draw, str(retry))}{retry}")
    if draw(st.booleans()):
        extras.append(draw(st.sampled_from(["retry: 1x", "retry:", "retry: -3"])))
    if draw(st.booleans()):
        extras.append("unknown: field")
    extras += [":" + c for c in draw(st.lists(line_text, max_size=2))]  # comments
    for extra in extras:
        lines.insert(draw(st.integers(0, len(lines))), extra)
    return lines, SSEEvent(name, "\n".join(data).encode(), event_id, retry)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    lines: list[str] = []
    expected: list[SSEEvent] = []
    for _ in range(draw(st.integers(0, 6))):
        noise = draw(st.sampled_from(["", "comment", "blank", "no-data"]))
        if noise == "comment":
            lines += [": " + draw(line_text), ""]
        elif noise == "blank":
            lines.append("")
        elif noise == "no-data":
            lines += ["event: nodata", "id: 5", "retry: 9", ""]
        block, event = draw(event_lines())
        lines += [*block, ""]
        expected.append(event)
    trailing = draw(st.booleans())
    if trailing:
        lines.append("data: never dispatched")

    style = draw(st.sampled_from(["lf", "crlf", "cr", "mixed"]))
    parts: list[str] = []
    prev_eol = ""
    for line in lines:
        if style == "mixed":
            eol = draw(st.sampled_from(EOLS))
        else:
            eol = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}[style]
        if prev_eol == "\r" and not line and eol == "\n":
            eol = "\r\n"  # CR then a lone LF would be one CRLF line end, not a blank line
        parts += [line, eol]
        prev_eol = eol
    raw = "".join(parts).encode()
    if draw(st.booleans()):
        raw = BOM + raw
    return Stream(raw, expected, ends_at_boundary=not trailing)


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


def _feed_mixed_types(chunks: list[bytes]) -> tuple[list[SSEEvent], SSEDecoder]:
    decoder = SSEDecoder()
    out: list[SSEEvent] = []
    for i, chunk in enumerate(chunks):
        view: bytes | bytearray | memoryview = (chunk, bytearray(chunk), memoryview(chunk))[i % 3]
        out += decoder.feed(view)
    return out, decoder


@settings(max_examples=300, deadline=None)
@given(stream=streams(), data=st.data())
def test_property_any_chunking_yields_original_events(stream: Stream, data: st.DataObject) -> None:
    whole = SSEDecoder()
    events = whole.feed(stream.raw) + whole.close()
    assert events == stream.expected
    assert whole.at_boundary is stream.ends_at_boundary
    assert whole.events == len(stream.expected)

    cuts = data.draw(st.lists(st.integers(0, len(stream.raw)), max_size=30))
    chunked, decoder = _feed_mixed_types(_split(stream.raw, cuts))
    assert chunked == stream.expected
    assert decoder.at_boundary is stream.ends_at_boundary
    assert decoder.bytes_fed == len(stream.raw)

    one_byte, decoder = _feed_mixed_types(_split(stream.raw, list(range(len(stream.raw)))))
    assert one_byte == stream.expected
    assert decoder.at_boundary is stream.ends_at_boundary


def reference_decode(raw: bytes) -> list[SSEEvent] | None:
    """Plain transcription of the WHATWG algorithm on decoded text; None if not UTF-8."""
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\r\n":
            lines.append(current)
            current = ""
            if char == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            current += char
        i += 1
    # `current` is an unterminated last line: never processed.

    events: list[SSEEvent] = []
    data_buffer = ""
    event_type = ""
    event_id: str | None = None
    retry: int | None = None
    for line in lines:
        if line == "":
            if data_buffer != "":
                data_buffer = data_buffer.removesuffix("\n")
                events.append(SSEEvent(event_type, data_buffer.encode(), event_id, retry))
            data_buffer = ""
            event_type = ""
            event_id = None
            retry = None
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            value = value.removeprefix(" ")
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data_buffer += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                event_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events


FRAGMENTS = [
    b"data:",
    b"data: ",
    b"data",
    b"event:",
    b"event: e",
    b"id:",
    b"id: 7",
    b"retry:12",
    b"retry: 3",
    b"retry:x",
    b":",
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"x",
    b"\x00",
    b"\xe4\xb8\xad",
    b"\xf0\x9f\x98\x80",
    BOM,
    b"\xe4",  # invalid alone: such inputs are checked for chunking invariance only
]


@settings(max_examples=300, deadline=None)
@given(
    soup=st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join),
    bom=st.booleans(),
    data=st.data(),
)
def test_property_matches_reference_decoder(soup: bytes, bom: bool, data: st.DataObject) -> None:
    raw = BOM + soup if bom else soup
    decoder = SSEDecoder()
    events = decoder.feed(raw) + decoder.close()

    expected = reference_decode(raw)
    if expected is not None:
        assert events == expected

    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    chunked, _ = _feed_mixed_types(_split(raw, cuts))
    assert chunked == events
