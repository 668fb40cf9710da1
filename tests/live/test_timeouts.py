"""Long flows split by the active timeout, and a collector restarted while the agent runs.

One `flowbridge run --active-timeout 2 --idle-timeout 2 --template-refresh 2` exports IPFIX
(standard profile) to nfcapd and to an ExportWatcher, which the tests read while the agent runs
to know when the records are out. The lab joins the namespaces through the wire
namespace (NetLab(wire=True)) so a delay can stretch a transfer over several seconds; the agent
also sees those frames pass through the wire namespace, and the interface index in each record
keeps the two ends' records apart from those (tests/live/expect.py).
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebpf.observation import Direction
from tests.harness.collector_common import LARGE_SOCKET_BUFFER, Flow
from tests.harness.collectors import Nfcapd
from tests.harness.netlab import Endpoint, NetLab
from tests.harness.netlab_capture import CaptureFlow, CaptureKey
from tests.harness.netlab_proc import Exchange
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.expect import (
    Expected,
    diff_single,
    diff_split,
    expected_records,
    exported_in_full,
    five_tuple,
    records_of,
)
from tests.live.watcher import ExportWatcher

pytestmark = [pytest.mark.root, pytest.mark.collectors]

KIB = 1024
ACTIVE_TIMEOUT_S = 2
TEMPLATE_REFRESH_S = 2
# A request/response transfer: each round is at least one round trip, 2 x 40 ms through the wire.
WIRE_DELAY_MS = 40
ROUNDS = [(4 * KIB, 32 * KIB)] * 75
EXPORT_WAIT_S = 60.0  # a deadline only: the wait ends as soon as the records are out
# How late after its active timeout the agent may export a record: its loop steps every 200 ms,
# and a loaded machine delays the steps (records then cover longer periods, so fewer of them).
STEP_LAG_S = 1.0


@dataclass
class Timeouts:
    lab: NetLab
    agent: AgentProcess
    nfcapd: Nfcapd  # the collector of the moment: test_collector_restart replaces it
    watcher: ExportWatcher
    workdir: Path

    def assert_agent_alive(self) -> None:
        assert self.agent.running(), f"the agent died:\n{self.agent.log()[-3000:]}"

    def collector_losses(self) -> str:
        """What nfcapd lost, for a failure message (after it stopped): a record missing from it
        is the agent's fault only if nfcapd received every message."""
        return (f"(nfcapd: {self.nfcapd.drops} datagrams dropped by its socket, "
                f"{self.nfcapd.sequence_errors()} sequence errors)")

    def wait_exported(self, expected: list[Expected], timeout: float = EXPORT_WAIT_S
                      ) -> list[Flow]:
        """Until the watcher holds every record of each expected direction, a late packet's
        (merged_late_tail) included: the agent keeps running and nfcapd is stopped next, so a
        record still to come would be missing from it."""
        deadline = time.monotonic() + timeout
        while True:
            flows = self.watcher.flows()
            if all(exported_in_full(flows, want) for want in expected) \
                    or time.monotonic() > deadline:
                return flows
            time.sleep(0.25)


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Timeouts]:
    require_live("nfcapd", "nfdump", "tcpdump")
    workdir = tmp_path_factory.mktemp("timeouts")
    # A large socket buffer: the agent exports every flow of the host, and a burst of other
    # traffic must not overflow nfcapd into losses that are not the agent's.
    with NetLab(wire=True) as lab, Nfcapd(4, socket_buffer=LARGE_SOCKET_BUFFER) as nfcapd, \
            ExportWatcher(4) as watcher:
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{nfcapd.port}", "profile": "standard"},
            {"address": f"127.0.0.1:{watcher.port}", "profile": "standard"},
        ])
        args = ["--config", str(config), "--active-timeout", str(ACTIVE_TIMEOUT_S),
                "--idle-timeout", str(ACTIVE_TIMEOUT_S), "--template-refresh",
                str(TEMPLATE_REFRESH_S)]
        state = Timeouts(lab, AgentProcess(args, workdir), nfcapd, watcher, workdir)
        try:
            with state.agent as agent:
                agent.wait_ready()
                yield state
                assert agent.stop() == 0, agent.log()[-3000:]
                assert agent.problems() == [], "\n".join(agent.problems())
        finally:
            state.nfcapd.close()  # test_collector_restart's replacement, if it made one


