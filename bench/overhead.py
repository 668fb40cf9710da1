"""Cost of the eBPF collector to the traffic it watches: nginx requests/s under wrk with the
collector attached (and polled, as the agent polls it) and without, alternating rounds in one run,
for new-connection-per-request (`Connection: close`) and keep-alive HTTP/1.1 on loopback.

Also a correctness check under load: every connection nginx logged must appear in the
collector's flows in both directions (matched per client port, nginx's connection serial telling
connections apart).

    python -m bench.overhead [--rounds 4] [--seconds 5] [--strict] [--cgroup DIR]

One JSON line per result: {"name", "value", "unit", "peer", "peer_value", "ratio"}; the peer is
the same nginx without the collector (for the missing-connections lines: nginx's access log).
Besides req/s (noisy on a shared machine): the CPU nginx and wrk spend per request with and
without the collector (its kernel programs run on their CPUs), the kernel ns per request or
connection in the collector's BPF programs (run_time_ns, from one more round with the BPF
statistics on: they cost every program run two clock reads, ~1-4 us per loopback connection
with the collector's ~31 runs (bench.hook_interleave), so the rounds compared above run with
them off), and for `close` the polling thread's CPU per 1000 connections.
The kernel figures count the TC programs of this process's network namespace only. On a
machine other loads share, run the benchmark in a namespace and cgroup of its own so that they
count its own connections only: `ip netns exec NS python -m bench.overhead --cgroup DIR` (the
benchmark moves itself into DIR, under the cgroup v2 root, and attaches the socket hooks there;
`ip netns exec` remounts /sys, so mount cgroup2 on /sys/fs/cgroup inside it first).
Budget: at most 5% fewer requests/s, zero missing connections (`--strict` exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.nginx import Nginx, WrkResult, run_wrk
from bench.results import emit
from ebpf import progstats
from ebpf.observation import Direction, ObservationSource

BUDGET_RATIO = 0.95


class ConnectionTally:
    """Polls a source like the agent does and remembers every flow to or from one server port:
    a flow is (key, first_ms), so two connections reusing a client port count twice."""

    def __init__(self, source: ObservationSource, server_port: int, poll_timeout_ms: int = 200):
        self.source, self.server_port, self.poll_timeout_ms = source, server_port, poll_timeout_ms
        self.flows: dict[Direction, set[tuple[int, int]]] = {d: set() for d in Direction}
        self.observations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.polls = 0  # completed polls

    def start(self) -> ConnectionTally:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        port = self.server_port
        try:
            while not self._stop.is_set():
                observations = self.source.poll(self.poll_timeout_ms)
                for observation in observations:
                    key = observation.key
                    self.observations += 1
                    if key.dst_port == port:
                        self.flows[key.direction].add((key.src_port, observation.first_ms))
                    elif key.src_port == port:
                        self.flows[key.direction].add((key.dst_port, observation.first_ms))
                self.polls += 1
        except BaseException as exc:  # reported by the benchmark, never swallowed
            self.error = exc

    def count(self) -> int:
        return sum(len(f) for f in self.flows.values())

    def cpu_seconds(self) -> float:
        """CPU time of the polling thread so far: the collector's userspace cost (and the
        tally's few set insertions per observation)."""
        assert self._thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def missing(self, logged: Counter[int]) -> dict[Direction, int]:
        """Per direction: logged connections with no flow of their client port."""
        result = {}
        for direction, flows in self.flows.items():
            seen = Counter(client_port for client_port, _ in flows)
            result[direction] = sum(max(0, n - seen[port]) for port, n in logged.items())
        return result


def wait_quiet(tally: ConnectionTally, quiet_polls: int = 3, limit_s: float = 60.0) -> None:
    """Until `quiet_polls` polls in a row added no flow: the last connections' flows arrived.
    Counted in polls, not seconds: on a loaded machine one poll of a big backlog takes
    seconds, and a timer would end the tally in the middle of it (connections "missing")."""
    deadline = time.monotonic() + limit_s
    last_count, last_poll = tally.count(), tally.polls
    while time.monotonic() < deadline:
        time.sleep(0.05)
        count, polls = tally.count(), tally.polls
        if count != last_count:
            last_count, last_poll = count, polls
        elif polls - last_poll >= quiet_polls:
            return


