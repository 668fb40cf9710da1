"""The strict PyPI decoder `netflow` decodes every stream it can parse, every shown field exact."""

from __future__ import annotations

import pytest

from tests.collectors.streams import STREAM_SPECS, Stream
from tests.harness.collectors import CANNOT_DECODE, compare, decode_with_netflow

DECODABLE = [s for s in STREAM_SPECS if ("netflow", *s) not in CANNOT_DECODE]


@pytest.mark.parametrize("spec", DECODABLE, ids="-".join)
def test_every_record_and_field_exact(spec, streams: list[Stream]) -> None:
    stream = streams[STREAM_SPECS.index(spec)]
    flows = decode_with_netflow(stream.datagrams)
    problems = compare(flows, stream.exported, "netflow", stream.protocol, stream.profile.fields)
    assert problems == []
