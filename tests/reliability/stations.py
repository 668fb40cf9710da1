"""Real collectors set up for faults: an nfcapd on a port chosen before it runs (so the agent
can export to it while it is down), optionally with a small socket buffer (so a stopped nfcapd
overflows quickly), and SIGSTOP / SIGCONT for a collector that hangs."""

from __future__ import annotations

import os
import signal

from tests.harness.collector_common import free_udp_port, udp_drops
from tests.harness.collectors import Nfacctd, Nfcapd


def nfcapd_at(port: int | None = None, socket_buffer: int | None = None) -> Nfcapd:
    """An nfcapd (not started) bound to `port` when started (default: a free port now)."""
    collector = Nfcapd(4)
    collector.port = port or free_udp_port(collector.host)
    argv = collector.daemon.argv
    argv[argv.index("-p") + 1] = str(collector.port)
    if socket_buffer:
        argv += ["-B", str(socket_buffer)]
    return collector


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


def nfacctd_with_buffer(socket_buffer: int) -> Nfacctd:
    """An nfacctd (not started) whose socket buffer is `socket_buffer` bytes (nfacctd_pipe_size;
    its default, the kernel's 208 KiB, overflows under minutes of churn on this loaded VM)."""
    collector = Nfacctd(4)
    with open(collector.workdir / "nfacctd.conf", "a") as config:
        config.write(f"nfacctd_pipe_size: {socket_buffer}\n")
    return collector