@dataclass
class Round:
    result: WrkResult
    load_cpu_s: float  # nginx workers + wrk
    check: dict | None = None  # with the collector: logged connections against its flows
    kernel: dict[str, progstats.ProgramCost] = field(default_factory=dict)
    collector_cpu_s: float = 0.0  # the polling thread

    @property
    def load_us_per_request(self) -> float:
        return self.load_cpu_s * 1e6 / max(1, self.result.requests)


def loaded_run(nginx: Nginx, seconds: int, connections: int, close: bool
               ) -> tuple[WrkResult, float]:
    nginx_before = nginx.cpu_seconds()
    result = run_wrk(nginx.url, seconds, connections, close)
    return result, nginx.cpu_seconds() - nginx_before + result.cpu_s


def measured_round(
    nginx: Nginx, attach: Callable[[], object] | None, seconds: int, connections: int, close: bool
) -> Round:
    """One wrk run; with `attach` the collector is loaded and polled during it and the logged
    connections are matched against its flows."""
    if attach is None:
        nginx.truncate_log()
        return Round(*loaded_run(nginx, seconds, connections, close))
    collector = attach()
    tally = ConnectionTally(collector, nginx.port).start()
    try:
        time.sleep(0.3)  # the first polls of pre-existing flows are not part of the measurement
        nginx.truncate_log()
        kernel_before, tally_before = own_kernel_costs(), tally.cpu_seconds()
        result, load_cpu = loaded_run(nginx, seconds, connections, close)
        kernel = progstats.difference(own_kernel_costs(), kernel_before)
        wait_quiet(tally)
        collector_cpu = tally.cpu_seconds() - tally_before
    finally:
        tally.stop()
        collector.close()
    if tally.error is not None:
        raise RuntimeError(f"poll() failed: {tally.error!r}")
    requests, logged = nginx.logged_connections()
    missing = tally.missing(logged)
    worst = max(missing, key=missing.get)
    check = {
        "requests_logged": requests,
        "connections_logged": sum(logged.values()),
        "missing": missing[worst],
        "direction": worst.name,
        "missing_by_direction": {d.name: n for d, n in missing.items()},
        "flows_seen": tally.count(),
        "observations": tally.observations,
    }
    return Round(result, load_cpu, check, kernel, collector_cpu)


def own_kernel_costs() -> dict[str, progstats.ProgramCost]:
    """The collector's BPF programs, TC programs only those of this namespace's interfaces
    (where nginx and wrk talk), not their copies counting other namespaces' traffic."""
    return progstats.snapshot(tc_ifindexes=tuple(i for i, _ in socket.if_nameindex()))


