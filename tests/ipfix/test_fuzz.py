"""Malformed and truncated datagrams: the decoder raises DecodeError and nothing else, and
always terminates."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfix.decoder import Decoder
from ipfix.errors import DecodeError
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.ipfix.strategies import NOW_MS

EXPORTER = ("192.0.2.9", 9995)


def _valid_messages() -> dict[str, list[bytes]]:
    record = {
        "sourceIPv4Address": bytes([10, 0, 0, 1]),
        "destinationIPv4Address": bytes([10, 0, 0, 2]),
        "sourceTransportPort": 40000,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "octetDeltaCount": 5000,
        "packetDeltaCount": 9,
        "flowStartMilliseconds": NOW_MS - 3000,
        "flowEndMilliseconds": NOW_MS - 1,
        "SRC_PROC_NAME": "nginx",
    }
    record6 = {k: v for k, v in record.items() if "IPv4" not in k}
    record6 |= {"sourceIPv6Address": bytes(16), "destinationIPv6Address": bytes(range(16))}
    out = {}
    for protocol, profile in (("ipfix", "ntop"), ("v9", "ntop"), ("v5", "v5")):
        session = ExportSession(protocol, load_profile(profile), 5, clock=lambda: NOW_MS / 1000)
        messages = session.encode([record, record6] * 3)
        messages += session.options_messages({}, interfaces={1: "lo", 2: "eth0"}, sampling=True)
        out[protocol] = messages
    return out


VALID = _valid_messages()
ALL_VALID = [m for messages in VALID.values() for m in messages]


def _primed_decoder() -> Decoder:
    """A decoder that knows the templates, so mutated data sets reach the record parsers."""
    decoder = Decoder()
    for message in ALL_VALID:
        decoder.feed(message, EXPORTER)
    return decoder


def _feed_only_decode_errors(decoder: Decoder, data: bytes) -> None:
    try:
        decoder.feed(data, EXPORTER)
    except DecodeError as exc:
        assert exc.reason != "unexpected", exc  # the catch-all: a check is missing


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_VALID), st.data())
def test_truncations(message: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(message) - 1))
    decoder = _primed_decoder()
    with pytest.raises(DecodeError):
        decoder.feed(message[:cut], EXPORTER)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(ALL_VALID), st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_bit_flips(message: bytes, positions: list[int]) -> None:
    mutated = bytearray(message)
    for p in positions:
        bit = p % (8 * len(mutated))
        mutated[bit // 8] ^= 1 << (bit % 8)
    _feed_only_decode_errors(_primed_decoder(), bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\x00\x0a", b"\x00\x09", b"\x00\x05", b""]), st.binary(max_size=1500))
def test_random_bytes(prefix: bytes, tail: bytes) -> None:
    _feed_only_decode_errors(_primed_decoder(), prefix + tail)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([2, 3, 256, 0, 1]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=64),
)
def test_loops_in_lengths(set_id: int, set_length: int, inner: int, tail: bytes) -> None:
    """Set and template lengths that point backwards, at zero, or past the end."""
    body = struct.pack(">HHHH", set_id, set_length, 256 + inner % 10, inner) + tail
    ipfix = struct.pack(">HHIII", 10, 16 + len(body), 0, 0, 1) + body
    v9 = struct.pack(">HHIIII", 9, 1, 0, 0, 0, 1) + body
    decoder = _primed_decoder()
    _feed_only_decode_errors(decoder, ipfix)
    _feed_only_decode_errors(decoder, v9)


def test_zero_length_template_fields_do_not_spin() -> None:
    # A template whose every field has length 0 would give records of length 0.
    template = struct.pack(">HHHHHH", 2, 12, 300, 2, 1, 0) + struct.pack(">HH", 2, 0)
    data = struct.pack(">HH", 300, 12) + bytes(8)
    message = template + data
    with pytest.raises(DecodeError):
        Decoder().feed(struct.pack(">HHIII", 10, 16 + len(message), 0, 0, 1) + message, EXPORTER)


def test_wrong_length_field_is_refused() -> None:
    message = bytearray(VALID["ipfix"][0])
    message[2:4] = struct.pack(">H", len(message) + 2)
    with pytest.raises(DecodeError, match="length"):
        Decoder().feed(bytes(message), EXPORTER)


def test_data_before_its_template_is_counted_not_decoded() -> None:
    data_message = VALID["ipfix"][1]
    [message] = Decoder().feed(data_message, EXPORTER)
    assert message.records == []
    assert message.unknown_template_sets >= 1


# Regressions found by bench/fuzz.py and by reading the decoder for hostile input -------------
def _ipfix(domain: int, *sets: bytes) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), 0, 0, domain) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def test_empty_fields_cannot_multiply_the_work() -> None:
    """2000 fields of length 0 plus one byte: each byte of data was a 2001-value record (20 KB
    of data cost 6 s of CPU). A field of length 0 is now a malformed template."""
    fields = struct.pack(">HH", 4, 1) + struct.pack(">HH", 7, 0) * 2000
    template = _ipfix(1, _set(2, struct.pack(">HH", 300, 2001) + fields))
    decoder = Decoder()
    with pytest.raises(DecodeError, match="length 0") as caught:
        decoder.feed(template, EXPORTER)
    assert caught.value.reason == "template"
    [message] = decoder.feed(_ipfix(1, _set(300, bytes(20000))), EXPORTER)
    assert message.records == [] and message.unknown_template_sets == 1


def test_overlong_integers_stay_bytes() -> None:
    """An integer element sent with 600 bytes (fixed) or 9 (variable length) is not turned into
    an int that str() and json.dumps refuse (more than 4300 digits)."""
    template = struct.pack(">HHHHHH", 301, 2, 1, 600, 2, 0xFFFF)  # octetDeltaCount, packetDelta...
    data = b"\x01" * 600 + b"\x09" + bytes(range(9)) + b"\x00" * 600 + b"\x02\x01\x02"
    [message] = Decoder().feed(_ipfix(1, _set(2, template), _set(301, data)), EXPORTER)
    first, second = message.records
    assert first == {"octetDeltaCount": b"\x01" * 600, "packetDeltaCount": bytes(range(9))}
    assert second == {"octetDeltaCount": bytes(600), "packetDeltaCount": 0x0102}


def test_v9_overlong_uptime_is_left_as_sent() -> None:
    template = struct.pack(">HHHHHH", 256, 2, 22, 12, 21, 4)  # FIRST_SWITCHED 12 bytes, LAST 4
    flowset = _set(0, template) + _set(256, b"\x07" * 12 + struct.pack(">I", 500))
    v9 = struct.pack(">HHIIII", 9, 2, 1000, 2000, 0, 1) + flowset
    [record] = Decoder().records(v9, EXPORTER)
    assert record["flowEndMilliseconds"] == 2000 * 1000 - 1000 + 500
    assert record["flowStartSysUpTime"] == b"\x07" * 12


def test_options_template_withdrawal_is_four_bytes() -> None:
    """RFC 7011 §8.1: an options template is withdrawn with a 4-byte record, as any template;
    it used to be skipped as padding when it was the last one in its set."""
    options = struct.pack(">HHHHHHH", 400, 2, 1, 149, 4, 41, 8)
    decoder = Decoder()
    decoder.feed(_ipfix(1, _set(3, options)), EXPORTER)
    assert len(decoder.templates) == 1
    decoder.feed(_ipfix(1, _set(3, struct.pack(">HH", 400, 0))), EXPORTER)
    assert len(decoder.templates) == 0


def test_withdraw_all_templates_keeps_the_options_templates() -> None:
    options = struct.pack(">HHHHHHH", 400, 2, 1, 149, 4, 41, 8)
    plain = struct.pack(">HHHH", 401, 1, 4, 1) + struct.pack(">HHHH", 402, 1, 7, 2)
    decoder = Decoder()
    decoder.feed(_ipfix(1, _set(3, options), _set(2, plain)), EXPORTER)
    decoder.feed(_ipfix(2, _set(2, plain)), EXPORTER)  # another domain: untouched
    assert len(decoder.templates) == 5
    decoder.feed(_ipfix(1, _set(2, struct.pack(">HH", 2, 0))), EXPORTER)
    [message] = decoder.feed(_ipfix(1, _set(401, b"\x06"), _set(400, bytes(12))), EXPORTER)
    assert message.unknown_template_sets == 1 and len(message.options_records) == 1
    assert len(decoder.templates) == 3
    decoder.feed(_ipfix(1, _set(3, struct.pack(">HH", 3, 0))), EXPORTER)
    assert len(decoder.templates) == 2 and decoder.templates.sources() == 1


def test_headers_from_endless_domains_cache_nothing() -> None:
    """Every message used to leave an empty template table for its (exporter, domain): a flood
    of header-only messages grew memory without bound."""
    decoder = Decoder()
    for domain in range(5000):
        decoder.feed(_ipfix(domain), (f"198.51.100.{domain % 250}", 1))
        decoder.feed(struct.pack(">HHIIII", 9, 0, 0, 0, 0, domain), EXPORTER)
    assert len(decoder.templates) == 0 and decoder.templates.sources() == 0


def test_every_rejection_has_a_reason() -> None:
    cases = {
        b"\x00": "short",
        b"\x00\x07" + bytes(30): "version",
        _ipfix(1)[:10]: "short",
        _ipfix(1) + b"\x00": "length",
        _ipfix(1, b"\x00\x02\x00\x09"): "set",
        _ipfix(1, _set(1, b"")): "set",
        _ipfix(1, _set(2, struct.pack(">HHHH", 255, 1, 4, 1))): "template",
        _ipfix(1, _set(2, struct.pack(">HHHH", 256, 2, 4, 1))): "template",
        struct.pack(">HHIIII", 9, 3, 0, 0, 0, 1): "count",
        struct.pack(">HHIIIIBBH", 5, 31, 0, 0, 0, 0, 0, 0, 0): "length",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError) as caught:
            Decoder().feed(data, EXPORTER)
        assert caught.value.reason == reason, (data.hex(), str(caught.value))