def wait_last_ack_delivered(endpoint: Endpoint, timeout: float = 60.0) -> None:
    """Until no socket of `endpoint` waits in LAST-ACK: the peer's final ACK of each connection
    has crossed the delayed wire and passed the capture (which sees a frame before TCP does).
    A fixed sleep cannot know how long that takes on a loaded machine."""
    argv = [*endpoint.prefix, "ss", "-Htan", "state", "last-ack", "src", endpoint.ipv4]
    deadline = time.monotonic() + timeout
    while True:
        waiting = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        if not waiting.stdout.strip():
            return
        assert time.monotonic() < deadline, f"still in LAST-ACK:\n{waiting.stdout}"
        time.sleep(0.02)


def send_late_ack(lab: NetLab, exchange: Exchange,
                  client_capture: dict[CaptureKey, CaptureFlow]) -> None:
    """One more ACK from the client of a closed connection, right after its last packet in
    sequence space, as the duplicate ACK answering a retransmitted FIN is on a loaded machine
    (the case that made this module's tests flaky). The server's TIME_WAIT socket drops it
    without a reply. The kernel finalised the connection already: the agent reports the packet
    as a flow of its own, which leaves by its idle or active timeout (expect.merged_late_tail)."""
    flow = five_tuple(exchange)
    client_egress = [truth for key, truth in client_capture.items()
                     if flow.matches(key) and key[0] == Direction.EGRESS]
    assert len(client_egress) == 1, client_capture.keys()
    _, seq, ack, seq_len = client_egress[0].segments[-1]
    lab.bare_ack(lab.host, lab.peer, exchange.version, exchange.client.local[1],
                 exchange.server.local[1], seq=(seq + seq_len) % (1 << 32), ack=ack)


def test_active_timeout_splits_a_long_transfer(timeouts: Timeouts) -> None:
    lab = timeouts.lab
    lab.impair(delay_ms=WIRE_DELAY_MS)
    try:
        with lab.capture(lab.host, "client") as client_cap, \
                lab.capture(lab.peer, "server") as server_cap:
            started = time.monotonic()
            exchange = lab.tcp(client=lab.host, server=lab.peer, version=4, rounds=ROUNDS,
                               ending="fin-client")
            duration = time.monotonic() - started
            # The client closed first: the server holds LAST-ACK until the client's last ACK
            # arrives, after both processes are done.
            wait_last_ack_delivered(lab.peer)
    finally:
        lab.impair()
    expected = expected_records(exchange, lab.host, lab.peer, client_cap.flows(),
                                server_cap.flows())
    assert len(expected) == 4, [w.label() for w in expected]
    assert duration >= 3 * ACTIVE_TIMEOUT_S, f"the transfer took only {duration:.1f} s"
    timeouts.wait_exported(expected)
    timeouts.assert_agent_alive()
    timeouts.nfcapd.stop()
    # Each record but the last covers at least the active timeout and at most that plus the
    # agent's step lag, so a direction's span (as captured: the processes' start-up, which
    # `duration` includes, is not part of it) needs at least span / (timeout + lag) records.
    span_s = min(want.truth.last_ms - want.truth.first_ms for want in expected) / 1000
    min_records = math.ceil(span_s / (ACTIVE_TIMEOUT_S + STEP_LAG_S))
    assert min_records >= 2, f"the captured transfer spans only {span_s:.1f} s"
    problems = diff_split("nfdump", timeouts.nfcapd.flows(), expected, min_records=min_records)
    assert not problems, "\n".join([*problems, timeouts.collector_losses()])


