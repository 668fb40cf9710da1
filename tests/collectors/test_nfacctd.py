"""pmacct nfacctd 1.7.7 decodes every stream: every shown field exact (times in whole seconds for
v9/v5, as pmacct keeps them), no "expecting flow" sequence message.

One nfacctd receives all streams (each its own observation domain / source id): starting it costs
about a second, and a collector receiving several exporters is the normal case."""

from __future__ import annotations

import pytest

from tests.collectors.streams import STREAM_SPECS, Stream
from tests.conftest import require_tools
from tests.harness.collectors import Nfacctd, compare

pytestmark = pytest.mark.collectors


@pytest.fixture(scope="module")
def nfacctd(streams: list[Stream]):
    require_tools("nfacctd")
    with Nfacctd(ip_version=4) as collector:
        for stream in streams:
            collector.send(stream.datagrams)
        collector.stop(expect_flows=sum(len(s.exported) for s in streams))
        yield collector


@pytest.mark.parametrize("spec", STREAM_SPECS, ids="-".join)
def test_every_record_and_field_exact(spec, streams: list[Stream], nfacctd: Nfacctd) -> None:
    stream = streams[STREAM_SPECS.index(spec)]
    flows = [f for f in nfacctd.flows() if stream.owns(f)]
    problems = compare(flows, stream.exported, "nfacctd", stream.protocol, stream.profile.fields)
    assert problems == []


def test_no_sequence_errors(nfacctd: Nfacctd) -> None:
    assert nfacctd.sequence_messages() == []
    assert nfacctd.drops == 0
