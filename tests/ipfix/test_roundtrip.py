"""Encode -> decode is an identity, in all three protocols, IPv4 and IPv6, for every profile."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfix.decoder import Decoder
from ipfix.jsonform import record_from_json, record_to_json
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.ipfix.strategies import NOW_MS, records

EXPORTER = ("127.0.0.1", 4739)
CASES = [
    ("ipfix", "standard", 4),
    ("ipfix", "standard", 6),
    ("ipfix", "ntop", 4),
    ("ipfix", "ntop", 6),
    ("v9", "standard", 4),
    ("v9", "standard", 6),
    ("v9", "ntop", 4),
    ("v9", "ntop", 6),
    ("v9", "nfdump-latency", 4),
    ("v9", "nfdump-latency", 6),
    ("v5", "v5", 4),
]


def roundtrip(protocol: str, profile_name: str, batch: list[dict], **kwargs) -> list[dict]:
    session = ExportSession(
        protocol, load_profile(profile_name), 77, clock=lambda: NOW_MS / 1000, **kwargs
    )
    decoder = Decoder()
    out = []
    for message in session.encode(batch):
        out += decoder.records(message, EXPORTER)
    return out


@pytest.mark.parametrize(("protocol", "profile_name", "family"), CASES)
def test_round_trip_is_identity(protocol: str, profile_name: str, family: int) -> None:
    strategy = st.lists(records(load_profile(profile_name), protocol, family), max_size=70)

    @settings(max_examples=40, deadline=None)
    @given(strategy)
    def check(batch: list[dict]) -> None:
        assert roundtrip(protocol, profile_name, batch) == batch

    check()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.one_of(
            records(load_profile("ntop"), "ipfix", 4), records(load_profile("ntop"), "ipfix", 6)
        ),
        max_size=80,
    ),
    st.integers(300, 1500),
)
def test_mixed_families_keep_their_order(batch: list[dict], max_size: int) -> None:
    assert roundtrip("ipfix", "ntop", batch, max_message_size=max_size) == batch


@settings(max_examples=30, deadline=None)
@given(st.lists(records(load_profile("standard"), "ipfix", 6), min_size=1, max_size=5))
def test_json_form_round_trip(batch: list[dict]) -> None:
    for record in batch:
        assert record_from_json(record_to_json(record)) == record


def test_missing_keys_encode_as_zero_or_the_profile_default() -> None:
    sparse = {
        "sourceIPv4Address": bytes([192, 0, 2, 1]),
        "destinationIPv4Address": bytes([192, 0, 2, 2]),
        "octetDeltaCount": 1234,
        "flowStartMilliseconds": NOW_MS - 10,
        "flowEndMilliseconds": NOW_MS - 5,
    }
    for protocol in ("ipfix", "v9"):
        [decoded] = roundtrip(protocol, "ntop", [sparse])
        assert decoded["octetDeltaCount"] == 1234
        assert decoded["packetDeltaCount"] == 0
        assert decoded["samplingInterval"] == 1  # the profile's default
        assert decoded["SRC_PROC_NAME"] == ""
        assert decoded["flowEndMilliseconds"] == NOW_MS - 5


def test_v5_refuses_ipv6_with_a_count() -> None:
    v4 = {"sourceIPv4Address": bytes(4), "destinationIPv4Address": bytes(4), "packetDeltaCount": 3}
    v6 = {"sourceIPv6Address": bytes(16), "destinationIPv6Address": bytes(16)}
    session = ExportSession("v5", load_profile("v5"), 1, clock=lambda: NOW_MS / 1000)
    messages = session.encode([v4, v6, v6, v4])
    assert session.refused_records == 2
    decoded = [r for m in messages for r in Decoder().records(m, EXPORTER)]
    assert [r["packetDeltaCount"] for r in decoded] == [3, 3]


def test_oversized_values_saturate_and_flags_lose_high_bits() -> None:
    record = {
        "sourceIPv4Address": bytes(4),
        "destinationIPv4Address": bytes(4),
        "octetDeltaCount": 1 << 40,  # v5 counters are 32-bit
        "tcpControlBits": 0x1_12,  # NS + SYN|ACK: the 1-byte encoding keeps SYN|ACK
        "ingressInterface": 70_000,  # v5 ifIndex is 16-bit
        "flowStartMilliseconds": NOW_MS - 1000,
        "flowEndMilliseconds": NOW_MS,
    }
    [v5] = roundtrip("v5", "v5", [record])
    assert v5["octetDeltaCount"] == (1 << 32) - 1
    assert v5["tcpControlBits"] == 0x12
    assert v5["ingressInterface"] == 0xFFFF
    [ipfix] = roundtrip("ipfix", "standard", [record])
    assert ipfix["octetDeltaCount"] == 1 << 40
    assert ipfix["tcpControlBits"] == 0x12
