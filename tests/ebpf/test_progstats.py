"""ebpf.progstats: the kernel's per-program run counts, as the benchmarks read them."""

from __future__ import annotations

import socket

from ebpf import progstats
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
