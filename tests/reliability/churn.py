"""Connection churn in a network lab, and the check that every connection reached a collector.

One `tests/compat/bulk_traffic.py` server (peer namespace) and client (host namespace) make
`count` TCP connections one after the other; the client reports its local ports when done. A
connection is *exported* when a collector holds all four of its records: each direction, seen
leaving one namespace (egress) and entering the other (ingress).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterable

from ebpf.observation import Direction
from tests.compat.bulk_events import BULK_SCRIPT, read_event
from tests.harness.collector_common import Flow
from tests.harness.netlab import NetLab

TCP = 6


class Churn:
    """Started on construction (non-blocking); `wait()` returns the client ports."""

    def __init__(self, lab: NetLab, count: int, *, request: int = 200, response: int = 600,
                 gap_ms: float = 0.0, chunks: int = 1, interval_ms: float = 0.0,
                 version: int = 4, timeout_s: float = 60.0):
        tag = secrets.token_hex(2)
        self.lab, self.version, self.count = lab, version, count
        self.client_addr, self.server_addr = lab.host.addr(version), lab.peer.addr(version)
        common = ["--address", self.server_addr, "--count", str(count), "--request",
                  str(request), "--response", str(response), "--timeout", str(timeout_s)]
        self._server = subprocess.Popen(
            [*lab.peer.prefix, sys.executable, str(BULK_SCRIPT), "server", "--name",
             f"fbfsrv-{tag}", *common], stdout=subprocess.PIPE, text=True)
        self.server_port = int(read_event(self._server, "ready")["port"])
        self._client = subprocess.Popen(
            [*lab.host.prefix, sys.executable, str(BULK_SCRIPT), "client", "--name",
             f"fbfcli-{tag}", "--port", str(self.server_port), "--chunks", str(chunks),
             "--interval-ms", str(interval_ms), "--gap-ms", str(gap_ms), *common],
            stdout=subprocess.PIPE, text=True)
        self.ports: list[int] = []

    def running(self) -> bool:
        return self._client.poll() is None

    def wait(self, timeout_s: float = 300.0) -> list[int]:
        if not self.ports:
            self.ports = list(read_event(self._client, "done")["ports"])
            read_event(self._server, "done")
            self._client.wait(timeout_s)
            self._server.wait(timeout_s)
        return self.ports

    def kill(self) -> None:
        for process in (self._client, self._server):
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def keys(self) -> dict[int, list[tuple]]:
        """Client port -> the four record keys of that connection."""
        # Addresses packed, as the harness's collectors and the project's decoder give them.
        c, s = self.lab.host.packed(self.version), self.lab.peer.packed(self.version)
        sp = self.server_port
        egress, ingress = int(Direction.EGRESS), int(Direction.INGRESS)
        return {port: [(c, s, port, sp, egress), (c, s, port, sp, ingress),
                       (s, c, sp, port, egress), (s, c, sp, port, ingress)]
                for port in self.wait()}


def record_key(flow: Flow) -> tuple:
    src = flow.get("sourceIPv4Address", flow.get("sourceIPv6Address"))
    dst = flow.get("destinationIPv4Address", flow.get("destinationIPv6Address"))
    return (src, dst, flow.get("sourceTransportPort"), flow.get("destinationTransportPort"),
            flow.get("flowDirection"))


def tcp_keys(flows: Iterable[Flow]) -> set[tuple]:
    return {record_key(f) for f in flows if f.get("protocolIdentifier") == TCP}


def missing_connections(churns: Iterable[Churn], flows: Iterable[Flow]) -> list[str]:
    """One line per connection with a record missing at this collector (empty: all there)."""
    seen = tcp_keys(flows)
    problems = []
    for churn in churns:
        for port, keys in churn.keys().items():
            absent = [k for k in keys if k not in seen]
            if absent:
                problems.append(f"{churn.client_addr}:{port} > {churn.server_addr}:"
                                f"{churn.server_port}: {len(absent)} of 4 records missing")
    return problems


def exported(churns: Iterable[Churn], flows: Iterable[Flow]) -> bool:
    return not missing_connections(churns, flows)
