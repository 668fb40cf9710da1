"""ebpf.progstats: the kernel's per-program run counts, as the benchmarks read them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from ebpf import progstats
from tests.conftest import require_tools
from tests.ebpf.conftest import open_collector

PORT = 47841


def test_loopback_packets_are_counted_runs_of_the_loopback_program() -> None:
    collector = open_collector()
    try:
        with progstats.stats_enabled():
            before = progstats.snapshot()
            assert "tc_loopback" in before and "sock_ops" in before
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
                sink.bind(("127.0.0.1", PORT))
                for _ in range(50):
                    source.sendto(b"x", ("127.0.0.1", PORT))
                    sink.recv(10)
            costs = progstats.difference(progstats.snapshot(), before)
    finally:
        collector.close()
    loopback = costs["tc_loopback"]
    # Other tests' loopback traffic may add runs, never remove any.
    assert loopback.run_cnt >= 50
    assert loopback.run_time_ns > 0 and loopback.ns_per_run > 0
    assert progstats.total_ns(costs) >= loopback.run_time_ns
    assert "tc_loopback" in progstats.describe(costs, 50, "datagram")


def test_namespace_filter_counts_only_this_namespaces_programs() -> None:
    """A loopback exchange in another namespace runs that namespace's copy of tc_loopback:
    counted without the filter, not with the filter on this namespace's interfaces."""
    require_tools("ip")
    collector = open_collector()
    namespace = f"fb-progstats-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        collector.sync_interfaces()
        here = tuple(index for index, _ in socket.if_nameindex())
        ours = {progstats.program_name_by_id(i) for i in progstats.tcx_program_ids(1)}
        assert "tc_loopback" in ours  # lo is ifindex 1 in every namespace
        with progstats.stats_enabled():
            # The filtered window lies inside the unfiltered one: the unfiltered count holds
            # every run the filtered one does, plus the other namespace's.
            everywhere_before = progstats.snapshot()
            here_before = progstats.snapshot(tc_ifindexes=here)
            subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SEND_50],
                           check=True, timeout=60)
            here_runs = progstats.difference(progstats.snapshot(tc_ifindexes=here), here_before)
            everywhere = progstats.difference(progstats.snapshot(), everywhere_before)
    finally:
        collector.close()
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    other_namespace_runs = everywhere["tc_loopback"].run_cnt - here_runs["tc_loopback"].run_cnt
    assert other_namespace_runs >= 50


SEND_50 = """
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink, \\
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
    sink.bind(("127.0.0.1", 0))
    for _ in range(50):
        source.sendto(b"x", sink.getsockname())
        sink.recv(10)
"""


def test_tracepoint_program_is_counted_through_its_perf_event() -> None:
    """bcc attaches tcp_destroy_sock through a perf event: the collector holds the event, not
    the program, and every destroyed TCP socket (of the whole machine) runs it."""
    collector = open_collector()
    try:
        with progstats.stats_enabled():
            before = progstats.snapshot()
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(8)
                for _ in range(5):
                    client = socket.create_connection(listener.getsockname())
                    accepted, _ = listener.accept()
                    for sock in (client, accepted):  # a RST: destroyed at close, no TIME_WAIT
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        sock.close()
            costs = progstats.difference(progstats.snapshot(), before)
    finally:
        collector.close()
    names = [name for name in costs if "tcp_destro" in name]  # bcc names it tcp__tcp_destro
    assert len(names) == 1, sorted(costs)
    destroy = costs[names[0]]
    assert destroy.run_cnt >= 10  # two sockets per connection; other sockets may add runs
    assert destroy.run_time_ns > 0
