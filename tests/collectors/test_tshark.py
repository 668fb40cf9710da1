"""tshark 4.0.17 (cflow dissector) decodes every stream: every shown field exact, all records of
all messages, no expert warning (sequence, missing template) and nothing malformed."""

from __future__ import annotations

import pytest

from tests.collectors.streams import BATCH, STREAM_SPECS, Stream
from tests.conftest import require_tools
from tests.harness.collectors import TsharkResult, compare, decode_with_tshark

pytestmark = pytest.mark.collectors


@pytest.fixture(scope="module")
def decoded(streams: list[Stream]) -> dict[str, TsharkResult]:
    require_tools("tshark")
    # One capture per stream: tshark keeps templates per capture and UDP stream.
    return {stream.name: decode_with_tshark(stream.datagrams) for stream in streams}


@pytest.mark.parametrize("spec", STREAM_SPECS, ids="-".join)
def test_every_record_and_field_exact(spec, streams: list[Stream], decoded) -> None:
    stream = streams[STREAM_SPECS.index(spec)]
    result = decoded[stream.name]
    assert result.messages == len(stream.datagrams)
    problems = compare(
        result.flows, stream.exported, "tshark", stream.protocol, stream.profile.fields
    )
    assert problems == []


@pytest.mark.parametrize("spec", STREAM_SPECS, ids="-".join)
def test_no_expert_warning(spec, streams: list[Stream], decoded) -> None:
    result = decoded[streams[STREAM_SPECS.index(spec)].name]
    assert result.sequence_errors() == 0
    assert result.missing_templates() == 0
    assert result.expert == []
    assert result.malformed == 0


@pytest.mark.parametrize("spec", [("ipfix", "standard"), ("v9", "standard")], ids="-".join)
def test_exporter_statistics_decoded(spec, streams: list[Stream], decoded) -> None:
    """The standard streams carry exporter statistics once, then the names of 3 interfaces;
    tshark shows the statistics' values."""
    stream = streams[STREAM_SPECS.index(spec)]
    options = decoded[stream.name].options
    assert len(options) == 1 + 3
    [stats] = [o for o in options if "notSentFlowTotalCount" in o]
    assert stats["notSentFlowTotalCount"] == 3
    assert stats["notSentPacketTotalCount"] == 30
    # Sent before the statistics: the first two batches of records, in that many messages.
    assert stats["exportedFlowRecordTotalCount"] == 2 * BATCH
    assert stats["exportedMessageTotalCount"] == stream.messages_before_stats
