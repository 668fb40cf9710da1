"""The agent loop in process: synthetic source, fake clock, real loopback collectors."""

from __future__ import annotations

import socket
import time

from bridge.agent import Agent
from bridge.config import AgentConfig, CollectorConfig, default_observation_domain_id
from bridge.synthetic import SyntheticSource
from ebpf.observation import EndCause
from ipfix.decoder import Decoder

from .helpers import T0, FakeClock, Sink, key, obs, read_stream, split_ipfix


def agent_for(
    collector: CollectorConfig, clock: FakeClock, **settings
) -> tuple[Agent, SyntheticSource]:
    source = SyntheticSource()
    config = AgentConfig(collectors=(collector,), observation_domain_id=99, **settings)
    return Agent(config, source, clock=clock), source


def test_timeouts_through_the_agent_add_up():
    sink = Sink()
    clock = FakeClock(T0)
    agent, source = agent_for(
        CollectorConfig(host=sink.host, port=sink.port), clock, active_timeout=10, idle_timeout=5
    )
    k = key()
    for packets in range(1, 26):  # 25 s of traffic, one packet per second
        source.feed([obs(k, packets * 100, packets, T0, clock.ms)])
        agent.step()
        clock.advance(1)
    clock.advance(5)
    agent.step()
    records = sink.records(timeout=1)
    assert [r["flowEndReason"] for r in records] == [2, 2, 1]
    assert sum(r["packetDeltaCount"] for r in records) == 25
    assert sum(r["octetDeltaCount"] for r in records) == 2500
    assert source.released == [k]
    agent.shutdown(drain_seconds=0)
    assert source.closed
    sink.close()


def decode_stream(data: bytes) -> list[dict]:
    decoder = Decoder()  # a fresh collector: knows no templates
    return [
        r
        for m in split_ipfix(data)
        for msg in decoder.feed(m, ("127.0.0.1", 1))
        for r in msg.records
    ]


def test_tcp_collector_down_then_up_then_restarted():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    clock = FakeClock(T0)
    agent, source = agent_for(CollectorConfig(host="127.0.0.1", port=port, transport="tcp"), clock)
    exporter = agent.exporters[0]
    source.feed([obs(key(1000 + i, 80), 100, 1, T0, T0, end=EndCause.FIN) for i in range(5)])
    agent.step()  # collector down: refused, queued
    assert exporter.transport.stats.refused == 1
    assert exporter.transport.backlog_messages > 0

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    listener.settimeout(3)
    try:
        time.sleep(0.6)  # the transport's first backoff (real time, not a flow timeout)
        agent.step()
        conn, _ = listener.accept()
        records = decode_stream(read_stream(conn))
        assert sorted(r["sourceTransportPort"] for r in records) == [1000, 1001, 1002, 1003, 1004]

        conn.close()  # the collector restarts and forgets its templates
        agent.step()
        source.feed([obs(key(2000, 80), 100, 1, T0, T0, end=EndCause.FIN)])
        time.sleep(0.6)
        agent.step()
        agent.step()
        conn, _ = listener.accept()
        records = decode_stream(read_stream(conn))  # decodable: templates came first
        assert [r["sourceTransportPort"] for r in records] == [2000]
        assert exporter.transport.stats.connects == 2
        assert exporter.transport.stats.records_dropped == 0
    finally:
        agent.shutdown(drain_seconds=0.5)
        listener.close()


def test_ipfix_and_v9_streams_of_one_host_never_share_a_domain_id():
    """pmacct keys its sequence check on address + id whatever the version: one host sending IPFIX
    and v9 to one nfacctd needs two ids (seen: ~500 false sequence errors with one id)."""
    sink = Sink()
    ipfix = CollectorConfig(host=sink.host, port=sink.port, protocol="ipfix")
    v9 = CollectorConfig(host=sink.host, port=sink.port, protocol="v9")
    pinned = CollectorConfig(host=sink.host, port=sink.port, protocol="v5", observation_domain_id=7)
    agent = Agent(AgentConfig(collectors=(ipfix, v9, pinned)), SyntheticSource())
    try:
        ids = [e.session.observation_domain_id for e in agent.exporters]
    finally:
        agent.shutdown(drain_seconds=0)
    assert ids[0] == default_observation_domain_id("ipfix") == agent.observation_domain_id
    assert ids[1] == default_observation_domain_id("v9") != ids[0]
    assert ids[2] == 7
    assert all(0 < i < 1 << 31 for i in ids)
