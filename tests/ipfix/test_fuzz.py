"""Malformed and truncated datagrams: the decoder raises DecodeError and nothing else, and
always terminates."""

from __future__ import annotations

import contextlib
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
    with contextlib.suppress(DecodeError):
        decoder.feed(data, EXPORTER)


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
