"""A connection opened before the collector attaches is picked up and counted from then on: its
first round of traffic happens before the collector exists, the second after. The captures start
after the collector attached, so they hold exactly what the collector must count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ebpf.observation import EndCause
from tests.ebpf.conftest import open_collector
from tests.harness.netlab import NetLab
from tests.harness.netlab_flows import (
    FiveTuple,
    FlowBook,
    complete,
    describe,
    diff_all,
    expected_flows,
)
from tests.harness.netlab_proc import TcpSession

pytestmark = pytest.mark.root

BEFORE = (200_000, 50_000)  # (up, down) before the collector attaches
AFTER = (30_000, 700_000)


@pytest.fixture(scope="module")
def held(lab: NetLab) -> TcpSession:
    return lab.start_tcp(client=lab.host, server=lab.peer, version=4, rounds=[BEFORE, AFTER],
                         ending="fin-server", client_name="fbold-client",
                         server_name="fbold-server")


@pytest.fixture(scope="module")
def collector(lab: NetLab, held: TcpSession) -> Iterator[object]:
    source = open_collector()
    try:
        yield source
    finally:
        source.close()


def test_preexisting_connection_counted_from_attach(needs_root, lab: NetLab, held: TcpSession,
                                                    book: FlowBook):
    with lab.capture(lab.host, "client") as host_cap, lab.capture(lab.peer, "server") as peer_cap:
        exchange = held.resume()
    assert (exchange.client.sent, exchange.client.received) == (BEFORE[0] + AFTER[0],
                                                                BEFORE[1] + AFTER[1])
    c, s = exchange.client, exchange.server
    flow = FiveTuple(4, 6, c.local[0], c.local[1], s.local[0], s.local[1])
    truth = {**expected_flows(host_cap.flows(), lab.host.netns_inode, flow),
             **expected_flows(peer_cap.flows(), lab.peer.netns_inode, flow)}
    assert len(truth) == 4
    assert all(f.syn == 0 for f in truth.values()), "the handshake predates the capture"
    observed = book.wait(complete(truth, ended=True), timeout_s=8.0)
    observed = {k: observed[k] for k in truth if k in observed}
    problems = diff_all(observed, truth)
    for key, observation in observed.items():
        report = c if key.netns == lab.host.netns_inode else s
        process = observation.process
        if process is None or (process.pid, process.comm) != (report.pid, report.comm):
            problems.append(f"{describe(key)}: process {process} != {report.pid} "
                            f"{report.comm!r}")
        if observation.end != EndCause.FIN:
            problems.append(f"{describe(key)}: end {observation.end.name} != FIN")
    assert not problems, "\n".join(problems)
