"""A network lab for end-to-end tests: two endpoints joined by a veth pair, real packets, a capture.

    with NetLab() as lab:                       # "host" and "peer", each in its own namespace
        with lab.capture(lab.host) as cap:      # tcpdump on the host's veth, ready before traffic
            t = lab.tcp(client=lab.host, server=lab.peer, version=6, rounds=[(1000, 5000)])
        flows = cap.flows()                     # ground truth keyed like FlowKey minus netns

`NetLab(host_in_root=True)` puts the host end in the root namespace (where an agent runs);
`NetLab(wire=True)` joins the ends through a third namespace forwarding frames in userspace, so
`lab.impair(delay_ms=20, loss=0.05)` can add delay and loss (this kernel has no netem: see
netlab_wire.py). Offloads are off and the MTU is 1500, so a capture counts exactly the packets
the stack built. Names carry a random run id (and the creating pid), so parallel runs do not
collide; everything is removed on exit, also after a failure, and a lab left by a killed run is
swept when the next one is created.

Addresses exist only inside the lab: IPv4 from 198.18.0.0/15 (RFC 2544 benchmarking; a /24 that
overlaps no route of the root namespace when an end lives there), IPv6 from a random fd00::/8 ULA
/48 (never fd00::/16, which this VM's eth0 uses), added with `nodad`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.harness.netlab_capture import Capture
from tests.harness.netlab_proc import LabProcesses

HARNESS_DIR = Path(__file__).resolve().parent
ROOT_NETNS = "/proc/self/ns/net"  # the namespace the tests run in


class LabError(RuntimeError):
    """The lab could not be built (missing tool, no root, a command failed)."""


@dataclass(frozen=True)
class Endpoint:
    role: str  # "host" or "peer"
    netns: str | None  # name under /run/netns; None = the root namespace
    ifname: str
    mac: str
    ipv4: str
    ipv6: str
    ifindex: int
    netns_inode: int  # FlowKey.netns of flows seen in this namespace

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this endpoint's namespace."""
        return [] if self.netns is None else ["ip", "netns", "exec", self.netns]

    def addr(self, version: int) -> str:
        return self.ipv4 if version == 4 else self.ipv6

    def packed(self, version: int) -> bytes:
        return ipaddress.ip_address(self.addr(version)).packed


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def missing_prerequisites() -> str | None:
    """Why a lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("ip", "ethtool", "tcpdump", "ping") if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


STALE_NETNS = re.compile(r"^fb[0-9a-f]{6}[hpw]-p(\d+)$")


def sweep_stale_labs() -> list[str]:
    """Deletes the namespaces of labs whose creating process died without cleaning up (killed
    test run); deleting a namespace also removes its veth pairs, root-namespace ends included."""
    removed = []
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = STALE_NETNS.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


class NetLab:
    def __init__(self, host_in_root: bool = False, wire: bool = False, workdir: Path | None = None):
        self.run_id = secrets.token_hex(3)
        self.host_in_root, self.has_wire = host_in_root, wire
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"netlab-{self.run_id}-"))
        self._namespaces: list[str] = []
        self._root_links: list[str] = []
        self.processes = LabProcesses(HARNESS_DIR / "netlab_traffic.py")
        self._wire_process: subprocess.Popen[str] | None = None
        self.wire_counters: dict[str, dict[str, int]] | None = None
        self.host: Endpoint
        self.peer: Endpoint

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> NetLab:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        reason = missing_prerequisites()
        if reason:
            raise LabError(reason)
        sweep_stale_labs()
        rid = self.run_id
        subnet4 = self._pick_ipv4_subnet()
        ula = self._pick_ula()
        host_ns = None if self.host_in_root else self._add_netns(f"fb{rid}h-p{os.getpid()}")
        peer_ns = self._add_netns(f"fb{rid}p-p{os.getpid()}")
        host_if, peer_if = f"fb{rid}h0", f"fb{rid}p0"
        if self.has_wire:
            wire_ns = self._add_netns(f"fb{rid}w-p{os.getpid()}")
            self.wire_ifs = (f"fb{rid}w0", f"fb{rid}w1")
            self._veth(host_if, host_ns, self.wire_ifs[0], wire_ns)
            self._veth(peer_if, peer_ns, self.wire_ifs[1], wire_ns)
            self.wire_ns = wire_ns
            for ifname in self.wire_ifs:
                self._configure(wire_ns, ifname, addresses=[], promisc=True)
        else:
            self._veth(host_if, host_ns, peer_if, peer_ns)
        net4 = list(subnet4.hosts())
        self.host = self._endpoint("host", host_ns, host_if, str(net4[0]), f"{ula}::1", subnet4)
        self.peer = self._endpoint("peer", peer_ns, peer_if, str(net4[1]), f"{ula}::2", subnet4)
        self._static_neighbours()
        if self.has_wire:
            self.impair()

    def destroy(self) -> None:
        self.processes.stop_all()
        self._stop_wire()
        for link in self._root_links:
            run(["ip", "link", "del", link], check=False)
        for name in reversed(self._namespaces):
            run(["ip", "netns", "del", name], check=False)
        self._namespaces.clear()
        self._root_links.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- building blocks ---------------------------------------------------------------------
    def _add_netns(self, name: str) -> str:
        run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        return name

    def _veth(self, a: str, a_ns: str | None, b: str, b_ns: str | None) -> None:
        run(["ip", "link", "add", a, "mtu", "1500", "type", "veth", "peer", "name", b,
             "mtu", "1500"])
        if a_ns is None:
            self._root_links.append(a)
        else:
            run(["ip", "link", "set", a, "netns", a_ns])
        if b_ns is None:
            self._root_links.append(b)
        else:
            run(["ip", "link", "set", b, "netns", b_ns])

    def _configure(self, netns: str | None, ifname: str, addresses: list[str],
                   promisc: bool = False) -> None:
        prefix = [] if netns is None else ["ip", "netns", "exec", netns]
        run([*prefix, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
             "tx", "off", "rx", "off"])
        ipv6 = bool(addresses)
        sysctls = {"disable_ipv6": "0" if ipv6 else "1"}
        if ipv6:  # no DAD delay, no router solicitations: the first packet leaves at once
            sysctls.update(dad_transmits="0", accept_dad="0", router_solicitations="0",
                           accept_ra="0")
        for key, value in sysctls.items():
            run([*prefix, "sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.{key}={value}"])
        for address in addresses:
            family = "-6" if ":" in address else "-4"
            extra = ["nodad"] if family == "-6" else []
            run([*prefix, "ip", family, "addr", "add", address, "dev", ifname, *extra])
        run([*prefix, "ip", "link", "set", ifname, *(["promisc", "on"] if promisc else []), "up"])

    def _endpoint(self, role: str, netns: str | None, ifname: str, ipv4: str, ipv6: str,
                  subnet4: ipaddress.IPv4Network) -> Endpoint:
        self._configure(netns, ifname, [f"{ipv4}/{subnet4.prefixlen}", f"{ipv6}/64"])
        prefix = [] if netns is None else ["ip", "netns", "exec", netns]
        info = json.loads(run([*prefix, "ip", "-j", "link", "show", ifname]).stdout)[0]
        ns_path = ROOT_NETNS if netns is None else f"/run/netns/{netns}"
        return Endpoint(role, netns, ifname, info["address"], ipv4, ipv6, info["ifindex"],
                        os.stat(ns_path).st_ino)

    def _static_neighbours(self) -> None:
        """Permanent ARP/ND entries: a first packet never waits for neighbour resolution (through
        a delaying wire that would double the first SYN's RTT sample) and captures hold only the
        tests' own traffic."""
        for me, other in ((self.host, self.peer), (self.peer, self.host)):
            for version in (4, 6):
                run([*me.prefix, "ip", f"-{version}", "neigh", "replace", other.addr(version),
                     "lladdr", other.mac, "dev", me.ifname, "nud", "permanent"])

    def _pick_ipv4_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of 198.18.0.0/15 that no root-namespace route overlaps (only matters with an end
        in the root namespace, but cheap to check always)."""
        routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
                            or "[]")
        used = [ipaddress.ip_network(r["dst"], strict=False) for r in routes
                if r.get("dst", "default") != "default"]
        subnets = list(ipaddress.ip_network("198.18.0.0/15").subnets(new_prefix=24))
        random.shuffle(subnets)
        for candidate in subnets:
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise LabError("no free /24 in 198.18.0.0/15")

    @staticmethod
    def _pick_ula() -> str:
        global_id = secrets.randbits(40) | (1 << 32)  # second byte non-zero: never fd00::/16
        high, middle, low = global_id >> 32, (global_id >> 16) & 0xFFFF, global_id & 0xFFFF
        return f"fd{high:02x}:{middle:04x}:{low:04x}"

    # --- impairment (the wire) ----------------------------------------------------------------
    def impair(self, delay_ms: float = 0.0, loss: float = 0.0, loss_every: int = 0,
               towards: str = "both", data_only: bool = True, seed: int = 1) -> None:
        """(Re)start the wire with delay and loss applied to frames going `towards` the "host",
        the "peer" or "both". delay is one way, so RTT grows by 2 x delay with towards="both"."""
        if not self.has_wire:
            raise LabError("impairment needs NetLab(wire=True)")
        self._stop_wire()
        to_peer = towards in ("peer", "both")
        to_host = towards in ("host", "both")
        argv = ["ip", "netns", "exec", self.wire_ns, sys.executable,
                str(HARNESS_DIR / "netlab_wire.py"), *self.wire_ifs, "--seed", str(seed),
                "--delay-ms-ab", str(delay_ms if to_peer else 0),
                "--delay-ms-ba", str(delay_ms if to_host else 0),
                "--loss-ab", str(loss if to_peer else 0), "--loss-ba", str(loss if to_host else 0),
                "--every-ab", str(loss_every if to_peer else 0),
                "--every-ba", str(loss_every if to_host else 0)]
        if data_only:
            argv.append("--loss-data-only")
        self._wire_process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self._wire_process.stdout is not None
        if self._wire_process.stdout.readline().strip() != "ready":
            raise LabError("the lab's wire process did not start")

    def _stop_wire(self) -> None:
        process, self._wire_process = self._wire_process, None
        if process is None:
            return
        process.terminate()
        try:
            out, _ = process.communicate(timeout=5)
            self.wire_counters = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # --- observation and traffic --------------------------------------------------------------
    def capture(self, endpoint: Endpoint, name: str = "capture") -> Capture:
        """A tcpdump on the endpoint's veth; use as a context manager (ready when entered)."""
        path = self.workdir / f"{name}-{endpoint.role}-{secrets.token_hex(2)}.pcap"
        return Capture(endpoint.prefix, endpoint.ifname, path, [endpoint.mac],
                       [endpoint.packed(4), endpoint.packed(6)])

    def tcp(self, client: Endpoint, server: Endpoint, version: int = 4, **kwargs: object):
        """Run one TCP connection to completion; see LabProcesses.tcp for the options."""
        return self.processes.tcp(client, server, version, **kwargs)

    def start_tcp(self, client: Endpoint, server: Endpoint, version: int = 4, **kwargs: object):
        """Open a TCP connection and hold it after its first round (see TcpSession.resume)."""
        return self.processes.start_tcp(client, server, version, **kwargs)

    def udp(self, client: Endpoint, server: Endpoint, version: int = 4, **kwargs: object):
        return self.processes.udp(client, server, version, **kwargs)

    def bare_ack(self, source: Endpoint, target: Endpoint, version: int, sport: int, dport: int,
                 seq: int, ack: int) -> None:
        """One bare ACK from a raw socket, delivered; see LabProcesses.bare_ack."""
        self.processes.bare_ack(source, target, version, sport, dport, seq, ack)

    def ping(self, source: Endpoint, target: Endpoint, version: int = 4, **kwargs: object):
        return self.processes.ping(source, target, version, **kwargs)
