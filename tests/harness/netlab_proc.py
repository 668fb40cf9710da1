"""Traffic processes of the lab: the test side of netlab_traffic.py's JSON-lines protocol, and ping.

Every process runs inside an endpoint's namespace under a distinctive `comm` and reports its pid,
so process attribution can be checked; every byte count it reports is what it really sent or
received at the socket layer.
"""

from __future__ import annotations

import queue
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.harness.netlab import Endpoint


class TrafficError(RuntimeError):
    """A traffic process failed or did not report in time."""


@dataclass(frozen=True)
class ProcReport:
    pid: int
    comm: str
    local: tuple[str, int]
    remote: tuple[str, int]
    sent: int  # bytes (TCP) or datagrams' payload bytes (UDP)
    received: int
    result: str  # TCP: eof / closed-first / reset-sent / reset-received; UDP: done
    tcp_info: dict[str, int] = field(default_factory=dict)  # TCP_INFO just before the ending

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ProcReport:
        sent = event.get("sent", sum(event.get("sent_sizes", [])))
        received = event.get("received", sum(event.get("received_sizes", [])))
        return cls(event["pid"], event["comm"], tuple(event["local"]), tuple(event["remote"]),
                   sent, received, event.get("result", "done"), event.get("tcp_info", {}))


@dataclass(frozen=True)
class Exchange:
    """Both ends of one TCP connection or UDP exchange."""

    version: int
    client: ProcReport
    server: ProcReport


@dataclass(frozen=True)
class PingReport:
    pid: int
    transmitted: int
    received: int
    size: int


class TrafficProcess:
    """One netlab_traffic.py process; `expect(event)` waits for its next JSON line of that kind."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, event: str, timeout_s: float = 30.0) -> dict[str, Any]:
        import json

        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TrafficError(f"no '{event}' from {self.argv[-1]} in {timeout_s}s") from None
        if line is None:
            self.popen.wait(timeout=5)
            stderr = self.popen.stderr.read() if self.popen.stderr else ""
            raise TrafficError(f"{' '.join(self.argv)} exited {self.popen.returncode} before "
                               f"'{event}': {stderr.strip()}")
        message = json.loads(line)
        if message["event"] != event:
            raise TrafficError(f"expected '{event}', got {message}")
        return message

    def send_line(self, text: str = "") -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class TcpSession:
    """A TCP connection held open after its first round (for pre-existing-flow tests)."""

    def __init__(self, version: int, client: TrafficProcess, server: TrafficProcess,
                 holding: dict[str, Any]):
        self.version, self._client, self._server = version, client, server
        self.client_pid, self.server_pid = holding["pid"], None
        self.local = tuple(holding["local"])
        self.remote = tuple(holding["remote"])

    def resume(self, timeout_s: float = 30.0) -> Exchange:
        """Run the remaining rounds and the ending; returns both reports."""
        self._client.send_line("go")
        client = ProcReport.from_event(self._client.expect("done", timeout_s))
        server = ProcReport.from_event(self._server.expect("done", timeout_s))
        self._client.wait()
        self._server.wait()
        return Exchange(self.version, client, server)


SEND_BARE_ACK = """
import sys
from scapy.all import IP, TCP, IPv6, send
version, src, dst, sport, dport, seq, ack = sys.argv[1:]
ip = (IP if version == "4" else IPv6)(src=src, dst=dst)
send(ip / TCP(sport=int(sport), dport=int(dport), flags="A", seq=int(seq), ack=int(ack)),
     verbose=False)