def enter_cgroup(cgroup: str) -> Path:
    """This process (and nginx and wrk, started after) into `cgroup`, created if needed; its
    path."""
    from ebpf.loader import resolve_cgroup

    root = resolve_cgroup(None)
    path = root / cgroup
    path.mkdir(exist_ok=True)
    (path / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return path


def bench_mode(
    nginx: Nginx, attach: Callable[[], object], mode: str, args: argparse.Namespace
) -> tuple[float, int]:
    close = mode == "close"
    run_wrk(nginx.url, 1, args.connections, close)  # warm-up: caches, TIME_WAIT steady state
    rounds: dict[bool, list[Round]] = {False: [], True: []}
    for index in range(args.rounds):
        order = (False, True) if index % 2 == 0 else (True, False)  # ABBA against drift
        for attached in order:
            measured = measured_round(
                nginx, attach if attached else None, args.seconds, args.connections, close
            )
            rounds[attached].append(measured)
            result, check = measured.result, measured.check
            print(
                f"# {mode} round {index} {'with' if attached else 'without'} collector: "
                f"{result.requests_per_s:.0f} req/s, {measured.load_us_per_request:.1f} us "
                f"nginx+wrk CPU per request, {result.socket_errors} socket errors"
                + (f", {json.dumps(check)}" if check else ""),
                file=sys.stderr,
                flush=True,
            )
    with progstats.stats_enabled():  # run_time_ns: a round of its own, not compared
        stats_round = measured_round(nginx, attach, args.seconds, args.connections, close)
    print(f"# {mode} statistics round: {stats_round.result.requests_per_s:.0f} req/s, "
          f"{stats_round.load_us_per_request:.1f} us nginx+wrk CPU per request, "
          f"{json.dumps(stats_round.check)}", file=sys.stderr, flush=True)
    rates = {arm: [r.result.requests_per_s for r in rs] for arm, rs in rounds.items()}
    with_collector = statistics.median(rates[True])
    without = statistics.median(rates[False])
    paired = [round(w / wo, 3) for w, wo in zip(rates[True], rates[False], strict=True)]
    print(
        f"# {mode}: with/without per round (adjacent in time) {paired}, "
        f"spread without collector {min(rates[False]):.0f}..{max(rates[False]):.0f} req/s",
        file=sys.stderr,
        flush=True,
    )
    emit(
        f"nginx_{mode}_requests_per_s", with_collector, "req/s", "nginx without collector", without
    )
    # CPU of the load itself per request: what the collector costs the traffic (its kernel
    # programs run on the load's CPUs), far steadier than req/s on a shared machine.
    load_with = statistics.median(r.load_us_per_request for r in rounds[True])
    load_without = statistics.median(r.load_us_per_request for r in rounds[False])
    emit(f"nginx_{mode}_load_cpu_per_request", load_with, "us",
         "nginx+wrk without collector", load_without)
    kernel = stats_round.kernel
    requests = stats_round.result.requests
    if requests and kernel:
        unit = "connection" if close else "request"
        print(f"# {mode}: kernel {progstats.describe(kernel, requests, unit)}",
              file=sys.stderr, flush=True)
        emit(f"nginx_{mode}_kernel_ns_per_{unit}", progstats.total_ns(kernel) / requests, "ns",
             "nginx+wrk CPU per request without collector", load_without * 1000)
    checks = [r.check for r in [*rounds[True], stats_round] if r.check]
    logged = sum(c["connections_logged"] for c in checks)
    if close and logged:
        collector_cpu = sum(r.collector_cpu_s for r in [*rounds[True], stats_round])
        emit("nginx_close_collector_cpu_per_1000_connections", collector_cpu * 1e6 / logged,
             "ms", "issue 6 budget for the whole agent (10% of a core at 10k conn/s)", 10.0)
    missing = sum(c["missing"] for c in checks)
    emit(f"nginx_{mode}_connections_missing", missing, "connections", "nginx access log", logged)
    return with_collector / without, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per arm and mode")
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per round")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="nginx worker_processes")
    parser.add_argument("--modes", default="close,keepalive")
    parser.add_argument("--strict", action="store_true", help="exit 1 when over budget")
    parser.add_argument("--cgroup", help="cgroup v2 directory (relative to the root) to run in "
                        "and attach the socket hooks to (default: the root, all sockets)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.overhead: needs root (BPF)", file=sys.stderr)
        return 2
    try:
        from ebpf.collector import FlowCollector
    except ImportError as exc:
        print(f"bench.overhead: ebpf.collector is not importable: {exc}", file=sys.stderr)
        return 2
    over_budget = False
    # The agent collects the young generation far less often than CPython's default (700
    # allocations); the polled collector here does the same so that its CPU per connection is
    # the agent's (default threshold: 132-155 ms per 1000 connections, the agent's: ~100-120).
    from bridge.agent import GC_THRESHOLD

    gc.set_threshold(*GC_THRESHOLD)
    attach = FlowCollector
    if args.cgroup:
        enter_cgroup(args.cgroup)
        attach = functools.partial(FlowCollector, cgroup=args.cgroup)
    with Nginx(workers=args.workers) as nginx:
        for mode in args.modes.split(","):
            ratio, missing = bench_mode(nginx, attach, mode, args)
            over_budget |= ratio < BUDGET_RATIO or missing > 0
    return 1 if over_budget and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
