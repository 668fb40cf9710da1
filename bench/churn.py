"""The agent's cost per connection under connection churn: nginx on loopback, wrk opening a new
connection per request (`Connection: close`) as fast as it can, and the whole `flowbridge run`
(a subprocess) exporting IPFIX to a real nfcapd on loopback; then the same load with softflowd
and with pmacctd (packet-capture exporters, bench/peers.py) in its place, each with its own
nfcapd, so their cost and loss print beside ours.

    python -m bench.churn [--seconds 10] [--connections 32] [--peers softflowd,pmacctd]
                          [--strict]

Prints one JSON line per result {"name", "value", "unit", "peer", "peer_value", "ratio"}, per
exporter (churn_<exporter>_...; flowbridge's lines keep their names churn_...):
- requests/s with the exporter, against the same nginx without it just before (issue 3: at
  most 5% fewer);
- the load's own CPU (nginx workers + wrk) per request, with against without: what the
  exporter costs the traffic, kernel work included, and much steadier than requests/s on a
  shared machine;
- exporter CPU (utime + stime of its process tree, from just before wrk until its flows
  drained) per 1000 connections and as % of one core, against the issue 6 budget: 10% of one
  core at 10,000 connections/s, i.e. 10 ms of CPU per 1000 connections;
- for flowbridge, kernel ns per connection in its BPF programs (run_time_ns);
- connections nginx logged without a flow record in the exporter's nfcapd files (zero lost),
  against the number logged: flowbridge per direction and side, the capture exporters (no
  direction) per side.
wrk cannot pace its rate, so the rate is the highest wrk reaches here, reported as measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import user_system_seconds
from bench.nginx import Nginx, WrkResult, run_wrk
from bench.peers import PEERS
from bench.process import BenchProcess
from bench.results import emit
from ebpf import progstats

BUDGET_MS_PER_1000 = 10.0  # 10% of one core at 10,000 connections/s
BUDGET_RATE_RATIO = 0.95
SOCKET_BUFFER = 4 << 20




class Agent(BenchProcess):
    """`flowbridge run` exporting to one collector; its log goes to a file."""

    stop_timeout_s = 60.0  # on SIGTERM the agent ends every live flow (forced end), exports it

    def __init__(self, collector: tuple[str, int], workdir: Path) -> None:
        super().__init__(workdir / "agent.log")
        exe = Path(sys.executable).with_name("flowbridge")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "bridge.cli"]
        self.argv = argv + [
            "run",
            "--collector",
            f"{collector[0]}:{collector[1]}",
            "--protocol",
            "ipfix",
            "--idle-timeout",
            "5",
            "--log-level",
            "info",
        ]

    def __enter__(self) -> Agent:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=log, cwd=root)
        log.close()
        deadline = time.monotonic() + 90
        while b"exporting to" not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flowbridge run did not start: {self.log()[-2000:]}")
            time.sleep(0.2)
        return self



def records_by_side(flowdir: Path, server_port: int) -> dict[str, Counter[int]]:
    """Client ports of nfcapd's records to/from server_port, per (direction, side)."""
    files = sorted(str(p) for p in flowdir.rglob("nfcapd.*") if "current" not in p.name)
    result: dict[str, Counter[int]] = {}
    for path in files:
        out = subprocess.run(
            ["nfdump", "-q", "-N", "-r", path, "-o", "fmt:%sp %dp %dir", f"port {server_port}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            if not (fields[0].isdigit() and fields[1].isdigit()):
                continue  # "No matching flows" and the like
            sport, dport, direction = int(fields[0]), int(fields[1]), fields[2]
            if dport == server_port:
                result.setdefault(f"to_server_dir{direction}", Counter())[sport] += 1
            elif sport == server_port:
                result.setdefault(f"to_client_dir{direction}", Counter())[dport] += 1
    return result


def missing(logged: Counter[int], seen: Counter[int]) -> int:
    return sum(max(0, n - seen[port]) for port, n in logged.items())


@dataclass
class Arm:
    """One exporter's run under the load."""

    name: str
    without: WrkResult  # the load alone, just before
    attached: WrkResult
    load_cpu_without: float  # nginx + wrk CPU seconds
    load_cpu_attached: float
    connections: int
    cpu_s: float
    elapsed_s: float
    lost: dict[str, int]
    kernel: dict[str, progstats.ProgramCost] = field(default_factory=dict)

    @property
    def cpu_ms_per_1000(self) -> float:
        return self.cpu_s * 1e6 / self.connections if self.connections else 0.0

    @property
    def load_us_per_request(self) -> tuple[float, float]:
        """(with, without) CPU microseconds of nginx + wrk per request."""
        return (self.load_cpu_attached * 1e6 / max(1, self.attached.requests),
                self.load_cpu_without * 1e6 / max(1, self.without.requests))


def wait_idle(exporter, window_s: float = 1.0, idle_share: float = 0.05,
              limit_s: float = 120.0) -> None:
    """Until the exporter used under idle_share of a core for window_s: on a loaded machine it
    may still be working through the load's backlog after the drain time, and that CPU is
    part of its cost per connection."""
    deadline = time.monotonic() + limit_s
    before = exporter.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = exporter.cpu_seconds()
        if now - before < idle_share * window_s:
            return
        before = now


def loaded_run(nginx: Nginx, args: argparse.Namespace) -> tuple[WrkResult, float]:
    """One wrk run: its result, and the CPU seconds nginx and wrk spent on it."""
    nginx_before = nginx.cpu_seconds()
    result = run_wrk(nginx.url, args.seconds, args.connections, True)
    return result, nginx.cpu_seconds() - nginx_before + result.cpu_s


def run_arm(name: str, nginx: Nginx, start: Callable[[tuple[str, int], Path], object],
            args: argparse.Namespace, workdir: Path) -> Arm:
    """The load alone, then with one exporter sending to its own nfcapd."""
    from tests.harness.collector_nfdump import Nfcapd

    without, load_without = loaded_run(nginx, args)
    nfcapd = Nfcapd(workdir=workdir / f"nfcapd-{name}")
    nfcapd.daemon.argv += ["-B", str(SOCKET_BUFFER)]  # 400k records in seconds: no drops
    with nfcapd, start(nfcapd.address, workdir) as exporter:
        time.sleep(2)  # start-up scan and first polls are not part of the measurement
        nginx.truncate_log()
        kernel0 = progstats.snapshot(exporter.pid) if name == "flowbridge" else {}
        cpu0, t0 = exporter.cpu_seconds(), time.monotonic()
        user0, system0 = user_system_seconds(exporter.pid)
        attached, load_attached = loaded_run(nginx, args)
        flush = getattr(exporter, "flush", None)
        if flush is not None:
            flush()
        time.sleep(args.drain)
        wait_idle(exporter)
        cpu1, t1 = exporter.cpu_seconds(), time.monotonic()
        user1, system1 = user_system_seconds(exporter.pid)
        kernel = {}
        if kernel0:
            kernel = progstats.difference(progstats.snapshot(exporter.pid), kernel0)
        exporter.stop()
        log = exporter.log()
        code = exporter.process.returncode if exporter.process is not None else None
        if code not in (0, -15, None):
            print(f"# {name} exited {code}: {log[-2000:]}", file=sys.stderr)
    nfcapd.stop()
    requests, logged = nginx.logged_connections()
    seen = records_by_side(nfcapd.flowdir, nginx.port)
    connections = sum(logged.values())
    if name == "flowbridge":
        sides = ("to_server_dirI", "to_server_dirE", "to_client_dirI", "to_client_dirE")
        lost = {side: missing(logged, seen.get(side, Counter())) for side in sides}
    else:  # a capture has no direction: every record of a side counts
        lost = {}
        for side in ("to_server", "to_client"):
            merged: Counter[int] = Counter()
            for key, counts in seen.items():
                if key.startswith(side):
                    merged.update(counts)
            lost[side] = missing(logged, merged)
    print(f"# {name}: {connections} connections logged ({requests} requests) in "
          f"{args.seconds} s, its CPU {cpu1 - cpu0:.2f} s over {t1 - t0:.1f} s (its main "
          f"process: user {user1 - user0:.2f} s, system {system1 - system0:.2f} s), nfcapd socket "
          f"drops {nfcapd.drops}, records per side "
          f"{ {k: sum(v.values()) for k, v in seen.items()} }, missing per side {lost}",
          file=sys.stderr, flush=True)
    if max(lost.values()):
        print(f"# {name} log (tail): {log[-3000:]}", file=sys.stderr, flush=True)
    return Arm(name, without, attached, load_without, load_attached, connections,
               cpu1 - cpu0, t1 - t0, lost, kernel)


def report(arm: Arm, ours: Arm | None) -> bool:
    """Emit an arm's lines; returns whether flowbridge is over budget (peers never are)."""
    prefix = "churn" if ours is None else f"churn_{arm.name}"
    emit(f"{prefix}_requests_per_s", arm.attached.requests_per_s, "req/s",
         f"nginx without {arm.name}", arm.without.requests_per_s)
    with_us, without_us = arm.load_us_per_request
    emit(f"{prefix}_load_cpu_per_request", with_us, "us", f"nginx+wrk without {arm.name}",
         without_us)
    if ours is None:
        emit(f"{prefix}_agent_cpu_per_1000_connections", arm.cpu_ms_per_1000, "ms",
             "issue 6 budget (10% of a core at 10k conn/s)", BUDGET_MS_PER_1000)
        rate = arm.connections / arm.elapsed_s if arm.elapsed_s else 0.0
        emit(f"{prefix}_agent_cpu_percent_of_core", arm.cpu_s / arm.elapsed_s * 100, "%",
             f"issue 6 budget scaled to {rate:.0f} conn/s", 10.0 * rate / 10_000)
        if arm.kernel and arm.connections:
            print(f"# flowbridge kernel "
                  f"{progstats.describe(arm.kernel, arm.connections, 'connection')}",
                  file=sys.stderr, flush=True)
            emit(f"{prefix}_kernel_ns_per_connection",
                 progstats.total_ns(arm.kernel) / arm.connections, "ns",
                 "agent CPU per connection", arm.cpu_s * 1e9 / arm.connections)
    else:
        emit(f"{prefix}_cpu_per_1000_connections", arm.cpu_ms_per_1000, "ms",
             "flowbridge agent", ours.cpu_ms_per_1000)
    emit(f"{prefix}_connections_missing", max(arm.lost.values()), "connections",
         "nginx access log", arm.connections)
    return ours is None and (
        arm.cpu_ms_per_1000 > BUDGET_MS_PER_1000 or max(arm.lost.values()) > 0
        or arm.attached.requests_per_s < BUDGET_RATE_RATIO * arm.without.requests_per_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per arm")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--drain", type=float, default=4.0,
                        help="seconds after wrk that still count as the exporter's work")
    parser.add_argument("--peers", default="softflowd,pmacctd",
                        help="capture exporters to run on the same load ('' for none)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when over budget")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.churn: needs root (BPF)", file=sys.stderr)
        return 2
    peers = {peer.name: peer for peer in PEERS}
    wanted = [name for name in args.peers.split(",") if name]
    unknown = [name for name in wanted if name not in peers]
    if unknown:
        print(f"bench.churn: unknown peer {unknown[0]!r}; known: {', '.join(peers)}",
              file=sys.stderr)
        return 2
    over = False
    with tempfile.TemporaryDirectory(prefix="fb-churn-") as tmp, Nginx() as nginx, \
            progstats.stats_enabled():
        workdir = Path(tmp)
        run_wrk(nginx.url, 1, args.connections, True)  # warm-up: TIME_WAIT steady state
        ours = run_arm("flowbridge", nginx, Agent, args, workdir)
        over |= report(ours, None)
        for name in wanted:
            if not peers[name].available():
                print(f"# {name} is not installed: skipped", file=sys.stderr, flush=True)
                continue
            report(run_arm(name, nginx, peers[name], args, workdir), ours)
    return 1 if over and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
