"""Agent pipeline throughput: synthetic observations -> cache -> rows -> ExportSession -> UDP
socket to a loopback sink, on one core, against softflowd's whole C pipeline (pcap -> flow table
-> NetFlow/IPFIX -> UDP) on the same number of distinct flows. Prints one JSON line per result:
{"name", "value", "unit", "peer", "peer_value", "ratio"}.

    .venv/bin/python -m bench.pipeline [--flows 100000] [--rounds 3]

The budget (issue 6): >= 1M records/s end to end, a sweep over 100,000 flows < 1 s.

Rates are records per second of CPU time (user + system) of the process doing the work, for
flowbridge and softflowd alike: this machine is shared, and wall time under contention would
measure the neighbours. Every round sends complete messages with templates refreshed as in real
use. softflowd reads a pcap of one TCP FIN packet per flow (made once with scapy, cached under
bench/.peers/), which is the least work it can do per flow; its export is decoded afterwards and
must hold every flow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.results import emit
from bridge.agent import container_ids, tune_gc
from bridge.cache import FlowCache
from bridge.config import CollectorConfig
from bridge.containers import CgroupResolver
from bridge.exporter import Exporter
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation, TcpHealth
from ipfix.decoder import Decoder

T0 = int(time.time() * 1000)
PEERS = Path(__file__).resolve().parent / ".peers"
SOFTFLOWD_VERSION = {"ipfix": "10", "v9": "9", "v5": "5"}


def addresses(i: int) -> tuple[bytes, bytes, int]:
    """Flow i's source and destination address and source port: every flow distinct."""
    src = (0x0A000000 + (i >> 16)).to_bytes(4, "big")
    dst = (0x0A800000 + (i & 0xFFFF)).to_bytes(4, "big")
    return src, dst, 1024 + i % 60000


def observations(count: int, *, end: bool, tcp: bool = False) -> list[FlowObservation]:
    health = TcpHealth(1, 1448, 250, 200, 10, 1) if tcp else None
    out = []
    for i in range(count):
        src, dst, port = addresses(i)
        key = FlowKey(0, Direction(i & 1), 4, 6, src, dst, port, 443)
        out.append(
            FlowObservation(
                key=key,
                ifindex=2,
                octets=1500 * (1 + i % 7),
                packets=1 + i % 7,
                tcp_flags=0x1B,
                first_ms=T0,
                last_ms=T0 + i % 1000,
                tcp=health,
                end=EndCause.FIN if end else EndCause.NONE,
            )
        )
    return out


def result(
    name: str, value: float, unit: str, peer: str | None = None, peer_value: float | None = None
) -> None:
    emit(name, value, unit, peer, peer_value, digits=1, ratio_digits=2)


def pipeline(protocol: str, profile: str, flows: int, rounds: int) -> float:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sink.bind(("127.0.0.1", 0))
    config = CollectorConfig(
        host="127.0.0.1", port=sink.getsockname()[1], protocol=protocol, profile=profile
    )
    # The agent's container lookup too, so the ntop rows are the agent's own.
    exporter = Exporter(config, 1234, container_ids=container_ids(CgroupResolver()))
    batch = observations(flows, end=True, tcp=profile == "ntop")
    best = 0.0
    for _ in range(rounds):
        cache = FlowCache(max_flows=flows + 1)
        start = time.process_time()
        for i in range(0, flows, 10_000):  # polls of 10,000 observations
            exporter.export(cache.update(batch[i : i + 10_000]))
        elapsed = time.process_time() - start
        best = max(best, flows / elapsed)
    exporter.close()
    sink.close()
    assert exporter.records_exported == flows * rounds
    return best


# -- softflowd -------------------------------------------------------------------------------


def flows_pcap(flows: int) -> Path:
    """One TCP FIN|ACK packet per flow, same addresses and ports as `observations`."""
    path = PEERS / f"flows-{flows}.pcap"
    if path.exists():
        return path
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapWriter

    PEERS.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = PcapWriter(str(partial), linktype=1, sync=False)
    template = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for i in range(flows):
        src, dst, port = addresses(i)
        packet = (
            template
            / IP(src=socket.inet_ntoa(src), dst=socket.inet_ntoa(dst))
            / TCP(sport=port, dport=443, flags="FA", seq=1, ack=1)
        )
        packet.time = T0 / 1000 + i / 1e6
        writer.write(packet)
    writer.close()
    partial.rename(path)
    return path


