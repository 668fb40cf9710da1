"""Exporter: records -> ExportSession -> UDP, checked by decoding what a loopback collector got."""

from __future__ import annotations

import socket

import pytest

from bridge.cache import FlowCache
from bridge.config import CollectorConfig
from bridge.exporter import Exporter
from bridge.messages import carries_templates, data_record_counts
from ebpf.observation import EndCause

from .helpers import T0, FakeClock, Sink, key, obs, reverse


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def ended(count: int, *, start_port: int = 1000, v6: bool = False, octets: int = 100):
    addrs = {"src": "fd00::1", "dst": "fd00::2"} if v6 else {}
    return [
        obs(
            key(start_port + i, 443, **addrs), octets * (i + 1), i + 1, T0, T0 + i, end=EndCause.FIN
        )
        for i in range(count)
    ]


def exporter_for(sink: Sink, clock: FakeClock, **settings) -> Exporter:
    config = CollectorConfig(host=sink.host, port=sink.port, **settings)
    return Exporter(config, 4242, clock=clock)


def export(exporter: Exporter, observations) -> None:
    exporter.export(FlowCache().update(observations))


def test_ipfix_sequence_counts_data_records_before_each_message(sink):
    clock = FakeClock(T0 + 1000)
    exporter = exporter_for(sink, clock, max_message_size=512)
    for batch in (3, 40, 7):
        export(exporter, ended(batch))
    messages = sink.receive(expect=5)
    data = [m for m in messages if m.records]
    assert all(m.domain_id == 4242 for m in data)
    sent = 0
    for message in data:
        assert message.sequence == sent
        sent += len(message.records)
    assert sent == 50 == exporter.records_exported


def test_v9_sequence_counts_packets_and_v5_counts_flows(sink):
    clock = FakeClock(T0 + 1000)
    v9 = exporter_for(sink, clock, protocol="v9")
    export(v9, ended(5))
    export(v9, ended(5))
    v9_messages = sink.receive(expect=3)
    assert [m.sequence for m in v9_messages] == list(range(len(v9_messages)))
    assert sum(len(m.records) for m in v9_messages) == 10

    v5 = exporter_for(sink, clock, protocol="v5")
    export(v5, ended(45))
    export(v5, ended(10))
    v5_messages = sink.receive(expect=3)
    assert [len(m.records) for m in v5_messages] == [30, 15, 10]
    assert [m.sequence for m in v5_messages] == [0, 30, 45]


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
@pytest.mark.parametrize("size", [512, 1400])
def test_messages_fit_the_maximum_size_and_lose_nothing(sink, protocol, size):
    exporter = exporter_for(sink, FakeClock(T0 + 1000), protocol=protocol, max_message_size=size)
    export(exporter, ended(300) + ended(200, v6=True, start_port=5000))
    messages = sink.receive(expect=20)
    assert max(map(len, sink.datagrams)) <= size
    records = [r for m in messages for r in m.records]
    assert len(records) == 500
    assert sum(r["packetDeltaCount"] for r in records) == sum(range(1, 301)) + sum(range(1, 201))
    assert sum("sourceIPv6Address" in r for r in records) == 200
    # packed: a data message that is not the last of its address family has no room for one more
    data = [(d, m) for d, m in zip(sink.datagrams, messages, strict=True) if m.records]
    for (datagram, message), (_, following) in zip(data, data[1:], strict=False):
        v6 = "sourceIPv6Address" in message.records[0]
        if v6 == ("sourceIPv6Address" in following.records[0]):
            set_length = max(length for set_id, length in message.sets if set_id >= 256)
            record_size = (set_length - 4) // len(message.records)
            assert len(datagram) + record_size > size


def test_templates_first_then_refreshed_by_time(sink):
    clock = FakeClock(T0 + 1000)
    exporter = exporter_for(sink, clock, template_refresh=30, template_refresh_packets=1000)
    export(exporter, ended(2))
    first = sink.receive(expect=2)
    assert first[0].templates and not first[0].records  # templates before first use
    clock.advance(10)
    export(exporter, ended(2))
    assert not any(m.templates for m in sink.receive(expect=1))
    clock.advance(21)
    export(exporter, ended(2))
    again = sink.receive(expect=2)
    assert again[0].templates and again[-1].records
    assert exporter.template_messages == 2


def test_templates_refreshed_by_packet_count(sink):
    clock = FakeClock(T0 + 1000)
    exporter = exporter_for(sink, clock, template_refresh=3600, template_refresh_packets=5)
    for _ in range(12):
        export(exporter, ended(1))
    messages = sink.receive(expect=14)
    with_templates = [i for i, m in enumerate(messages) if m.templates]
    assert len(with_templates) == 3  # before messages 1, 6 and 11
    data_between = [
        with_templates[1] - with_templates[0] - 1,
        with_templates[2] - with_templates[1] - 1,
    ]
    assert data_between == [5, 5]
    assert exporter.template_messages == 3


