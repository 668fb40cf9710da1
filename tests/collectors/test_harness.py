"""The harness itself, checked without the project's encoder: hand-made NetFlow v5 packets (built
here with struct from the Cisco layout) must come back exact from every collector, and a lost
packet must show up as a sequence error where the collector checks sequences. Also: `compare`
must report a wrong field, a missing record and an unexpected one."""

from __future__ import annotations

import struct
import time

import pytest

from ipfix.profile import V5_LAYOUT, load_profile
from tests.collectors.streams import STREAM_SPECS
from tests.conftest import require_tools
from tests.harness.collectors import (
    COLLECTORS,
    FIELDS_SHOWN,
    NOT_SHOWN,
    Nfacctd,
    Nfcapd,
    compare,
    decode_with_netflow,
    decode_with_tshark,
)

V5_FIELDS = V5_LAYOUT


def v5_records(count: int, now_ms: int) -> list[dict]:
    return [
        {
            "sourceIPv4Address": bytes((10, 200, i // 250, i % 250 + 1)),
            "destinationIPv4Address": bytes((192, 0, 2, 7)),
            "ipNextHopIPv4Address": bytes((192, 0, 2, 254)),
            "ingressInterface": 3 + i,
            "egressInterface": 65535 - i,
            "packetDeltaCount": 10 + i,
            "octetDeltaCount": 4_000_000_000 + i,
            "flowStartMilliseconds": now_ms - 60_000 + i * 37,
            "flowEndMilliseconds": now_ms - 1_000 + i * 3,
            "sourceTransportPort": 40000 + i,
            "destinationTransportPort": 443,
            "tcpControlBits": 0x1B,
            "protocolIdentifier": 6,
            "ipClassOfService": i % 256,
            "bgpSourceAsNumber": 64512 + i,
            "bgpDestinationAsNumber": 65000,
            "sourceIPv4PrefixLength": 8,
            "destinationIPv4PrefixLength": 24,
        }
        for i in range(count)
    ]


def v5_packets(records: list[dict], now_ms: int, engine_id: int) -> list[bytes]:
    """Cisco v5: 24-byte header, 48-byte records, at most 30 per packet, sequence = flows sent
    before; sysUptime taken from the same instant as unix_secs/unix_nsecs."""
    boot_ms = now_ms - 3_600_000
    secs, ms = divmod(now_ms, 1000)
    packets, sent = [], 0
    for start in range(0, len(records), 30):
        chunk = records[start : start + 30]
        header = struct.pack(
            "!HHIIIIBBH",
            5,
            len(chunk),
            now_ms - boot_ms,
            secs,
            ms * 1_000_000,
            sent,
            0,
            engine_id,
            0,
        )
        body = b"".join(
            struct.pack(
                "!4s4s4sHHIIIIHHxBBBHHBBxx",
                r["sourceIPv4Address"],
                r["destinationIPv4Address"],
                r["ipNextHopIPv4Address"],
                r["ingressInterface"],
                r["egressInterface"],
                r["packetDeltaCount"],
                r["octetDeltaCount"],
                r["flowStartMilliseconds"] - boot_ms,
                r["flowEndMilliseconds"] - boot_ms,
                r["sourceTransportPort"],
                r["destinationTransportPort"],
                r["tcpControlBits"],
                r["protocolIdentifier"],
                r["ipClassOfService"],
                r["bgpSourceAsNumber"],
                r["bgpDestinationAsNumber"],
                r["sourceIPv4PrefixLength"],
                r["destinationIPv4PrefixLength"],
            )
            for r in chunk
        )
        packets.append(header + body)
        sent += len(chunk)
    return packets


NOW_MS = int(time.time() * 1000)
RECORDS = v5_records(75, NOW_MS)  # 3 packets: 30 + 30 + 15
PACKETS = v5_packets(RECORDS, NOW_MS, engine_id=1)


def test_netflow_decodes_handmade_v5_exact() -> None:
    assert compare(decode_with_netflow(PACKETS), RECORDS, "netflow", "v5", V5_FIELDS) == []


@pytest.mark.collectors
def test_tshark_decodes_handmade_v5_exact() -> None:
    require_tools("tshark")
    result = decode_with_tshark(PACKETS)
    assert result.messages == 3
    assert compare(result.flows, RECORDS, "tshark", "v5", V5_FIELDS) == []
    assert result.expert == []


@pytest.mark.collectors
def test_nfdump_decodes_handmade_v5_exact_and_counts_a_lost_packet() -> None:
    require_tools("nfcapd", "nfdump")
    with Nfcapd() as nfcapd:
        nfcapd.send(PACKETS)
        nfcapd.stop()
        assert compare(nfcapd.flows(), RECORDS, "nfdump", "v5", V5_FIELDS) == []
        assert nfcapd.sequence_errors() == 0
    with Nfcapd() as nfcapd:
        nfcapd.send([PACKETS[0], PACKETS[2]])
        nfcapd.stop()
        assert nfcapd.sequence_errors() == 1
        assert len(nfcapd.flows()) == 45
    assert "sourceIPv4PrefixLength" in NOT_SHOWN["nfdump"]["v5"]


@pytest.mark.collectors
def test_nfacctd_decodes_handmade_v5_exact_and_logs_a_lost_packet() -> None:
    require_tools("nfacctd")
    other = v5_records(105, NOW_MS)
    for record in other:  # a second exporter (engine 2) that loses its third packet
        record["sourceIPv4Address"] = bytes((10, 201, *record["sourceIPv4Address"][2:]))
    gapped = v5_packets(other, NOW_MS, engine_id=2)
    with Nfacctd() as nfacctd:
        nfacctd.send(PACKETS)
        # pmacct does not check the message after one with sequence 0: lose the third.
        nfacctd.send([gapped[0], gapped[1], gapped[3]])
        nfacctd.stop(expect_flows=75 + 75)
        flows = nfacctd.flows()
        good = [f for f in flows if f["sourceIPv4Address"][1] == 200]
        assert compare(good, RECORDS, "nfacctd", "v5", V5_FIELDS) == []
        assert len(flows) == 75 + 75
        messages = nfacctd.sequence_messages()
        assert len(messages) == 1 and "expecting flow '60' but received '90'" in messages[0]


def test_compare_reports_every_kind_of_difference() -> None:
    decoded = decode_with_netflow(PACKETS)
    wrong = [dict(r) for r in RECORDS]
    wrong[5]["octetDeltaCount"] += 1
    wrong[6]["flowEndMilliseconds"] -= 1
    wrong[7]["sourceTransportPort"] = 1  # no longer matches: missing + unexpected
    problems = compare(decoded, wrong, "netflow", "v5", V5_FIELDS)
    assert len(problems) == 4
    assert "octetDeltaCount: got 4000000005, want 4000000006" in problems[0]
    assert "flowEndMilliseconds" in problems[1]
    assert "missing" in problems[2] and "unexpected" in problems[3]


@pytest.mark.parametrize("collector", COLLECTORS)
def test_every_profile_field_is_accounted_for(collector: str) -> None:
    """Each element a shipped profile sends is either shown (FIELDS_SHOWN) or listed with the
    reason it is not (NOT_SHOWN): the compatibility notes leave nothing out."""
    for protocol, profile_name in STREAM_SPECS:
        fields = load_profile(profile_name).fields
        shown = FIELDS_SHOWN[collector][protocol]
        not_shown = NOT_SHOWN[collector][protocol]
        family_v6 = ("sourceIPv6Address", "destinationIPv6Address")
        missing = [
            name
            for name in fields
            if name not in shown
            and name not in not_shown
            and not (protocol == "v5" and name in family_v6)
        ]
        assert missing == [], f"{collector}/{protocol}/{profile_name}"


def test_streams_span_several_full_messages(streams) -> None:
    """What the decoders get is not one easy message: several near-full 1400-byte IPFIX/v9
    messages per stream, more than 30 records (several packets) for v5, IPv4 and IPv6."""
    for stream in streams:
        sizes = [len(d) for d in stream.datagrams]
        assert max(sizes) <= (24 + 30 * 48 if stream.protocol == "v5" else 1400), stream.name
        if stream.protocol == "v5":
            assert len(stream.exported) > 30 and len(stream.datagrams) >= 3
            assert all(int.from_bytes(d[2:4], "big") <= 30 for d in stream.datagrams)
        else:
            assert sum(size > 1200 for size in sizes) >= 3, stream.name
            assert {"sourceIPv4Address", "sourceIPv6Address"} <= {
                key for record in stream.exported for key in record
            }
