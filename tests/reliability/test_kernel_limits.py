"""The kernel side's bounds, hit for real by a `flowbridge run`: nothing beyond them may vanish
without a count an operator (metrics) and a collector (exporter statistics) can see.

Flow map full: the agent runs with `kernel_max_flows = 16` while one process in the lab sends a
datagram to each of 300 ports at once. It starts while the lab holds more TCP connections than
its socket maps take (4096 entries at that setting): it runs, and says how many did not fit.
Packets that found no room are counted; the count reaches
the metrics and the exporter statistics (ignoredPacketTotalCount, IE 164, in observation domain 0),
and every lab packet is either in an exported record or in that count.

Ring buffer overflow: the agent is stopped (SIGSTOP, as a starved process would be) while the
lab releases more sockets than the 16 MiB ring buffer holds events, then makes TCP connections
whose end events find the ring full. After SIGCONT the losses are counted, and those connections
are still exported: their flows stay in the kernel map and end by the idle timeout instead.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.collector_common import Flow
from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.watcher import ExportWatcher
from tests.reliability.churn import Churn, exported, missing_connections, tcp_keys
from tests.reliability.probes import free_tcp_port, scrape, wait_for

pytestmark = [pytest.mark.root]

LOAD_SCRIPT = Path(__file__).with_name("kernel_load.py")
KERNEL_MAX_FLOWS = 16
DATAGRAM_PORTS = (30000, 300)  # first port, how many
# flows.bpf.c's events: 112 bytes + 8 of ring buffer header; 16 MiB hold ~140k of them.
RELEASED_SOCKETS = 180_000
LATE_CONNECTIONS = 30
IDLE_TIMEOUT_S = 3
HELD_CONNECTIONS = 2100  # 4200 sockets: more than the 4096 socket-map entries of a small agent
SOCKET_MAP_ENTRIES = 4096
EXPORT_WAIT_S = 60.0


def run_load(lab: NetLab, *args: str) -> dict:
    done = subprocess.run([*lab.host.prefix, sys.executable, str(LOAD_SCRIPT), *args],
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class LimitRun:
    metrics: dict[str, float] = field(default_factory=dict)
    options: list[dict] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    churn: Churn | None = None
    host: bytes = b""
    peer: bytes = b""
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""


def _finish(run: LimitRun, agent: AgentProcess, metrics_port: int) -> None:
    run.metrics = scrape(metrics_port)
    run.agent_status = agent.stop()
    run.agent_problems = agent.problems()
    run.agent_log = agent.log()


@contextlib.contextmanager
def held_connections(lab: NetLab, count: int) -> Iterator[None]:
    """`count` idle TCP connections open in the lab's host namespace meanwhile."""
    holder = subprocess.Popen([*lab.host.prefix, sys.executable, str(LOAD_SCRIPT), "hold",
                               str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line:
            raise RuntimeError(f"kernel_load.py hold exited {holder.wait(10)}")
        assert json.loads(line)["count"] == count
        yield
    finally:
        holder.communicate(timeout=60)  # stdin closed: the holder closes them and exits


# -- flow map full -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def map_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitRun]:
    require_live()
    workdir = tmp_path_factory.mktemp("map-full")
    run = LimitRun()
    metrics_port = free_tcp_port()
    with NetLab() as lab, ExportWatcher(4) as watcher:
        run.host, run.peer = lab.host.packed(4), lab.peer.packed(4)
        config = write_config(workdir / "flowbridge.toml",
                              [{"address": f"127.0.0.1:{watcher.port}"}],
                              kernel_max_flows=KERNEL_MAX_FLOWS, idle_timeout=IDLE_TIMEOUT_S,
                              options_interval=1, metrics=f"127.0.0.1:{metrics_port}")
        with held_connections(lab, HELD_CONNECTIONS), \
                AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            first, count = DATAGRAM_PORTS
            run_load(lab, "datagrams", lab.peer.addr(4), str(first), str(count))
            # Until every lab flow idled out and the statistics after that went out.
            time.sleep(IDLE_TIMEOUT_S + 2.5)
            _finish(run, agent, metrics_port)
        run.flows = watcher.flows()
        run.options = watcher.options()
        yield run


def _lab_datagram_packets(run: LimitRun) -> int:
    first, count = DATAGRAM_PORTS
    return sum(int(f.get("packetDeltaCount", 0)) for f in run.flows  # type: ignore[call-overload]
               if f.get("protocolIdentifier") == 17 and f.get("sourceIPv4Address") == run.host
               and first <= int(f.get("destinationTransportPort", 0)) < first + count)  # type: ignore[call-overload]


def test_map_full_agent_exits_cleanly(map_full: LimitRun) -> None:
    assert map_full.agent_status == 0, map_full.agent_log[-3000:]
    assert map_full.agent_problems == [], "\n".join(map_full.agent_problems)
    assert map_full.metrics["flowbridge_kernel_map_capacity"] == KERNEL_MAX_FLOWS


def test_existing_sockets_beyond_the_socket_maps_are_counted(map_full: LimitRun) -> None:
    unwatched = map_full.metrics['flowbridge_kernel{name="existing_sockets_unwatched"}']
    held_sockets = 2 * HELD_CONNECTIONS
    assert held_sockets - SOCKET_MAP_ENTRIES <= unwatched <= held_sockets, unwatched
    assert "did not fit the kernel's socket maps" in map_full.agent_log


def test_map_full_drops_are_counted_in_the_metrics(map_full: LimitRun) -> None:
    """The lab sent 300 datagrams (each seen leaving the host and entering the peer) into a map
    of 16: most found no room. Whatever is not in a record is in the count."""
    sent = 2 * DATAGRAM_PORTS[1]
    exported_packets = _lab_datagram_packets(map_full)
    drops = map_full.metrics["flowbridge_kernel_map_full_drops_total"]
    assert exported_packets < DATAGRAM_PORTS[1], "the map never filled: the test proves nothing"
    assert exported_packets + drops >= sent, (
        f"{sent} lab packets, {exported_packets} exported, only {drops:g} counted as not tracked")


def test_map_full_drops_reach_the_collector_as_exporter_statistics(map_full: LimitRun) -> None:
    stats = [o for o in map_full.options if "ignoredPacketTotalCount" in o]
    assert stats, "no exporter statistics with ignoredPacketTotalCount"
    last = max(o["ignoredPacketTotalCount"] for o in stats)
    lost = 2 * DATAGRAM_PORTS[1] - _lab_datagram_packets(map_full)
    assert last >= lost, f"collector told {last} packets ignored, {lost} lab packets unaccounted"
    assert last <= map_full.metrics["flowbridge_kernel_map_full_drops_total"]


# -- ring buffer overflow ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ring_overflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitRun]:
    require_live()
    workdir = tmp_path_factory.mktemp("ring-overflow")
    run = LimitRun()
    metrics_port = free_tcp_port()
    # Judged by the project's decoder on a large socket buffer: after SIGCONT the agent exports
    # everything the host did meanwhile in one burst, more than nfcapd's socket takes here.
    with NetLab() as lab, ExportWatcher(4) as watcher:
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{watcher.port}"},
        ], idle_timeout=IDLE_TIMEOUT_S, metrics=f"127.0.0.1:{metrics_port}")
        with AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            assert agent.process is not None
            agent.process.send_signal(signal.SIGSTOP)
            try:
                run_load(lab, "sockets", str(RELEASED_SOCKETS))
                run.churn = Churn(lab, LATE_CONNECTIONS)
                run.churn.wait()
            finally:
                agent.process.send_signal(signal.SIGCONT)
            churn = run.churn
            with contextlib.suppress(AssertionError):  # judged by the test, with details
                wait_for(lambda: exported([churn], watcher.flows()), EXPORT_WAIT_S,
                         "the connections whose end events were lost")
            _finish(run, agent, metrics_port)
        run.flows = watcher.flows()
        yield run


