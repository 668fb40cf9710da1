"""Arms of bench.hooks switched every second under ONE continuous nginx + wrk run: a difference
of 1-2 us per request in ~110 drowns in the drift between separate wrk runs on a shared 2-core
machine, and attaching a program takes a millisecond, so arms can alternate far faster than wrk
runs can.

    ip netns exec NS sh -c 'mount -t cgroup2 none /sys/fs/cgroup &&
        python -m bench.hook_interleave --cgroup fb-hooks [--cycles 10] [--block 1.0]
                                        [--arms a,b] [--agent]'

Arms: empty programs on each of the collector's hooks alone and on all of them
(bench/empty_programs.py); flows.bpf.c's own programs with no consumer (RealPrograms); those two
again with the BPF statistics on (`*_stats`: their run_time_ns per request, and what the
statistics' clock reads cost). With `--agent`, then the whole agent attached throughout,
stopped and running in alternate blocks.

Per block: the scheduler's run time of nginx's workers and wrk's threads (schedstat, exact;
nginx's share apart: with one worker it bounds keep-alive req/s) and the requests nginx logged
in it. Blocks of one arm are compared with the baseline blocks (nothing attached) right before
and after them, of the same marks (bench.hooks.Guard: someone else's programs on this load,
someone else holding the BPF statistics on).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import tree_runtime_ns
from bench.empty_programs import ALL_HOOKS, EmptyHooks
from bench.hook_arms import AgentRun, Arm, RingDiscarder, ksoftirqd_cpu_seconds
from bench.hooks import BASELINE, Guard, neighbour_baselines, schedule
from bench.nginx import Nginx, wrk_argv
from bench.overhead import enter_cgroup
from bench.results import emit
from ebpf import bpfsys, layout, netns, progstats
from ebpf.compiler import compile_in_child
from ebpf.loader import CGROUP_PROGRAMS, RINGBUF_PAGES, LoadedPrograms, tracefs_mount

MAX_FLOWS = 65536  # FlowCollector's default

ARMS = [Arm(f"empty_{hook}", "empty", (hook,)) for hook in
        ("tc", "sock_ops", "sock_ops_state", "sock_create", "sock_release", "connect",
         "destroy_tp")] + [
    Arm("empty_all", "empty", ALL_HOOKS),
    Arm("empty_all_stats", "empty", ALL_HOOKS, stats=True),
    Arm("real", "real"),
    Arm("real_stats", "real", stats=True),
]


class RealPrograms:
    """flows.bpf.c's programs compiled once (ebpf.compiler, as the collector does), attached
    and detached per block like the empty ones: on this cgroup and this namespace's lo. No
    consumer: the ring buffer is emptied unread (bench.hook_arms.RingDiscarder). Without the
    tcp_destroy_sock tracepoint (it cannot be re-attached; the empty destroy_tp arm and one
    map lookup per destroyed socket stand in for it)."""

    def __init__(self, cgroup: Path) -> None:
        compiled = compile_in_child(MAX_FLOWS, MAX_FLOWS, RINGBUF_PAGES)
        for fd in compiled.tracepoint_fds:
            os.close(fd)
        compiled.tracepoint_fds.clear()
        self.loaded = LoadedPrograms(compiled, cgroup)
        self.loaded.cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        self.counting = self.loaded.tc_programs(netns.cookie_here())
        self.discarder = RingDiscarder(compiled.maps["events"])

    def attach(self) -> None:
        links = self.loaded.link_fds
        for func, _, attach_type in CGROUP_PROGRAMS:
            links.append(bpfsys.link_create(self.loaded.compiled.programs[func],
                                            self.loaded.cgroup_fd, attach_type))
        links.append(bpfsys.link_create(self.counting.loopback, 1, bpfsys.TCX_EGRESS))

    def detach(self) -> None:
        """Detach, and empty the flow map: with no agent to end them, flows the kernel did not
        finalise (a late ACK after a finalised connection, connections open across a switch)
        would fill it, and a full map makes the programs cheaper than they are."""
        if not self.loaded.link_fds:
            return
        for fd in self.loaded.link_fds:
            os.close(fd)
        self.loaded.link_fds.clear()
        flows = self.loaded.table_fd("flows")
        for keys, _ in bpfsys.BatchReader(flows, layout.FLOW_KEY.size, layout.FLOW_VAL.size
                                          ).read():
            for at in range(0, len(keys), layout.FLOW_KEY.size):
                bpfsys.delete(flows, keys[at:at + layout.FLOW_KEY.size])

    def losses(self) -> dict[str, int]:
        """The programs' counted losses so far (a full map, a full ring buffer)."""
        totals = self.loaded.counter_totals(len(layout.CTR_NAMES))
        return {name: total for name, total in zip(layout.CTR_NAMES, totals, strict=True)
                if total and ("full" in name or "lost" in name)}

    def close(self) -> None:
        self.detach()
        self.discarder.close()
        self.counting.close()
        self.loaded.close()