class Collector:
    """Receives datagrams in a thread until stopped; decodes them afterwards."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # root may pass net.core.rmem_max: nothing may be dropped
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, 64 << 20)
        except (OSError, AttributeError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.datagrams.append(self.socket.recv(65535))
            except TimeoutError:
                if self._stop.is_set():
                    return

    def records(self) -> int:
        self._stop.set()
        self._thread.join()
        self.socket.close()
        decoder = Decoder()
        return sum(len(decoder.records(d, ("127.0.0.1", 1))) for d in self.datagrams)


def softflowd_rate(protocol: str, flows: int, rounds: int) -> float | None:
    """softflowd's flows per CPU second reading the pcap, or None (and why) when it cannot run."""
    binary = shutil.which("softflowd") or "/usr/sbin/softflowd"
    if not os.path.exists(binary):
        print("bench.pipeline: softflowd not installed: no peer", file=sys.stderr)
        return None
    pcap = flows_pcap(flows)
    best = 0.0
    # softflowd runs in a scratch directory with short relative socket and pid paths: with a
    # longer control socket path (20+ characters) it blocks in accept() before reading the pcap.
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            collector = Collector()
            command = [
                binary, "-r", str(pcap), "-n", f"127.0.0.1:{collector.port}",
                "-v", SOFTFLOWD_VERSION[protocol], "-m", str(flows + 1),
                "-c", "ctl", "-p", "pid",
            ]  # fmt: skip
            with open(f"{scratch}/log", "w+b") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd=scratch,
                )
                status, usage = _wait(process.pid)
                process.returncode = os.waitstatus_to_exitcode(status)
                log.seek(0)
                output = log.read().decode(errors="replace")
            time.sleep(0.3)  # the last datagrams reach the socket
            exported = collector.records()
            if process.returncode != 0:
                print(f"bench.pipeline: softflowd failed: {output.strip()[-300:]}", file=sys.stderr)
                return None
            if exported != flows:
                print(
                    f"bench.pipeline: softflowd exported {exported} of {flows} flows",
                    file=sys.stderr,
                )
            cpu = usage.ru_utime + usage.ru_stime
            best = max(best, exported / cpu)
    return best


def _wait(pid: int, timeout: float = 120) -> tuple[int, os.struct_rusage]:
    """softflowd's exit status and resource usage; killed (and a failure) past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if time.monotonic() > deadline:
            os.kill(pid, 9)
        time.sleep(0.01)


# -- cache ---------------------------------------------------------------------------------


def sweep_seconds(flows: int) -> tuple[float, float]:
    cache = FlowCache(idle_timeout=15, max_flows=flows)
    cache.update(observations(flows, end=False))
    start = time.perf_counter()
    kept = cache.sweep(T0 + 1000)  # none idle yet: must stop at once
    live = time.perf_counter() - start
    assert not kept
    start = time.perf_counter()
    expired = cache.sweep(T0 + 60_000)  # all idle
    everything = time.perf_counter() - start
    assert len(expired) == flows
    return live, everything


def live_updates_per_second(flows: int) -> float:
    """Polls of live flows whose counters grew: the cache's steady-state work per observation."""
    cache = FlowCache(max_flows=flows)
    first = observations(flows, end=False)
    cache.update(first)
    grown = [
        FlowObservation(
            o.key, o.ifindex, o.octets * 2, o.packets * 2, o.tcp_flags, o.first_ms, o.last_ms + 1000
        )
        for o in first
    ]
    start = time.process_time()
    cache.update(grown)
    return flows / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tune_gc()  # as `flowbridge run` does after start-up, so this measures what the agent does
    peers: dict[str, float | None] = {}
    for protocol, profile in (
        ("ipfix", "standard"),
        ("v9", "standard"),
        ("ipfix", "ntop"),
        ("v5", "v5"),
    ):
        rate = pipeline(protocol, profile, args.flows, args.rounds)
        if protocol not in peers:
            peers[protocol] = softflowd_rate(protocol, args.flows, args.rounds)
        peer = f"softflowd -v {SOFTFLOWD_VERSION[protocol]}"
        result(f"pipeline_{protocol}_{profile}", rate, "records/s", peer, peers[protocol])
    result("cache_update_live_flows", live_updates_per_second(args.flows), "observations/s")
    live, everything = sweep_seconds(args.flows)
    result(f"sweep_{args.flows}_flows_none_expire", live * 1000, "ms")
    result(f"sweep_{args.flows}_flows_all_expire", everything * 1000, "ms")


if __name__ == "__main__":
    main()
