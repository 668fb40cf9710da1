"""nfcapd + nfdump 1.7.1 decode every stream: every shown field exact, zero sequence failures.

One nfcapd receives all streams (each its own observation domain / v5 engine), as a collector
receiving several exporters does."""

from __future__ import annotations

import pytest

from tests.collectors.streams import STREAM_SPECS, Stream
from tests.conftest import require_tools
from tests.harness.collectors import Nfcapd, compare

pytestmark = pytest.mark.collectors


@pytest.fixture(scope="module")
def nfcapd(streams: list[Stream]):
    require_tools("nfcapd", "nfdump")
    with Nfcapd(ip_version=4) as collector:
        for stream in streams:
            collector.send(stream.datagrams)
        collector.stop()
        yield collector


@pytest.mark.parametrize("spec", STREAM_SPECS, ids="-".join)
def test_every_record_and_field_exact(spec, streams: list[Stream], nfcapd: Nfcapd) -> None:
    stream = streams[STREAM_SPECS.index(spec)]
    flows = [f for f in nfcapd.flows() if stream.owns(f)]
    assert compare(flows, stream.exported, "nfdump", stream.protocol, stream.profile.fields) == []


def test_no_sequence_failures_and_nothing_dropped(streams: list[Stream], nfcapd: Nfcapd) -> None:
    stat = nfcapd.stat()
    assert stat["Flows"] == sum(len(s.exported) for s in streams)
    assert nfcapd.sequence_errors() == 0, nfcapd.log()
    assert nfcapd.bad_packets() == 0, nfcapd.log()
    assert nfcapd.drops == 0


def test_v5_refuses_ipv6_with_a_count(streams: list[Stream]) -> None:
    v5 = streams[STREAM_SPECS.index(("v5", "v5"))]
    ipv6 = sum("sourceIPv6Address" in r for r in v5.records)
    assert ipv6 > 0 and v5.refused == ipv6