def test_restarted_collector_decodes_within_the_refresh_interval(timeouts: Timeouts) -> None:
    """nfcapd forgets templates when it restarts; data before the next template refresh is
    dropped (collectors.md 1.1 rows 5-6). Connections run back to back after the restart: those
    whose records leave after one refresh interval must all be decoded exactly, and the first
    decoded one must have left within two intervals of the restart.

    The last connection also gets a packet after its close (send_late_ack): its record leaves
    last, by the agent's timeout, and the connection must still add up to the capture."""
    lab = timeouts.lab
    old = timeouts.nfcapd
    old.stop()
    time.sleep(0.5)  # the agent's exports meanwhile go nowhere (ICMP unreachable, not fatal)
    timeouts.nfcapd = new = Nfcapd(4, port=old.port, socket_buffer=LARGE_SOCKET_BUFFER)
    old.close()
    new.start()
    restarted = time.monotonic()
    connections: list[tuple[float, Exchange]] = []
    with lab.capture(lab.host, "client") as client_cap, \
            lab.capture(lab.peer, "server") as server_cap:
        while time.monotonic() - restarted < 3 * TEMPLATE_REFRESH_S:
            exchange = lab.tcp(client=lab.host, server=lab.peer, version=4,
                               rounds=[(3000, 7000)], ending="fin-server")
            connections.append((time.monotonic() - restarted, exchange))
            time.sleep(0.2)
        # The server closed first: the client holds LAST-ACK until the server's last ACK.
        wait_last_ack_delivered(lab.host)
    with lab.capture(lab.host, "late-client") as late_client_cap, \
            lab.capture(lab.peer, "late-server") as late_server_cap:
        send_late_ack(lab, connections[-1][1], client_cap.flows())
    client_flows = late_client_cap.flows(after=client_cap)
    server_flows = late_server_cap.flows(after=server_cap)
    expected = [expected_records(exchange, lab.host, lab.peer, client_flows, server_flows)
                for _, exchange in connections]
    # Every connection's records, not only the last one's: a late packet of an earlier
    # connection leaves by the 2 s timeout, after the last connection's end-of-flow records.
    timeouts.wait_exported([want for wants in expected for want in wants])
    timeouts.assert_agent_alive()
    time.sleep(0.5)  # the watcher and nfcapd receive the same messages; let nfcapd read them
    new.stop()
    flows = new.flows()
    decoded = [not diff_single("nfdump", flows, want) for want in expected]
    ended_at = [at for at, _ in connections]
    assert any(decoded), f"no connection decoded after the restart ({len(connections)} ran)"
    first = decoded.index(True)
    assert ended_at[first] <= 2 * TEMPLATE_REFRESH_S, (
        f"first decoded connection ended {ended_at[first]:.1f} s after the restart")
    problems = []
    for index in range(first, len(expected)):
        if ended_at[index] >= TEMPLATE_REFRESH_S or index == first:
            problems += diff_single("nfdump", flows, expected[index])
    assert not problems, "\n".join([*problems, timeouts.collector_losses()])
    late = [w for w in expected[-1] if (w.endpoint, w.direction) in (
        (lab.host, Direction.EGRESS), (lab.peer, Direction.INGRESS))]
    # The case this test must cover: the late ACK's record left after the connection's.
    counts = [len(records_of(flows, want)) for want in late]
    assert len(counts) == 2 and min(counts) >= 2, (
        f"the late ACK is no record of its own ({counts} records): if the agent now folds late "
        "packets into the connection's record, this check and merged_late_tail can go")
    assert len([d for d, at in zip(decoded, ended_at, strict=True) if at >= TEMPLATE_REFRESH_S
                ]) >= 3, "too few connections after one refresh interval to judge"
    assert (new.sequence_errors(), new.bad_packets()) == (0, 0), new.log()[-2000:]
