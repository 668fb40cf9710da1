"""The collectors listening on IPv6 loopback (::1), tshark watching the same packets live on `lo`,
and lost messages: each collector must report exactly one sequence error per lost message."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from tests.collectors.streams import STREAM_SPECS, Stream
from tests.harness.collectors import (
    Nfacctd,
    Nfcapd,
    TsharkCapture,
    TsharkResult,
    compare,
    decode_with_tshark,
    require_collector,
)

pytestmark = pytest.mark.collectors

INTACT = (("ipfix", "standard"), ("v9", "standard"))
LOSSY = (("ipfix", "ntop"), ("v9", "ntop"))


def data_message_indexes(datagrams: list[bytes]) -> list[int]:
    """Indexes of the messages that carry a data set (IPFIX set id / v9 flowset id >= 256)."""
    found = []
    for index, datagram in enumerate(datagrams):
        offset = 16 if datagram[:2] == b"\x00\x0a" else 20
        while offset + 4 <= len(datagram):
            set_id, length = struct.unpack_from("!HH", datagram, offset)
            if set_id >= 256:
                found.append(index)
                break
            offset += max(length, 4)
    return found


@dataclass
class LossyStream:
    stream: Stream
    sent: list[bytes]
    lost_records: int


def lose_one_message(stream: Stream) -> LossyStream:
    """Drop the third data message: never right after a message with sequence 0, which pmacct
    does not check."""
    lost = data_message_indexes(stream.datagrams)[2]
    before = decode_with_tshark(stream.datagrams[:lost]).flows
    through = decode_with_tshark(stream.datagrams[: lost + 1]).flows
    sent = stream.datagrams[:lost] + stream.datagrams[lost + 1 :]
    return LossyStream(stream, sent, len(through) - len(before))


@dataclass
class Run:
    nfdump: Nfcapd
    nfacctd: Nfacctd
    tshark: TsharkResult
    lossy: list[LossyStream]


@pytest.fixture(scope="module")
def run(streams: list[Stream]):
    for name in ("nfdump", "nfacctd", "tshark"):
        require_collector(name)
    intact = [streams[STREAM_SPECS.index(spec)] for spec in INTACT]
    lossy = [lose_one_message(streams[STREAM_SPECS.index(spec)]) for spec in LOSSY]
    batches = [s.datagrams for s in intact] + [s.sent for s in lossy]
    with Nfcapd(ip_version=6) as nfcapd, Nfacctd(ip_version=6) as nfacctd:
        with TsharkCapture(ip_version=6, port=nfcapd.port) as capture:
            for datagrams in batches:  # one socket (source port) per exporter
                nfcapd.send(datagrams)
            capture.stop(expect_packets=sum(map(len, batches)))
            assert capture.kernel_drops() == 0, capture.daemon.log()
            tshark = capture.result()
        nfcapd.stop()
        for datagrams in batches:
            nfacctd.send(datagrams)
        expected = sum(len(s.exported) for s in intact)
        expected += sum(len(s.stream.exported) - s.lost_records for s in lossy)
        nfacctd.stop(expect_flows=expected)
        yield Run(nfcapd, nfacctd, tshark, lossy)


@pytest.mark.parametrize("spec", INTACT, ids="-".join)
def test_ipv6_listeners_decode_exact(spec, streams: list[Stream], run: Run) -> None:
    stream = streams[STREAM_SPECS.index(spec)]
    fields = stream.profile.fields
    mine = [f for f in run.nfdump.flows() if stream.owns(f)]
    assert compare(mine, stream.exported, "nfdump", stream.protocol, fields) == []
    mine = [f for f in run.nfacctd.flows() if stream.owns(f)]
    assert compare(mine, stream.exported, "nfacctd", stream.protocol, fields) == []
    mine = [f for f in run.tshark.flows if stream.owns(f)]
    assert compare(mine, stream.exported, "tshark", stream.protocol, fields) == []


def test_each_lost_message_is_one_sequence_error(run: Run) -> None:
    assert all(lossy.lost_records > 0 for lossy in run.lossy)
    assert run.nfdump.sequence_errors() == len(LOSSY), run.nfdump.log()
    assert len(run.nfacctd.sequence_messages()) == len(LOSSY), run.nfacctd.log()
    assert run.tshark.sequence_errors() == len(LOSSY), run.tshark.expert
    assert run.tshark.missing_templates() == 0


@pytest.mark.parametrize("index", range(len(LOSSY)), ids=["-".join(s) for s in LOSSY])
def test_only_the_lost_records_are_missing(index: int, run: Run) -> None:
    lossy = run.lossy[index]
    stream = lossy.stream
    flows = [f for f in run.tshark.flows if stream.owns(f)]
    problems = compare(flows, stream.exported, "tshark", stream.protocol, stream.profile.fields)
    assert len(problems) == lossy.lost_records
    assert all(problem.endswith("missing") for problem in problems)
