"""The row path: ExportSession.encode_rows / encode_runs give byte for byte the messages that
encode(dicts) gives for the same records, including the careful path (values out of range, None,
long and non-ASCII strings), and refuse what the protocol cannot carry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfix.decoder import Decoder
from ipfix.errors import IpfixError
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.harness.formats import FORMATS
from tests.ipfix.strategies import NOW_MS, records

CASES = FORMATS


class Clock:
    """Advances 7 s per reading, so template refresh by time happens inside a test."""

    def __init__(self) -> None:
        self.now = NOW_MS / 1000

    def __call__(self) -> float:
        self.now += 7
        return self.now


def pair(protocol: str, profile_name: str, **kwargs) -> tuple[ExportSession, ExportSession]:
    profile = load_profile(profile_name)
    return tuple(  # type: ignore[return-value]
        ExportSession(protocol, profile, 77, clock=Clock(), exporting_process_id=5, **kwargs)
        for _ in range(2)
    )


def as_rows(session: ExportSession, family: int, batch: list[dict]) -> list[tuple]:
    layout = session.row_layout(family)
    return [tuple(record.get(key, default) for key, default in layout) for record in batch]


def families(protocol: str) -> list[int]:
    return [4] if protocol == "v5" else [4, 6]


@pytest.mark.parametrize(("protocol", "profile_name"), CASES)
def test_rows_and_dicts_give_identical_messages(protocol: str, profile_name: str) -> None:
    profile = load_profile(profile_name)
    strategy = st.lists(
        st.tuples(
            st.sampled_from(families(protocol)).flatmap(
                lambda f: st.tuples(
                    st.just(f), st.lists(records(profile, protocol, f), max_size=90)
                )
            )
        ),
        min_size=1,
        max_size=4,
    )

    @settings(max_examples=25, deadline=None)
    @given(strategy, st.sampled_from([300, 1400]))
    def check(batches: list, max_size: int) -> None:
        with_dicts, with_rows = pair(protocol, profile_name, max_message_size=max_size)
        for ((family, batch),) in batches:
            expected = with_dicts.encode(batch)
            assert with_rows.encode_rows(family, as_rows(with_rows, family, batch)) == expected
        assert with_rows.records_sent == with_dicts.records_sent
        assert with_rows.octets_sent == with_dicts.octets_sent

    check()


def test_both_families_share_messages_as_dicts_do() -> None:
    v4 = [_record(4, port) for port in range(1000, 1030)]
    v6 = [_record(6, port) for port in range(2000, 2017)]
    for protocol in ("ipfix", "v9"):
        with_dicts, with_rows = pair(protocol, "ntop")
        expected = with_dicts.encode(v4 + v6)
        runs = [(4, as_rows(with_rows, 4, v4)), (6, as_rows(with_rows, 6, v6))]
        messages = with_rows.encode_runs(runs)
        assert messages == expected
        if protocol == "v9":
            continue  # here the IPv4 records happen to end a packet exactly
        # a message holds the end of the IPv4 set and the start of the IPv6 set
        decoder = Decoder()
        mixed = [
            {"sourceIPv6Address" in r for r in m.records}
            for message in messages
            for m in decoder.feed(message, ("127.0.0.1", 1))
        ]
        assert {False, True} in mixed


def test_careful_path_is_the_same_for_rows() -> None:
    """Out-of-range numbers saturate, flags are masked, None is the default, long and non-ASCII
    strings are truncated or length-prefixed exactly as for dicts."""
    odd = [
        {**_record(4, 1), "octetDeltaCount": 1 << 70},
        {**_record(4, 2), "tcpControlBits": 0x1FF},
        {**_record(4, 3), "packetDeltaCount": None},
        {**_record(4, 4), "SRC_PROC_NAME": "x" * 300},
        {**_record(4, 5), "DST_PROC_NAME": "ünïcødé-процесс-имя"},
        {**_record(4, 6), "ingressInterface": -5},
        _record(4, 7),
    ]
    for protocol, profile_name in CASES:
        with_dicts, with_rows = pair(protocol, profile_name)
        fields = load_profile(profile_name).fields
        batch = [{k: v for k, v in r.items() if k in fields} for r in odd]
        expected = with_dicts.encode(batch)
        assert with_rows.encode_rows(4, as_rows(with_rows, 4, batch)) == expected, protocol
    decoded = Decoder().records(expected[-1], ("127.0.0.1", 1))  # v5
    assert decoded[0]["octetDeltaCount"] == (1 << 32) - 1
    assert decoded[5]["ingressInterface"] == 0


def test_strings_are_encoded_once_per_value_and_exactly() -> None:
    session = ExportSession("ipfix", load_profile("ntop"), 77, clock=Clock())
    names = ["curl", "", "nginx: worker", "é" * 200]  # the last one passes 255 bytes
    batch = [{**_record(4, i), "SRC_PROC_NAME": names[i % 4]} for i in range(400)]
    decoded = []
    decoder = Decoder()
    for message in session.encode_rows(4, as_rows(session, 4, batch)):
        decoded += decoder.records(message, ("127.0.0.1", 1))
    assert [r["SRC_PROC_NAME"] for r in decoded] == [names[i % 4] for i in range(400)]


def test_v5_refuses_ipv6_rows_and_counts_them() -> None:
    session = ExportSession("v5", load_profile("v5"), 77, clock=Clock())
    assert session.row_layout(6) == ()
    rows = as_rows(session, 4, [_record(4, p) for p in range(40)])
    messages = session.encode_runs([(4, rows[:25]), (6, [()] * 3), (4, rows[25:])])
    assert session.refused_records == 3
    assert [int.from_bytes(m[2:4], "big") for m in messages] == [30, 10]


def test_bad_rows_are_one_clear_error() -> None:
    session = ExportSession("v9", load_profile("standard"), 77, clock=Clock())
    good = as_rows(session, 4, [_record(4, 1)])[0]
    with pytest.raises(IpfixError, match="a row of 3 values for"):
        session.encode_rows(4, [good[:3]])
    start = session.row_layout(4).index(("flowStartMilliseconds", 0))
    with pytest.raises(IpfixError, match="flow times must be integers"):
        session.encode_rows(4, [good[:start] + ("soon",) + good[start + 1 :]])
    with pytest.raises(IpfixError, match="address family 5"):
        session.encode_rows(5, [good])


def test_v9_rows_older_than_the_time_base_are_refused_like_dicts() -> None:
    with_dicts, with_rows = pair("v9", "standard")
    recent = [_record(4, p) for p in range(5)]
    for session in (with_dicts, with_rows):
        session.encode(recent) if session is with_dicts else session.encode_rows(
            4, as_rows(session, 4, recent)
        )
    ancient = [{**_record(4, 9), "flowStartMilliseconds": NOW_MS - 60 * 86_400_000}]
    expected = with_dicts.encode(ancient + recent)
    assert with_rows.encode_rows(4, as_rows(with_rows, 4, ancient + recent)) == expected
    assert with_rows.refused_records == with_dicts.refused_records


def _record(family: int, port: int) -> dict:
    addresses = (
        {"sourceIPv4Address": bytes([10, 0, 0, 1]), "destinationIPv4Address": bytes([10, 0, 0, 2])}
        if family == 4
        else {"sourceIPv6Address": bytes(15) + b"\1", "destinationIPv6Address": bytes(15) + b"\2"}
    )
    return {
        **addresses,
        "sourceTransportPort": port,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "tcpControlBits": 0x1B,
        "ipVersion": family,
        "octetDeltaCount": 1500 * port,
        "packetDeltaCount": port,
        "flowStartMilliseconds": NOW_MS - 5000,
        "flowEndMilliseconds": NOW_MS - 1000 + port % 500,
        "ingressInterface": 2,
        "flowDirection": 0,
        "flowEndReason": 3,
        "DST_PROC_PID": 4242,
        "DST_PROC_NAME": "curl",
        "RETRANSMITTED_IN_PKTS": 2,
    }
