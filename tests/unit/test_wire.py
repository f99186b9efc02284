"""AMI framing and decoding: UTF-8 split across reads, escaping, injection refusal."""

from __future__ import annotations

import pytest

from pbx_bridge.ami.wire import (
    AmiFramer,
    FramingError,
    format_action,
    parse_message,
    parse_stream,
    unescape_c,
    unescape_sip_quoted,
)
from tests.support.fixtures import fixture_bytes, fixture_names

NAME = "张三客户"


def _event(name: str) -> bytes:
    return (f"Event: Newchannel\r\nTimestamp: 1795429737.986816\r\nCallerIDName: {name}\r\n"
            "Linkedid: pbx-1.0\r\n\r\n").encode()


def test_multibyte_character_split_between_reads_is_decoded_exactly() -> None:
    data = b"Asterisk Call Manager/11.0.0\r\n" + _event(NAME)
    cut = data.index(NAME.encode()) + 1  # inside the first character's three UTF-8 bytes
    framer = AmiFramer()
    first = list(framer.feed(data[:cut]))
    second = list(framer.feed(data[cut:]))
    assert first == []
    assert [m.get("CallerIDName") for m in second] == [NAME]
    assert framer.banner == "Asterisk Call Manager/11.0.0"


@pytest.mark.parametrize("name", fixture_names())
def test_captured_stream_fed_byte_by_byte_equals_whole(name: str) -> None:
    data = fixture_bytes(name)
    framer = AmiFramer()
    one_by_one = [m for i in range(len(data)) for m in framer.feed(data[i:i + 1])]
    assert one_by_one == parse_stream(data)
    assert len(one_by_one) >= 3


def test_chinese_names_survive_in_captured_stream() -> None:
    names = {m.get("CallerIDName") for m in parse_stream(fixture_bytes("answered_7s_talk_4s"))}
    assert NAME in names


def test_banner_split_across_reads() -> None:
    framer = AmiFramer()
    assert list(framer.feed(b"Asterisk Call")) == []
    assert next(iter(framer.feed(b" Manager/11.0.0\r\nResponse: Success\r\n\r\n"))).get("Response") == "Success"
    assert framer.banner == "Asterisk Call Manager/11.0.0"


def test_invalid_utf8_is_replaced_and_flagged_not_dropped() -> None:
    messages = list(AmiFramer().feed(b"Event: Newchannel\r\nCallerIDName: \xff\xfeabc\r\n\r\n"))
    assert messages[0].decode_errors
    assert messages[0].get("CallerIDName").endswith("abc")


def test_oversized_message_is_a_framing_error() -> None:
    framer = AmiFramer(max_message_bytes=100)
    with pytest.raises(FramingError):
        list(framer.feed(b"Event: X\r\n" + b"A" * 200))


def test_endless_banner_line_is_a_framing_error_not_an_endless_buffer() -> None:
    framer = AmiFramer(max_message_bytes=100)
    assert list(framer.feed(b"Asterisk Call Manager/" + b"1" * 60)) == []
    with pytest.raises(FramingError):
        list(framer.feed(b"1" * 60))


def test_terminator_split_across_small_reads_is_found() -> None:
    framer = AmiFramer()
    data = b"Event: A\r\nX: " + b"y" * 5000 + b"\r\n\r\nEvent: B\r\n\r\n"
    events = [m.event for i in range(0, len(data), 3) for m in framer.feed(data[i:i + 3])]
    assert events == ["A", "B"]


@pytest.mark.parametrize("raw", ["1e18", "-1e18", "nan", "inf", "253402300800", "9" * 400, "x"])
def test_timestamp_out_of_range_is_none(raw: str) -> None:
    assert parse_message(f"Event: X\r\nTimestamp: {raw}").timestamp is None


def test_headers_are_case_insensitive_first_value_wins() -> None:
    message = parse_message("Event: Cel\r\nUniqueID: a\r\nLinkedID: b\r\nlinkedid: c")
    assert message.get("Uniqueid") == "a"
    assert message.get("LINKEDID") == "b"
    assert "uniqueid" in message


def test_value_keeps_colons_and_inner_spaces() -> None:
    assert parse_message("Event: X\r\nData: a: b  c ").get("Data") == "a: b  c "


@pytest.mark.parametrize(("escaped", "plain"), [
    (r"Caller \"x\"", 'Caller "x"'),
    (r"back\\slash", "back\\slash"),
    (r"O\'Brien \? \t", "O'Brien ? \t"),
    (r"\a\b\f\n\r\v", "\a\b\f\n\r\v"),
    (r"no escapes", "no escapes"),
    (r"unknown \q stays", r"unknown \q stays"),
])
def test_unescape_c_reverses_asterisk_escape_c(escaped: str, plain: str) -> None:
    assert unescape_c(escaped) == plain


def test_caller_name_headers_are_c_unescaped_others_are_not() -> None:
    message = parse_message('Event: X\r\nCallerIDName: a \\"b\\"\r\nDestConnectedLineName: c\\\\d\r\nExten: e\\"f')
    assert message.get("CallerIDName") == 'a "b"'
    assert message.get("DestConnectedLineName") == "c\\d"
    assert message.get("Exten") == 'e\\"f'


def test_unescape_sip_quoted_pairs() -> None:
    assert unescape_sip_quoted(r"Robert \"Bob\" ;-- \\ end") == 'Robert "Bob" ;-- \\ end'
    assert unescape_sip_quoted("张三") == "张三"


def test_format_action_encodes_utf8_and_repeats_list_headers() -> None:
    payload = format_action({"Action": "Originate", "Variable": ["A=1", "B=张"], "ActionID": "x"})
    assert payload == "Action: Originate\r\nVariable: A=1\r\nVariable: B=张\r\nActionID: x\r\n\r\n".encode()


@pytest.mark.parametrize("fields", [
    {"Action": "Originate", "CallerID": "evil\r\nAction: Hangup"},
    {"Action": "Ping", "Variable": ["ok", "bad\nvalue"]},
    {"Action": "Ping", "Bad Header": "x"},
    {"Action": "Ping", "Bad:Header": "x"},
])
def test_format_action_refuses_header_injection(fields: dict[str, str | list[str]]) -> None:
    with pytest.raises(ValueError, match="AMI header"):
        format_action(fields)
