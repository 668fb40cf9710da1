"""The live half of the matrix: ONE `flowbridge run` exports to every station at once while one
traffic script runs in a network lab; a second agent run then checks an agent restart.

Stations (tests/compat/collector_set.py), each nfcapd + a tshark capture of its port + nfacctd:
  one per export format (FORMATS)          from the start
  "mixed": IPFIX and v9 (standard)          from the start: one collector, two protocols
  "late": IPFIX to nfcapd, v9 to nfacctd     started only after the first traffic
  "restarted": the same                     nfcapd and nfacctd restarted after the first traffic
  "agent-restart": the same                 the only station the second agent run exports to
Late and restarted stations have a template refresh of TEMPLATE_REFRESH_S: the traffic judged
there starts more than one interval after they came up.

Traffic, all between two namespaces joined by a veth pair, captured on both ends (ground truth):
TCP closed and reset, IPv4 and IPv6; UDP and ICMP echo in both families; one paced connection
longer than several active timeouts; then MANY_CONNECTIONS short connections from one process.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ebpf.observation import Direction
from tests.compat.bulk_events import BULK_SCRIPT, read_event
from tests.compat.collector_set import Decoded, Station, parallel
from tests.compat.matrix import FORMATS
from tests.harness.netlab import Endpoint, NetLab
from tests.harness.netlab_capture import CaptureFlow, CaptureKey
from tests.harness.netlab_proc import ProcReport
from tests.live.agent_process import AgentProcess, write_config
from tests.live.expect import Expected
from tests.live.watcher import ExportWatcher

ACTIVE_TIMEOUT_S = 2
TEMPLATE_REFRESH_S = 2
OPTIONS_INTERVAL_S = 1  # options messages between data messages: the sequence checks see them
MANY_CONNECTIONS = 2000
MANY_CONNECTIONS_GAP_MS = 1.0  # ~1000 connections/s: a busy host, not a flood of 30 collectors
LONG_FLOW_CHUNKS, LONG_FLOW_INTERVAL_MS = 36, 200  # ~7 s: more than three active timeouts
EXPORT_WAIT_S = 30.0
STANDARD_PAIR = [("ipfix", "standard"), ("v9", "standard")]


@dataclass
class Traffic:
    """Expected records by case tag ("tcp", "reset", "udp", "icmp", "long", "bulk", "restart"),
    each derived from the captures."""

    expected: dict[str, list[Expected]] = field(default_factory=dict)


@dataclass
class LiveRun:
    traffic: Traffic
    decoded: dict[str, dict[str, Decoded]]  # station name -> collector -> what it showed
    agent_problems: list[str]
    late_started_s: float = 0.0  # seconds before the judged traffic that late stations started


class _Bulk:
    """bulk_traffic.py server and client in the lab's namespaces."""

    def __init__(self, lab: NetLab, version: int, count: int, request: int, response: int,
                 chunks: int = 1, interval_ms: float = 0.0, gap_ms: float = 0.0):
        tag = secrets.token_hex(2)
        address = lab.peer.addr(version)
        common = ["--address", address, "--count", str(count), "--request", str(request),
                  "--response", str(response)]
        self.server = subprocess.Popen(
            [*lab.peer.prefix, sys.executable, str(BULK_SCRIPT), "server", "--name",
             f"fbbsrv-{tag}", *common], stdout=subprocess.PIPE, text=True)
        ready = read_event(self.server, "ready")
        self.server_port = ready["port"]
        self.client = subprocess.Popen(
            [*lab.host.prefix, sys.executable, str(BULK_SCRIPT), "client", "--name",
             f"fbbcli-{tag}", "--port", str(ready["port"]), "--chunks", str(chunks),
             "--interval-ms", str(interval_ms), "--gap-ms", str(gap_ms), *common],
            stdout=subprocess.PIPE, text=True)
        self.client_done = read_event(self.client, "done")
        self.server_done = read_event(self.server, "done")
        self.client.wait(10)
        self.server.wait(10)

    def reports(self) -> tuple[ProcReport, ProcReport]:
        def report(event: dict) -> ProcReport:
            return ProcReport(event["pid"], event["comm"], ("", 0), ("", 0), 0, 0, "done")

        return report(self.client_done), report(self.server_done)