@pytest.mark.parametrize("protocol", ["ipfix", "v9", "v5"])
def test_record_counts_read_from_headers(sink, protocol):
    exporter = exporter_for(sink, FakeClock(T0 + 1000), protocol=protocol, max_message_size=600)
    records = exporter.builder.build(FlowCache().update(ended(77)))
    messages = exporter.session.encode(records)
    counts = data_record_counts(protocol, messages, len(records))
    decoder_counts = []
    for message in messages:
        decoded = sink.decoder.feed(message, ("127.0.0.1", 1))
        decoder_counts.append(sum(len(m.records) for m in decoded))
    assert counts == decoder_counts
    assert sum(counts) == 77
    assert [carries_templates(protocol, m) for m in messages] == [
        bool(sink.decoder.feed(m, ("127.0.0.2", 1))[0].templates) for m in messages
    ]


def test_v5_refuses_ipv6_and_counts_it(sink):
    exporter = exporter_for(sink, FakeClock(T0 + 1000), protocol="v5")
    export(exporter, ended(3) + ended(2, v6=True, start_port=9000))
    assert len(sink.records()) == 3
    assert exporter.records_refused == 2
    assert exporter.records_exported == 3


def test_options_carry_exporter_statistics_in_domain_zero(sink):
    exporter = exporter_for(sink, FakeClock(T0 + 1000))
    export(exporter, ended(4))
    exporter.transport.stats.records_dropped = 9  # as if a TCP backlog had overflowed
    exporter.send_options({1: "lo", 2: "eth0"})
    messages = sink.receive(expect=4)
    exporter_level = [m for m in messages if m.domain_id == 0]
    assert len(exporter_level) == 2  # statistics, then interface names
    stats = [m for m in exporter_level if any("notSentFlowTotalCount" in r
                                              for r in m.options_records)]
    (record,) = stats[0].options_records
    assert record["notSentFlowTotalCount"] == 9
    assert record["exportedFlowRecordTotalCount"] == 4
    assert record["systemInitTimeMilliseconds"] == T0 + 1000
    names = {
        r["ingressInterface"]: r["interfaceName"]
        for m in messages
        for r in m.options_records
        if "interfaceName" in r
    }
    assert names == {1: "lo", 2: "eth0"}
    # Unsampled is said in every record (samplingInterval = 1), never in the flow domain, where
    # each options message would cost nfdump 1.7.1 one sequence failure.
    assert not any("samplingPacketInterval" in r for m in messages for r in m.options_records)
    assert all(m.domain_id == 0 for m in messages if m.options_records)


def test_biflow_pair_is_one_rfc5103_record(sink):
    config = CollectorConfig(host=sink.host, port=sink.port)
    exporter = Exporter(config, 4242, biflow=True, clock=FakeClock(T0 + 1000))
    out_key = key(40000, 443)
    cache = FlowCache(biflow=True)
    cache.update([obs(out_key, 500, 5, T0, T0 + 100), obs(reverse(out_key), 9000, 7, T0, T0 + 90)])
    exporter.export(cache.flush_all(), biflow_cache=True)
    (record,) = sink.records()
    assert (record["sourceTransportPort"], record["destinationTransportPort"]) == (40000, 443)
    assert (record["octetDeltaCount"], record["packetDeltaCount"]) == (500, 5)
    assert (record["reverseOctetDeltaCount"], record["reversePacketDeltaCount"]) == (9000, 7)
    assert record["biflowDirection"] == 1
    assert (record["ingressInterface"], record["egressInterface"]) == (2, 2)


def test_biflow_cache_feeding_a_v9_collector_sends_two_uniflows(sink):
    exporter = exporter_for(sink, FakeClock(T0 + 1000), protocol="v9")
    out_key = key(40000, 443)
    cache = FlowCache(biflow=True)
    cache.update([obs(out_key, 500, 5, T0, T0 + 100), obs(reverse(out_key), 9000, 7, T0, T0 + 90)])
    exporter.export(cache.flush_all(), biflow_cache=True)
    records = sink.records()
    assert sorted((r["flowDirection"], r["packetDeltaCount"]) for r in records) == [(0, 7), (1, 5)]


def test_collector_down_then_up(sink):
    # a port nobody listens on (yet)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = CollectorConfig(host="127.0.0.1", port=port)
    exporter = Exporter(config, 4242, clock=FakeClock(T0 + 1000))
    for _ in range(4):
        export(exporter, ended(2))  # refused (ICMP port unreachable): counted, not raised
    assert exporter.transport.stats.refused >= 1
    late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    late.bind(("127.0.0.1", port))
    late.settimeout(1)
    try:
        export(exporter, ended(2))
        data = late.recv(65535)
        assert data[:2] == b"\x00\x0a"
    finally:
        late.close()
        exporter.close()
