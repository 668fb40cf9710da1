"""The start/stop form live agent tests use: a collector opened by name, an exporter sending to
its .address from its own socket, then stop(), flows() and sequence_errors()."""

from __future__ import annotations

import pytest

from tests.collectors.streams import STREAM_SPECS, Stream
from tests.harness.collectors import compare, send_datagrams

pytestmark = pytest.mark.collectors


# nfacctd's start/stop form is what test_nfacctd.py and test_ipv6_and_loss.py already use.
@pytest.mark.parametrize("name", ["nfdump", "tshark", "netflow"])
@pytest.mark.parametrize("ip_version", [4, 6])
def test_open_send_stop_compare(name: str, ip_version: int, collector_factory, streams) -> None:
    stream: Stream = streams[STREAM_SPECS.index(("v9", "standard"))]
    collector = collector_factory(name, ip_version)
    host, port = collector.address
    assert host == ("::1" if ip_version == 6 else "127.0.0.1")
    send_datagrams(stream.datagrams, host, port)
    if name == "tshark":
        collector.stop(expect_packets=len(stream.datagrams))
    else:
        collector.stop()
    flows = collector.flows()
    assert compare(flows, stream.exported, name, stream.protocol, stream.profile.fields) == []
    assert collector.sequence_errors() == (None if name == "netflow" else 0)
