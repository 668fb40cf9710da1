"""Kernel CPU of two (or more) versions of the BPF programs on the same packets: one collector per
source tree, each in a process of its own, all attached at once, so that every connection runs
every version's programs under the same machine load. On a shared machine the load moves the
ns per run by +-20 % from one minute to the next; versions measured at once do not drift apart.

    ip netns exec NS python -m bench.kernel_ab --cgroup DIR TREE_A TREE_B [--rounds 3]

TREE: a copy of the repository (e.g. an old commit's checkout) whose ebpf/ the collector
process imports (it runs with TREE as its working directory). The first program of a TC chain
pays ~100 ns more per run (it brings the packet and socket into the cache), so each round
rotates the attach order; the figures are the means over rounds. Needs root, nginx and wrk;
run it in a namespace and cgroup of its own as bench.overhead explains. The tcp_destroy_sock
tracepoint program is counted too (through the perf event the collector holds), but it runs for
every TCP socket of the machine: other loads add to its runs per connection, equally for every
tree. One JSON line per tree and mode: kernel ns per connection (close) or request (keep-alive),
the first tree the peer.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys

from bench.nginx import Nginx, run_wrk
from bench.overhead import enter_cgroup
from bench.results import emit
from ebpf import progstats

# A collector polled like the agent polls it, until its stdin closes.
COLLECTOR = """
import select, sys
from ebpf.collector import FlowCollector
collector = FlowCollector(cgroup=sys.argv[1])
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    collector.poll(200)
collector.close()
"""


def measured_round(nginx: Nginx, trees: list[str], cgroup: str, seconds: int, close: bool
                   ) -> tuple[dict[str, dict[str, progstats.ProgramCost]], int]:
    """Per tree (attached in this order) its programs' cost during one wrk run; the requests."""
    here = tuple(index for index, _ in socket.if_nameindex())
    children: list[tuple[str, subprocess.Popen]] = []
    try:
        for tree in trees:
            child = subprocess.Popen([sys.executable, "-c", COLLECTOR, cgroup], cwd=tree,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append((tree, child))
            if child.stdout is None or child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the collector of {tree} did not start")
        run_wrk(nginx.url, 1, 32, close)  # warm-up
        before = {t: progstats.snapshot(c.pid, tc_ifindexes=here) for t, c in children}
        result = run_wrk(nginx.url, seconds, 32, close)
        costs = {t: progstats.difference(progstats.snapshot(c.pid, tc_ifindexes=here), before[t])
                 for t, c in children}
    finally:
        for _, child in children:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=60)
    return costs, result.requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="source trees, the first is the reference")
    parser.add_argument("--cgroup", required=True, help="cgroup v2 directory to run in")
    parser.add_argument("--rounds", type=int, default=3, help="attach-order rotations")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--modes", default="close,keepalive")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.kernel_ab: needs root (BPF)", file=sys.stderr)
        return 2
    trees = [os.path.abspath(t) for t in args.trees]
    enter_cgroup(args.cgroup)
    with Nginx() as nginx, progstats.stats_enabled():
        for mode in args.modes.split(","):
            close = mode == "close"
            unit = "connection" if close else "request"
            per_unit: dict[str, list[float]] = {t: [] for t in trees}
            for index in range(args.rounds):
                order = trees[index % len(trees):] + trees[: index % len(trees)]
                costs_of, requests = measured_round(nginx, order, args.cgroup, args.seconds,
                                                    close)
                for tree, costs in costs_of.items():
                    per_unit[tree].append(progstats.total_ns(costs) / max(1, requests))
                    print(f"# {mode} round {index} {tree}: "
                          f"{progstats.describe(costs, requests, unit)}", file=sys.stderr,
                          flush=True)
            reference = statistics.mean(per_unit[trees[0]])
            for tree in trees:
                emit(f"kernel_ab_{mode}_ns_per_{unit}:{tree}", statistics.mean(per_unit[tree]),
                     "ns", trees[0], reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