def _local_port(key: CaptureKey) -> int:
    return key[5] if key[0] == Direction.EGRESS else key[6]


def _expected(endpoint: Endpoint, flows: dict[CaptureKey, CaptureFlow],
              processes: dict[tuple[int, int], ProcReport], icmp: ProcReport) -> list[Expected]:
    """One expected record per captured direction; the process owning the local port."""
    out = []
    for key, truth in flows.items():
        protocol = key[2]
        process = icmp if protocol in (1, 58) else processes[(protocol, _local_port(key))]
        out.append(Expected(endpoint, key, truth, process))
    return out


class _Recorder:
    """Runs traffic under captures on both ends and turns it into tagged expectations."""

    def __init__(self, lab: NetLab):
        self.lab = lab
        self.traffic = Traffic()

    def run(self, tag: str, action) -> None:  # type: ignore[no-untyped-def]
        lab = self.lab
        processes: dict[tuple[int, int], ProcReport] = {}
        with lab.capture(lab.host, f"{tag}-host") as host_cap, \
                lab.capture(lab.peer, f"{tag}-peer") as peer_cap:
            action(processes)
        for endpoint, capture in ((lab.host, host_cap), (lab.peer, peer_cap)):
            icmp = ProcReport(0, "", ("", 0), ("", 0), 0, 0, "kernel")
            self.traffic.expected.setdefault(tag, []).extend(
                _expected(endpoint, capture.flows(), processes, icmp))


def _note_exchange(processes: dict[tuple[int, int], ProcReport], exchange, protocol: int
                   ) -> None:  # type: ignore[no-untyped-def]
    for report in (exchange.client, exchange.server):
        processes[(protocol, report.local[1])] = report


def _tcp_and_reset(lab: NetLab):  # type: ignore[no-untyped-def]
    def closed(processes: dict) -> None:
        for version, ending, rounds in ((4, "fin-client", [(300_000, 50_000)]),
                                        (6, "fin-server", [(20_000, 100_000)])):
            _note_exchange(processes, lab.tcp(client=lab.host, server=lab.peer, version=version,
                                              rounds=rounds, ending=ending), 6)

    def reset(processes: dict) -> None:
        for version, ending in ((4, "rst-client"), (6, "rst-server")):
            _note_exchange(processes, lab.tcp(client=lab.host, server=lab.peer, version=version,
                                              rounds=[(5_000, 7_000)], ending=ending), 6)

    return closed, reset


def _datagrams(lab: NetLab):  # type: ignore[no-untyped-def]
    def udp(processes: dict) -> None:
        for version, sizes in ((4, [100, 1000, 1400]), (6, [200, 1200])):
            _note_exchange(processes, lab.udp(client=lab.host, server=lab.peer, version=version,
                                              sizes=sizes, echo=True), 17)

    def icmp(processes: dict) -> None:
        for version, size in ((4, 100), (6, 200)):
            lab.ping(lab.host, lab.peer, version=version, count=3, size=size)

    return udp, icmp


def _bulk(lab: NetLab, count: int, chunks: int = 1, interval_ms: float = 0.0,
          request: int = 100, response: int = 300, gap_ms: float = 0.0
          ):  # type: ignore[no-untyped-def]
    def action(processes: dict) -> None:
        bulk = _Bulk(lab, 4, count, request, response, chunks, interval_ms, gap_ms)
        client, server = bulk.reports()
        for port in bulk.client_done["ports"]:
            processes[(6, port)] = client
        processes[(6, bulk.server_port)] = server

    return action


def wait_exported(watcher: ExportWatcher, expected: list[Expected], timeout: float) -> None:
    """Until the watcher (the agent's own decoder) holds a record of every expected direction
    that has ended; it says when, never what (the real collectors judge that)."""
    want = {(w.key[3], w.key[4], w.key[5], w.key[6], w.key[2]) for w in expected}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = set()
        for flow in watcher.flows():
            if flow.get("flowEndReason") in (1, 3):
                src = flow.get("sourceIPv4Address", flow.get("sourceIPv6Address"))
                dst = flow.get("destinationIPv4Address", flow.get("destinationIPv6Address"))
                seen.add((src, dst, flow.get("sourceTransportPort"),
                          flow.get("destinationTransportPort"), flow.get("protocolIdentifier")))
        if want <= seen:
            return
        time.sleep(0.25)


