"""A TCP collector that comes up after records were queued for it: the templates the agent sends
first on the new connection must not make the collector see a sequence number run backwards.

Found by tests/reliability/test_tcp_collector_faults.py: the templates carried the session's
current sequence number, the queued messages the older numbers they were encoded with, so every
(re)connect with a backlog cost one sequence error per domain at the collector. In process here
(synthetic source, real loopback TCP) for IPFIX; NetFlow v9, which counts messages and has no
length field to frame a TCP stream by, on hand-made headers.
"""

from __future__ import annotations

import socket
import struct
import time

from bridge.agent import Agent
from bridge.config import AgentConfig, CollectorConfig
from bridge.messages import numbered_before
from bridge.synthetic import SyntheticSource
from ebpf.observation import EndCause
from ipfix.decoder import Decoder
from tests.agent.helpers import T0, FakeClock, key, obs, read_stream, split_ipfix
from tests.harness.agent_cli import free_port


def test_sequence_runs_on_across_the_templates_of_a_new_connection() -> None:
    protocol = "ipfix"
    port = free_port()
    clock = FakeClock(T0)
    collector = CollectorConfig(host="127.0.0.1", port=port, transport="tcp", protocol=protocol)
    agent = Agent(AgentConfig(collectors=(collector,), observation_domain_id=5),
                  SyntheticSource(), clock=clock)
    source = agent.source
    listener = socket.socket()
    try:
        for batch in range(3):  # the collector is down: three steps of records queue up
            source.feed([obs(key(1000 + 10 * batch + i, 80), 100, 1, T0, T0, end=EndCause.FIN)  # type: ignore[attr-defined]
                         for i in range(5)])
            agent.step(poll_ms=0)
            clock.advance(1)
        assert agent.exporters[0].transport.backlog_messages > 0
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        listener.settimeout(5)
        time.sleep(4.0)  # past the transport's backoff (0.5, 1, 2 s: real time)
        agent.step(poll_ms=0)
        conn, _ = listener.accept()
        with conn:
            agent.step(poll_ms=0)
            stream = read_stream(conn, quiet=0.5)
    finally:
        agent.shutdown(drain_seconds=0)
        listener.close()
    decoder = Decoder()  # a fresh collector: templates must come first
    expected: dict[int, int] = {}
    records = 0
    problems = []
    for message in split_ipfix(stream):
        [decoded] = decoder.feed(message, ("127.0.0.1", 1))
        assert decoded.unknown_template_sets == 0
        want = expected.get(decoded.domain_id)
        if want is not None and decoded.sequence != want:
            problems.append(f"domain {decoded.domain_id}: sequence {decoded.sequence}, "
                            f"want {want}")
        counted = len(decoded.records) + len(decoded.options_records)
        expected[decoded.domain_id] = (decoded.sequence + counted) % (1 << 32)
        records += len(decoded.records)
    assert records == 15
    assert not problems, "\n".join(problems)


def _v9(sequence: int, source_id: int, set_id: int) -> bytes:
    header = struct.pack(">HHIIII", 9, 1, 0, 0, sequence, source_id)
    return header + struct.pack(">HH", set_id, 4)


def test_v9_templates_take_the_numbers_just_before_the_waiting_messages() -> None:
    preamble = [_v9(90, 7, 0), _v9(91, 7, 1), _v9(50, 8, 0)]  # two for source 7, one for 8
    waiting = [_v9(40, 7, 256), _v9(41, 7, 256)]  # nothing waits for source 8
    renumbered = numbered_before("v9", preamble, waiting)
    sequences = [struct.unpack_from(">I", m, 12)[0] for m in renumbered]
    assert sequences == [38, 39, 50]
    assert [m[16:] for m in renumbered] == [m[16:] for m in preamble]