class LoadMeter:
    """nginx + a running wrk: their threads' run time and the requests nginx logged so far."""

    def __init__(self, nginx: Nginx, wrk_pid: int) -> None:
        assert nginx.process is not None
        self.pids = (nginx.process.pid, wrk_pid)
        self._log = open(nginx.log_path, "rb")  # noqa: SIM115 - closed by close()
        self._log.seek(0, os.SEEK_END)
        self.requests = 0

    def read(self) -> tuple[int, int, int]:
        """(nginx's run time, wrk's, requests) so far."""
        self.requests += self._log.read().count(b"\n")
        nginx, wrk = (tree_runtime_ns(pid) for pid in self.pids)
        return nginx, wrk, self.requests

    def close(self) -> None:
        self._log.close()


@dataclass
class Block:
    arm: Arm
    index: int
    runtime_ns: int  # nginx + wrk
    nginx_ns: int  # nginx alone: with one worker, what bounds keep-alive req/s
    requests: int
    seconds: float
    ksoftirqd_s: float
    foreign: set[str]
    stats_holders: set[int]
    kernel: dict[str, progstats.ProgramCost]

    @property
    def marks(self) -> tuple[frozenset[str], bool]:
        return frozenset(self.foreign), bool(self.stats_holders)

    @property
    def us_per_request(self) -> float:
        return self.runtime_ns / 1000 / max(1, self.requests)

    @property
    def nginx_us_per_request(self) -> float:
        return self.nginx_ns / 1000 / max(1, self.requests)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def run_block(arm: Arm, index: int, meter: LoadMeter, cgroup: Path, cgroup_fd: int,
              seconds: float, real: RealPrograms, also_mine: frozenset[int] = frozenset()
              ) -> Block:
    hooks = EmptyHooks(arm.hooks, cgroup, tracefs_mount()) if arm.hooks else None
    if arm.kind == "real":
        real.attach()
    try:
        mine = progstats.held_program_ids() | also_mine
        stats = progstats.stats_enabled() if arm.stats else contextlib.nullcontext()
        with stats:
            time.sleep(0.05)  # requests begun before the switch end in the settle time
            guard = Guard(cgroup_fd, mine)
            start, (nginx0, wrk0, requests0) = time.monotonic(), meter.read()
            softirq0, kernel0 = ksoftirqd_cpu_seconds(), own_costs(arm)
            time.sleep(seconds)
            nginx1, wrk1, requests1 = meter.read()
            elapsed = time.monotonic() - start
            softirq = ksoftirqd_cpu_seconds() - softirq0
            kernel = progstats.difference(own_costs(arm), kernel0)
            guard.stop()
    finally:
        if hooks is not None:
            hooks.close()
        real.detach()
    return Block(arm, index, nginx1 + wrk1 - nginx0 - wrk0, nginx1 - nginx0,
                 requests1 - requests0, elapsed, softirq,
                 guard.foreign, guard.stats_holders, kernel)


def own_costs(arm: Arm) -> dict[str, progstats.ProgramCost]:
    """run_time_ns so far of this process's programs (statistics arms only): the TC ones on
    this namespace's lo, the cgroup ones on the benchmark's cgroup."""
    if not arm.stats:
        return {}
    costs = progstats.snapshot(tc_ifindexes=(1,))
    empty = arm.kind == "empty"  # the real programs stay loaded, detached, in empty blocks
    return {name: cost for name, cost in costs.items() if name.startswith("empty_") == empty}


def summarize(mode: str, blocks: list[Block]) -> None:
    print(f"# {mode}: arm | blocks (clean) | nginx+wrk us/request | delta us (median, "
          "quartiles) | of which nginx | req/s ratio | ksoftirqd delta us | run_time_ns per "
          "request",
          file=sys.stderr)
    for arm in dict.fromkeys(b.arm for b in blocks):
        deltas, nginx, ratios, soft, clean = [], [], [], [], 0
        for block in (b for b in blocks if b.arm == arm):
            near = neighbour_baselines(blocks, block) if arm.kind != "none" else [block]
            if not near:
                continue
            clean += not block.foreign and not block.stats_holders
            deltas.append(block.us_per_request - statistics.mean(b.us_per_request for b in near))
            nginx.append(block.nginx_us_per_request
                         - statistics.mean(b.nginx_us_per_request for b in near))
            ratios.append(block.rate / statistics.mean(b.rate for b in near))
            soft.append((block.ksoftirqd_s - statistics.mean(b.ksoftirqd_s for b in near))
                        * 1e6 / max(1, block.requests))
        if len(deltas) < 2:
            continue
        mine = [b for b in blocks if b.arm == arm]
        requests = sum(b.requests for b in mine)
        costs = progstats.merged(b.kernel for b in mine)
        kernel = progstats.total_ns(costs) / max(1, requests)
        quartiles = statistics.quantiles(deltas, n=4)
        print(f"# {mode}: {arm.name:22s} {len(deltas):3d} ({clean:3d}) "
              f"{statistics.median(b.us_per_request for b in mine):7.1f} "
              f"{statistics.median(deltas):+6.2f} ({quartiles[0]:+.2f}..{quartiles[2]:+.2f}) "
              f"{statistics.median(nginx):+6.2f} "
              f"{statistics.median(ratios):6.3f} {statistics.median(soft):+6.2f}"
              + (f" {kernel:6.0f}" if kernel else ""), file=sys.stderr)
        if kernel:
            print(f"# {mode}: {arm.name} "
                  f"{progstats.describe(costs, requests, 'request')}",
                  file=sys.stderr)
        if arm.kind != "none":
            emit(f"hook_interleave_{mode}_{arm.name}_extra_cpu_per_request",
                 statistics.median(deltas), "us", "nginx+wrk CPU per request, nothing attached",
                 statistics.median(b.us_per_request for b in blocks if b.arm.kind == "none"))
    sys.stderr.flush()