def test_ring_overflow_agent_exits_cleanly(ring_overflow: LimitRun) -> None:
    assert ring_overflow.agent_status == 0, ring_overflow.agent_log[-3000:]
    assert ring_overflow.agent_problems == [], "\n".join(ring_overflow.agent_problems)


def test_ring_overflow_is_counted(ring_overflow: LimitRun) -> None:
    lost = ring_overflow.metrics["flowbridge_kernel_events_lost_total"]
    assert lost > 0, "the ring buffer never overflowed: the test proves nothing"


def test_connections_whose_end_was_lost_are_exported_anyway(ring_overflow: LimitRun) -> None:
    """Their end events were lost: the flows stayed in the kernel map and ended by the idle
    timeout (flowEndReason 1), counts intact (one record per direction and side)."""
    assert ring_overflow.churn is not None
    problems = missing_connections([ring_overflow.churn], ring_overflow.flows)
    assert not problems, "\n".join(problems[:20])
    ours = {k for keys in ring_overflow.churn.keys().values() for k in keys}
    records = [f for f in ring_overflow.flows if f.get("protocolIdentifier") == 6
               and tcp_keys([f]) <= ours]
    reasons = sorted({f.get("flowEndReason") for f in records})
    assert 1 in reasons, f"end reasons {reasons}: no connection lost its end event"
