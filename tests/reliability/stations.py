"""Real collectors in faults: SIGSTOP / SIGCONT for a collector that hangs, its socket's drops,
and what nfcapd stored of a long run. (A collector on a port chosen before it runs, or with a
small or large socket buffer: Nfcapd(port=..., socket_buffer=...).)"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from collections import Counter

from tests.harness.collector_common import udp_drops
from tests.harness.collectors import Nfcapd

DIRECTIONS = {"I": 0, "E": 1}  # nfdump's %dir -> IANA flowDirection


def pause(collector: Nfcapd) -> None:
    """The collector stops reading (a hung process): its socket buffer fills, then drops."""
    assert collector.daemon.process is not None
    os.kill(collector.daemon.process.pid, signal.SIGSTOP)


def resume(collector: Nfcapd) -> None:
    assert collector.daemon.process is not None
    os.kill(collector.daemon.process.pid, signal.SIGCONT)


def socket_drops(collector: Nfcapd) -> int:
    """Datagrams the kernel dropped at the collector's full socket (/proc/net/udp)."""
    return udp_drops(collector.port)


def nfdump_tcp_keys(collector: Nfcapd, address: str) -> Counter:
    """Records per (src, dst, sport, dport, flowDirection) of the TCP flows of `address` that
    nfcapd stored, addresses packed. nfdump prints one short line per record: a long soak's
    records, parsed whole (tests/harness parse_raw), would not fit in memory."""
    keys: Counter = Counter()
    files = sorted(p for p in collector.flowdir.rglob("nfcapd.*") if "current" not in p.name)
    for path in files:
        with subprocess.Popen(["nfdump", "-q", "-r", str(path), "-o",
                               "fmt:%sa|%da|%sp|%dp|%dir", f"proto tcp and host {address}"],
                              stdout=subprocess.PIPE, text=True) as nfdump:
            assert nfdump.stdout is not None
            for line in nfdump.stdout:
                src, dst, sport, dport, direction = (f.strip() for f in line.split("|"))
                keys[(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                      int(sport), int(dport), DIRECTIONS[direction])] += 1
        if nfdump.returncode:
            raise RuntimeError(f"nfdump -r {path} exited {nfdump.returncode}")
    return keys