def bench_mode(mode: str, nginx: Nginx, cgroup: Path, cgroup_fd: int,
               args: argparse.Namespace, real: RealPrograms) -> list[Block]:
    arms = [a for a in ARMS if not args.arms or a.name in args.arms.split(",")]
    order = [schedule(arms, 1, rotation) for rotation in range(args.cycles)]
    count = sum(len(o) for o in order) + (2 * args.cycles if args.agent else 0)
    seconds = int(count * (args.block + 0.5)) + 120  # wrk outlasts us (and the agent's start)
    wrk = subprocess.Popen(wrk_argv(nginx.url, seconds, args.connections, mode == "close"),
                           stdout=subprocess.DEVNULL)
    meter = LoadMeter(nginx, wrk.pid)
    blocks: list[Block] = []
    try:
        time.sleep(1.0)  # warm-up
        for rotation in order:
            for arm in rotation:
                if blocks and blocks[-1].arm == arm == BASELINE:
                    continue  # schedule() ends and starts a rotation with a baseline
                block = run_block(arm, len(blocks), meter, cgroup, cgroup_fd, args.block,
                                  real)
                blocks.append(block)
        summarize(mode, blocks)
        print(f"# {mode}: the real programs' losses so far {real.losses()}", file=sys.stderr)
        if args.agent:
            agent_blocks = agent_phase(meter, cgroup, cgroup_fd, args, real)
            print(f"# {mode}: agent_running against agent_stopped is twice the agent's "
                  "steady effect (a stopped agent's backlog is worked off in the next running "
                  "block)", file=sys.stderr)
            summarize(mode, agent_blocks)
    finally:
        wrk.send_signal(signal.SIGINT)
        wrk.wait(timeout=30)
        meter.close()
    return blocks


AGENT_STOPPED = Arm("agent_stopped", "none")
AGENT_RUNNING = Arm("agent_running", "agent")


def agent_phase(meter: LoadMeter, cgroup: Path, cgroup_fd: int, args: argparse.Namespace,
                real: RealPrograms) -> list[Block]:
    """The whole agent (bench.hook_arms.AgentRun) attached throughout, stopped (SIGSTOP: its
    programs run, nobody reads) and running in alternate blocks: what its CPU on the same two
    cores costs the load, apart from its programs."""
    run = AgentRun(cgroup)
    blocks: list[Block] = []
    try:
        agent_programs = frozenset(progstats.held_program_ids(run.agent.pid))
        os.kill(run.agent.pid, signal.SIGSTOP)
        for _ in range(args.cycles):
            for arm in (AGENT_STOPPED, AGENT_RUNNING):
                if arm is AGENT_RUNNING:
                    os.kill(run.agent.pid, signal.SIGCONT)
                blocks.append(run_block(arm, len(blocks), meter, cgroup, cgroup_fd,
                                        args.block, real, agent_programs))
                if arm is AGENT_RUNNING:
                    os.kill(run.agent.pid, signal.SIGSTOP)
    finally:
        os.kill(run.agent.pid, signal.SIGCONT)
        run.finish(Counter())
    return blocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10, help="rotations through every arm")
    parser.add_argument("--block", type=float, default=1.0, help="seconds per arm and block")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--modes", default="close,keepalive")
    parser.add_argument("--cgroup", default="fb-hooks")
    parser.add_argument("--agent", action="store_true",
                        help="then the whole agent, stopped and running in alternate blocks")
    parser.add_argument("--arms", help="comma-separated arm names (default: all): "
                        + ", ".join(a.name for a in ARMS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.hook_interleave: needs root (BPF)", file=sys.stderr)
        return 2
    cgroup = enter_cgroup(args.cgroup)
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    real = RealPrograms(cgroup)
    try:
        with Nginx() as nginx:
            for mode in args.modes.split(","):
                bench_mode(mode, nginx, cgroup, cgroup_fd, args, real)
    finally:
        real.close()
        os.close(cgroup_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
