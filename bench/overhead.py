"""Cost of the eBPF collector to the traffic it watches: nginx requests/s under wrk with the
collector attached (and polled, as the agent polls it) and without, alternating rounds in one run,
for new-connection-per-request (`Connection: close`) and keep-alive HTTP/1.1 on loopback.

Also a correctness check under load: every connection nginx logged must appear in the
collector's flows (matched per client port, nginx's connection serial telling connections apart).

    python -m bench.overhead [--rounds 4] [--seconds 5] [--strict]

One JSON line per result: {"name", "value", "unit", "peer", "peer_value", "ratio"}; the peer is
the same nginx without the collector (for the missing-connections lines: nginx's access log).
Budget: at most 5% fewer requests/s, zero missing connections (`--strict` exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from bench.nginx import Nginx, WrkResult, run_wrk
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
                for observation in self.source.poll(self.poll_timeout_ms):
                    key = observation.key
                    self.observations += 1
                    if key.dst_port == port:
                        self.flows[key.direction].add((key.src_port, observation.first_ms))
                    elif key.src_port == port:
                        self.flows[key.direction].add((key.dst_port, observation.first_ms))
        except BaseException as exc:  # reported by the benchmark, never swallowed
            self.error = exc

    def count(self) -> int:
        return sum(len(f) for f in self.flows.values())

    def missing(self, logged: Counter[int]) -> dict[Direction, int]:
        """Per direction: logged connections with no flow of their client port."""
        result = {}
        for direction, flows in self.flows.items():
            seen = Counter(client_port for client_port, _ in flows)
            result[direction] = sum(max(0, n - seen[port]) for port, n in logged.items())
        return result


def wait_quiet(tally: ConnectionTally, settle_s: float = 1.5, limit_s: float = 15.0) -> None:
    """Until the tally stops growing: end-of-flow events of the last connections drain."""
    deadline = time.monotonic() + limit_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_count = tally.count()
        if now_count != last:
            last, last_change = now_count, time.monotonic()
        elif time.monotonic() - last_change >= settle_s:
            return
        time.sleep(0.1)


def measured_round(nginx: Nginx, attach: Callable[[], object] | None, seconds: int,
                   connections: int, close: bool) -> tuple[WrkResult, dict | None]:
    """One wrk run; with `attach` the collector is loaded and polled during it and the logged
    connections are matched against its flows."""
    if attach is None:
        nginx.truncate_log()
        return run_wrk(nginx.url, seconds, connections, close), None
    collector = attach()
    tally = ConnectionTally(collector, nginx.port).start()
    try:
        time.sleep(0.3)  # the first polls of pre-existing flows are not part of the measurement
        nginx.truncate_log()
        result = run_wrk(nginx.url, seconds, connections, close)
        wait_quiet(tally)
    finally:
        tally.stop()
        collector.close()
    if tally.error is not None:
        raise RuntimeError(f"poll() failed: {tally.error!r}")
    requests, logged = nginx.logged_connections()
    missing = tally.missing(logged)
    best = min(missing, key=missing.get)
    return result, {"requests_logged": requests, "connections_logged": sum(logged.values()),
                    "missing": missing[best], "direction": best.name,
                    "missing_by_direction": {d.name: n for d, n in missing.items()},
                    "flows_seen": tally.count(), "observations": tally.observations}


def emit(name: str, value: float, unit: str, peer: str, peer_value: float) -> None:
    ratio = value / peer_value if peer_value else None
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, "peer": peer,
                      "peer_value": round(peer_value, 3),
                      "ratio": None if ratio is None else round(ratio, 4)}), flush=True)


def bench_mode(nginx: Nginx, attach: Callable[[], object], mode: str, args: argparse.Namespace
               ) -> tuple[float, int]:
    close = mode == "close"
    run_wrk(nginx.url, 1, args.connections, close)  # warm-up: caches, TIME_WAIT steady state
    rates: dict[bool, list[float]] = {False: [], True: []}
    checks = []
    for index in range(args.rounds):
        order = (False, True) if index % 2 == 0 else (True, False)  # ABBA against drift
        for attached in order:
            result, check = measured_round(nginx, attach if attached else None, args.seconds,
                                           args.connections, close)
            rates[attached].append(result.requests_per_s)
            print(f"# {mode} round {index} {'with' if attached else 'without'} collector: "
                  f"{result.requests_per_s:.0f} req/s, {result.socket_errors} socket errors"
                  + (f", {json.dumps(check)}" if check else ""), file=sys.stderr, flush=True)
            if check:
                checks.append(check)
    with_collector = statistics.median(rates[True])
    without = statistics.median(rates[False])
    paired = [round(w / wo, 3) for w, wo in zip(rates[True], rates[False], strict=True)]
    print(f"# {mode}: with/without per round (adjacent in time) {paired}, "
          f"spread without collector {min(rates[False]):.0f}..{max(rates[False]):.0f} req/s",
          file=sys.stderr, flush=True)
    emit(f"nginx_{mode}_requests_per_s", with_collector, "req/s", "nginx without collector",
         without)
    missing = sum(c["missing"] for c in checks)
    logged = sum(c["connections_logged"] for c in checks)
    emit(f"nginx_{mode}_connections_missing", missing, "connections", "nginx access log",
         logged)
    return with_collector / without, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per arm and mode")
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per round")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="nginx worker_processes")
    parser.add_argument("--modes", default="close,keepalive")
    parser.add_argument("--strict", action="store_true", help="exit 1 when over budget")
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
    with Nginx(workers=args.workers) as nginx:
        for mode in args.modes.split(","):
            ratio, missing = bench_mode(nginx, FlowCollector, mode, args)
            over_budget |= ratio < BUDGET_RATIO or missing > 0
    return 1 if over_budget and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