"""


def _ip_packets_received(endpoint: Endpoint, version: int) -> int:
    """The namespace's IP InReceives: every packet its IP layer took in (after the capture and
    the TC ingress hook saw it)."""
    name, counter = ("snmp", "Ip:") if version == 4 else ("snmp6", "Ip6InReceives")
    text = subprocess.run([*endpoint.prefix, "cat", f"/proc/net/{name}"], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    if version == 6:
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith(counter + " ")))
    names, values = (line.split() for line in text.splitlines() if line.startswith(counter))
    return int(values[names.index("InReceives")])


class LabProcesses:
    def __init__(self, script: Path):
        self.script = script
        self._all: list[TrafficProcess] = []

    def spawn(self, endpoint: Endpoint, role: str, name: str, *args: str) -> TrafficProcess:
        argv = [*endpoint.prefix, sys.executable, str(self.script), role, "--name", name, *args]
        process = TrafficProcess(argv)
        self._all.append(process)
        return process

    def stop_all(self) -> None:
        for process in self._all:
            process.kill()
        self._all.clear()

    def _start_tcp(self, client: Endpoint, server: Endpoint, version: int,
                   rounds: list[tuple[int, int]], ending: str, client_name: str | None,
                   server_name: str | None, hold: bool) -> tuple[TrafficProcess, TrafficProcess]:
        spec = ",".join(f"{up}:{down}" for up, down in rounds)
        common = ["--rounds", spec, "--ending", ending]
        srv = self.spawn(server, "tcp-server", server_name or f"fbsrv-{secrets.token_hex(3)}",
                         "--bind", server.addr(version), *common)
        port = srv.expect("ready")["port"]
        cli = self.spawn(client, "tcp-client", client_name or f"fbcli-{secrets.token_hex(3)}",
                         "--connect", server.addr(version), "--port", str(port), *common,
                         *(["--hold"] if hold else []))
        cli.expect("connected")
        srv.expect("connected")
        return cli, srv

    def tcp(self, client: Endpoint, server: Endpoint, version: int = 4,
            rounds: list[tuple[int, int]] | None = None, ending: str = "fin-client",
            client_name: str | None = None, server_name: str | None = None,
            timeout_s: float = 60.0) -> Exchange:
        """One connection: for each (up, down) round the client sends `up` bytes, the server reads
        them and sends `down`; then `ending` (fin-client, fin-server, rst-client, rst-server)."""
        cli, srv = self._start_tcp(client, server, version, rounds or [(0, 0)], ending,
                                   client_name, server_name, hold=False)
        client_report = ProcReport.from_event(cli.expect("done", timeout_s))
        server_report = ProcReport.from_event(srv.expect("done", timeout_s))
        cli.wait()
        srv.wait()
        return Exchange(version, client_report, server_report)

    def start_tcp(self, client: Endpoint, server: Endpoint, version: int = 4,
                  rounds: list[tuple[int, int]] | None = None, ending: str = "fin-client",
                  client_name: str | None = None, server_name: str | None = None) -> TcpSession:
        """Like tcp(), but the client stops after the first round until `resume()`."""
        rounds = rounds or [(1000, 1000), (1000, 1000)]
        if len(rounds) < 2:
            raise ValueError("a held session needs at least two rounds")
        cli, srv = self._start_tcp(client, server, version, rounds, ending, client_name,
                                   server_name, hold=True)
        return TcpSession(version, cli, srv, cli.expect("holding"))

    def udp(self, client: Endpoint, server: Endpoint, version: int = 4,
            sizes: list[int] | None = None, echo: bool = False, client_name: str | None = None,
            server_name: str | None = None, gap_ms: float = 1.0) -> Exchange:
        """The client sends one datagram per size (payload bytes) from one connected socket; the
        server echoes each back when `echo`."""
        sizes = sizes or [100]
        srv = self.spawn(server, "udp-server", server_name or f"fbusr-{secrets.token_hex(3)}",
                         "--bind", server.addr(version), "--count", str(len(sizes)),
                         *(["--echo"] if echo else []))
        port = srv.expect("ready")["port"]
        cli = self.spawn(client, "udp-client", client_name or f"fbucl-{secrets.token_hex(3)}",
                         "--connect", server.addr(version), "--port", str(port),
                         "--sizes", ",".join(map(str, sizes)), "--gap-ms", str(gap_ms),
                         *(["--echo"] if echo else []))
        cli.expect("connected")
        client_report = ProcReport.from_event(cli.expect("done"))
        server_report = ProcReport.from_event(srv.expect("done"))
        cli.wait()
        srv.wait()
        return Exchange(version, client_report, server_report)

    def bare_ack(self, source: Endpoint, target: Endpoint, version: int, sport: int, dport: int,
                 seq: int, ack: int, timeout_s: float = 30.0) -> None:
        """One TCP segment with only ACK set and no options (40 B over IPv4), sent with scapy
        from a raw socket in `source`'s namespace; returns once `target`'s IP layer received it
        (so both ends' captures and counting programs have seen it). For a packet of a
        connection both ends have closed, which no traffic process can send."""
        received = _ip_packets_received(target, version)
        argv = [*source.prefix, sys.executable, "-c", SEND_BARE_ACK, str(version),
                source.addr(version), target.addr(version), str(sport), str(dport), str(seq),
                str(ack)]
        subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=True)
        deadline = time.monotonic() + timeout_s
        while _ip_packets_received(target, version) == received:
            if time.monotonic() > deadline:
                raise TrafficError(f"the bare ACK to {target.addr(version)} never arrived")
            time.sleep(0.02)

    def ping(self, source: Endpoint, target: Endpoint, version: int = 4, count: int = 3,
             size: int = 56, interval_s: float = 0.05) -> PingReport:
        """ICMP echo with ping(8): `size` payload bytes per request."""
        argv = [*source.prefix, "ping", f"-{version}", "-n", "-c", str(count), "-s", str(size),
                "-i", str(interval_s), "-W", "2", target.addr(version)]
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = popen.communicate(timeout=30)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if popen.returncode != 0 or match is None:
            raise TrafficError(f"{' '.join(argv)} failed ({popen.returncode}): {out}{err}")
        return PingReport(popen.pid, int(match.group(1)), int(match.group(2)), size)