def run_live(workdir: Path) -> LiveRun:
    """Everything the live matrix needs, in one agent run (plus a short second one)."""
    stations = {f"{p}/{f}": Station(f"{p}/{f}", [(p, f)]) for p, f in FORMATS}
    stations["mixed"] = Station("mixed", STANDARD_PAIR)
    # nfacctd keys sequence numbers on address + domain, not version: these stations send it v9
    # only, so that they judge their own case, not the "mixed" one.
    stations["late"] = Station("late", STANDARD_PAIR, TEMPLATE_REFRESH_S, split=True)
    stations["restarted"] = Station("restarted", STANDARD_PAIR, TEMPLATE_REFRESH_S, split=True)
    stations["agent-restart"] = Station("agent-restart", STANDARD_PAIR, split=True)
    problems: list[str] = []
    for name in ("agent1", "agent2"):
        (workdir / name).mkdir(exist_ok=True)
    try:
        with NetLab() as lab, ExportWatcher(4) as watcher:
            parallel(s for name, st in stations.items() if name != "late" for s in st.starters())
            watch = {"address": f"127.0.0.1:{watcher.port}", "protocol": "ipfix",
                     "profile": "standard"}
            entries = [e for st in stations.values() for e in st.config_entries()]
            config = write_config(workdir / "compat.toml", [*entries, watch],
                                  options_interval=OPTIONS_INTERVAL_S,
                                  active_timeout=ACTIVE_TIMEOUT_S, idle_timeout=ACTIVE_TIMEOUT_S)
            recorder = _Recorder(lab)
            closed, reset = _tcp_and_reset(lab)
            udp, icmp = _datagrams(lab)
            with AgentProcess(["--config", str(config)], workdir / "agent1") as agent:
                agent.wait_ready()
                for tag, action in (("tcp", closed), ("reset", reset), ("udp", udp),
                                    ("icmp", icmp)):
                    recorder.run(tag, action)
                late_at = time.monotonic()
                parallel([*stations["late"].starters(), *stations["restarted"].restarters()])
                recorder.run("long", _bulk(lab, 1, LONG_FLOW_CHUNKS, LONG_FLOW_INTERVAL_MS,
                                           request=LONG_FLOW_CHUNKS * 1000, response=0))
                late_started_s = time.monotonic() - late_at
                recorder.run("bulk", _bulk(lab, MANY_CONNECTIONS, gap_ms=MANY_CONNECTIONS_GAP_MS))
                everything = [w for ws in recorder.traffic.expected.values() for w in ws]
                wait_exported(watcher, everything, EXPORT_WAIT_S)
                if agent.stop() != 0:
                    problems.append(f"agent 1 exit status {agent.returncode}")
                problems += agent.problems()
            config2 = write_config(workdir / "compat2.toml",
                                   [*stations["agent-restart"].config_entries(), watch],
                                   options_interval=OPTIONS_INTERVAL_S,
                                   active_timeout=ACTIVE_TIMEOUT_S, idle_timeout=ACTIVE_TIMEOUT_S)
            with AgentProcess(["--config", str(config2)], workdir / "agent2") as agent:
                agent.wait_ready()
                recorder.run("restart", _bulk(lab, 20, request=4000, response=8000))
                wait_exported(watcher, recorder.traffic.expected["restart"], EXPORT_WAIT_S)
                if agent.stop() != 0:
                    problems.append(f"agent 2 exit status {agent.returncode}")
                problems += agent.problems()
            parallel(s for st in stations.values() for s in st.stoppers())
            decoded = dict(zip(stations, parallel(st.decode for st in stations.values()),
                               strict=True))
            return LiveRun(recorder.traffic, decoded, problems, late_started_s)
    finally:
        for station in stations.values():
            station.close()
