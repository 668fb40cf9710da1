"""Where the traffic's extra CPU goes with the collector attached: the same nginx + wrk load
(HTTP/1.1 `Connection: close` and keep-alive on loopback) in alternating arms of one run:
nothing attached; an empty program (returns at once) on each of the collector's hooks alone and
on all of them; the collector's own programs with nobody reading them; the collector polled as
the agent polls it; the whole agent (`flowbridge run`) exporting. See bench/hook_arms.py.

    ip netns exec NS sh -c 'mount -t cgroup2 none /sys/fs/cgroup &&
        python -m bench.hooks --cgroup fb-hooks [--rounds 3] [--seconds 5] [--arms a,b]'

Per arm: the CPU nginx and wrk spend per request (bench/cpu.py) and its difference from the
baseline rounds next to it in time, req/s as a ratio to them; for `*_stats` arms the programs'
run_time_ns per request (BPF statistics are off in every other arm: they cost two clock reads
per program run); for arms with a consumer its CPU per 1000 requests. A round during which a
program someone else attached ran for this load (on this namespace's `lo`, or effective on its
cgroup: another collector's hooks on the root cgroup) or someone held the BPF statistics on is
marked: an arm's round is compared only with baselines of the same marks (on a machine shared
with other benchmarks a clean round can be rare; what another collector adds to both rounds
mostly cancels out in the difference), and the table says how many rounds were clean.

Prints one JSON line per arm and mode (bench/results.py) and a table on stderr. Each round is a
wrk run of its own: on a loaded machine their drift (+-10 us per request of ~110) hides what
empty programs cost; bench.hook_interleave switches those (and the collector's programs without
a consumer) every second under one wrk run. Here: what needs a collector or an agent started.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from bench.hook_arms import (
    Arm,
    ArmResult,
    Run,
    default_arms,
    foreign_programs,
    ksoftirqd_cpu_seconds,
    own_program_ids,
)
from bench.nginx import Nginx, WrkResult, run_wrk
from bench.overhead import enter_cgroup, loaded_run
from bench.results import emit
from ebpf import progstats

BASELINE = Arm("none", "none")


class Guard:
    """Watches, while a round runs, for programs someone else attached that run for this load,
    and for other holders of the BPF statistics (which slow every program run)."""

    def __init__(self, cgroup_fd: int, mine: set[int], interval_s: float = 0.5) -> None:
        self.cgroup_fd, self.mine, self.interval_s = cgroup_fd, mine, interval_s
        self.foreign: set[str] = set()
        self.stats_holders: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _check(self) -> None:
        for prog_id in foreign_programs(self.cgroup_fd, self.mine):
            try:
                self.foreign.add(progstats.program_name_by_id(prog_id))
            except OSError:
                self.foreign.add(f"id {prog_id}")  # detached meanwhile: it ran all the same
        self.stats_holders.update(set(progstats.stats_holders()) - {os.getpid()})

    def _run(self) -> None:
        self._check()
        while not self._stop.wait(self.interval_s):
            self._check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._check()

    @property
    def clean(self) -> bool:
        return not self.foreign and not self.stats_holders


@dataclass
class Round:
    arm: Arm
    index: int  # position in the mode's sequence of rounds: baselines are found by it
    result: WrkResult
    load_cpu_s: float  # nginx workers + wrk
    ksoftirqd_s: float
    consumer_cpu_s: float
    outcome: ArmResult
    kernel: dict[str, progstats.ProgramCost] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)
    stats_holders: set[int] = field(default_factory=set)

    @property
    def clean(self) -> bool:
        return not self.foreign and not self.stats_holders

    @property
    def marks(self) -> tuple[frozenset[str], bool]:
        """What else ran for this round's traffic: rounds of equal marks are comparable."""
        return frozenset(self.foreign), bool(self.stats_holders)

    @property
    def us_per_request(self) -> float:
        return self.load_cpu_s * 1e6 / max(1, self.result.requests)

    def line(self, mode: str) -> str:
        text = (f"# {mode} #{self.index} {self.arm.name}: {self.result.requests_per_s:.0f} "
                f"req/s, {self.us_per_request:.1f} us/request nginx+wrk, ksoftirqd "
                f"{self.ksoftirqd_s * 1e6 / max(1, self.result.requests):.2f} us/request")
        if self.consumer_cpu_s:
            text += f", consumer {self.consumer_cpu_s * 1e3:.0f} ms"
        if self.outcome.missing is not None:
            text += f", missing {self.outcome.missing} (collector's losses {self.outcome.losses})"
        if self.kernel:
            text += ", kernel " + progstats.describe(self.kernel, self.result.requests,
                                                     "request")
        if not self.clean:
            text += (f", NOT CLEAN (foreign programs {sorted(self.foreign)}, statistics held "
                     f"by {sorted(self.stats_holders)})")
        return text


def measure(arm: Arm, index: int, nginx: Nginx, cgroup: Path, cgroup_fd: int,
            args: argparse.Namespace, close: bool) -> Round:
    run: Run = arm.start(cgroup, nginx.port)
    kernel: dict[str, progstats.ProgramCost] = {}
    try:
        time.sleep(0.3)  # a new collector's first polls (pre-existing flows) are not measured
        nginx.truncate_log()
        guard = Guard(cgroup_fd, own_program_ids(run))
        stats = progstats.stats_enabled() if arm.stats else contextlib.nullcontext()
        with stats:
            kernel_before = costs(run) if arm.stats else {}
            consumer_before, softirq_before = run.consumer_cpu_s(), ksoftirqd_cpu_seconds()
            result, load_cpu = loaded_run(nginx, args.seconds, args.connections, close)
            softirq = ksoftirqd_cpu_seconds() - softirq_before
            if arm.stats:
                kernel = progstats.difference(costs(run), kernel_before)
        guard.stop()
    except BaseException:
        run.finish(nginx.logged_connections()[1])
        raise
    outcome = run.finish(nginx.logged_connections()[1])
    consumer = outcome.consumer_cpu_s - consumer_before if outcome.consumer_cpu_s else 0.0
    return Round(arm, index, result, load_cpu, softirq, consumer, outcome, kernel,
                 guard.foreign, guard.stats_holders)


def costs(run: Run) -> dict[str, progstats.ProgramCost]:
    """The arm's programs' cumulative run time, TC programs only those on this namespace's lo."""
    return progstats.snapshot(run.programs_pid, tc_ifindexes=(1,))


def schedule(arms: list[Arm], baseline_every: int, rotation: int) -> list[Arm]:
    """One rotation: a baseline before, between every `baseline_every` arms and after; every
    other rotation reversed, so that no arm always follows the same one."""
    order = [BASELINE]
    for start in range(0, len(arms), baseline_every):
        order += arms[start:start + baseline_every] + [BASELINE]
    return order if rotation % 2 == 0 else order[::-1]


class Measured(Protocol):
    """A round of one arm (a Round here, a Block of bench.hook_interleave)."""

    arm: Arm
    index: int

    @property
    def marks(self) -> tuple[frozenset[str], bool]: ...


M = TypeVar("M", bound=Measured)


def neighbour_baselines(rounds: list[M], measured: M) -> list[M]:
    """The baseline rounds of the same marks nearest before and after `measured`."""
    baselines = [r for r in rounds if r.arm.kind == "none" and r.marks == measured.marks]
    before = [r for r in baselines if r.index < measured.index][-1:]
    after = [r for r in baselines if r.index > measured.index][:1]
    return before + after


@dataclass
class ArmSummary:
    arm: Arm
    rounds: int  # compared with a baseline
    clean: int  # of which nothing else ran for the load
    us_per_request: float
    delta_us: float  # against the neighbouring baselines, median over rounds
    rate_ratio: float
    ksoftirqd_delta_us: float
    consumer_ms_per_1000: float
    missing: int | None
    kernel_ns: float | None  # statistics arms: run_time_ns per request


def summarize(rounds: list[Round]) -> list[ArmSummary]:
    summaries = []
    for arm in dict.fromkeys(r.arm for r in rounds):
        mine = []
        deltas, ratios, soft = [], [], []
        for r in (r for r in rounds if r.arm == arm):
            near = neighbour_baselines(rounds, r) if arm.kind != "none" else [r]
            if not near:
                continue
            mine.append(r)
            deltas.append(r.us_per_request - statistics.mean(b.us_per_request for b in near))
            ratios.append(r.result.requests_per_s
                          / statistics.mean(b.result.requests_per_s for b in near))
            soft.append((r.ksoftirqd_s - statistics.mean(b.ksoftirqd_s for b in near))
                        * 1e6 / max(1, r.result.requests))
        if not mine or not deltas:
            continue
        requests = sum(r.result.requests for r in mine)
        kernel = progstats.merged(r.kernel for r in mine)
        missing = [r.outcome.missing for r in mine if r.outcome.missing is not None]
        summaries.append(ArmSummary(
            arm, len(mine), sum(r.clean for r in mine),
            statistics.median(r.us_per_request for r in mine),
            statistics.median(deltas), statistics.median(ratios), statistics.median(soft),
            sum(r.consumer_cpu_s for r in mine) * 1e6 / requests,
            sum(missing) if missing else None,
            progstats.total_ns(kernel) / requests if kernel else None,
        ))
        if kernel:
            print(f"# {arm.name}: kernel {progstats.describe(kernel, requests, 'request')}",
                  file=sys.stderr)
    return summaries


def report(mode: str, summaries: list[ArmSummary]) -> None:
    print(f"# {mode}: arm | rounds (clean) | nginx+wrk us/request | delta us | req/s ratio | "
          "ksoftirqd delta us | consumer ms/1000 | missing | kernel ns/request (stats)",
          file=sys.stderr)
    for s in summaries:
        print(f"# {mode}: {s.arm.name:24s} {s.rounds:2d} ({s.clean:2d}) {s.us_per_request:7.1f} "
              f"{s.delta_us:+6.2f} {s.rate_ratio:6.3f} {s.ksoftirqd_delta_us:+6.2f} "
              f"{s.consumer_ms_per_1000:7.1f} {'-' if s.missing is None else s.missing:>5} "
              f"{'-' if s.kernel_ns is None else f'{s.kernel_ns:.0f}'}", file=sys.stderr)
        if s.arm.kind == "none":
            continue
        emit(f"hooks_{mode}_{s.arm.name}_extra_cpu_per_request", s.delta_us, "us",
             "nginx+wrk CPU per request without anything attached", s.us_per_request - s.delta_us)
        emit(f"hooks_{mode}_{s.arm.name}_requests_per_s_ratio", s.rate_ratio, "ratio",
             "issue 3 budget", 0.95)
    sys.stderr.flush()


def bench_mode(mode: str, arms: list[Arm], nginx: Nginx, cgroup: Path, cgroup_fd: int,
               args: argparse.Namespace) -> list[ArmSummary]:
    close = mode == "close"
    run_wrk(nginx.url, 1, args.connections, close)  # warm-up: caches, TIME_WAIT steady state
    rounds: list[Round] = []
    for rotation in range(args.rounds):
        for arm in schedule(arms, args.baseline_every, rotation):
            if rounds and rounds[-1].arm == arm == BASELINE:
                continue  # a rotation ends and the next begins with a baseline
            done = measure(arm, len(rounds), nginx, cgroup, cgroup_fd, args, close)
            rounds.append(done)
            print(done.line(mode), file=sys.stderr, flush=True)
    summaries = summarize(rounds)
    report(mode, summaries)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rotations through every arm")
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per round")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--modes", default="close,keepalive")
    parser.add_argument("--arms", help="comma-separated arm names (default: all)")
    parser.add_argument("--baseline-every", type=int, default=3,
                        help="arms between two baseline rounds")
    parser.add_argument("--cgroup", default="fb-hooks",
                        help="cgroup v2 directory (under the root) to run in; the arms' socket "
                        "hooks attach there")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.hooks: needs root (BPF)", file=sys.stderr)
        return 2
    arms = default_arms()
    if args.arms:
        wanted = args.arms.split(",")
        unknown = set(wanted) - {a.name for a in arms}
        if unknown:
            print(f"bench.hooks: unknown arms {sorted(unknown)}", file=sys.stderr)
            return 2
        arms = [a for a in arms if a.name in wanted]
    # The polled collector collects garbage as seldom as the agent does (bench.overhead).
    from bridge.agent import GC_THRESHOLD

    gc.set_threshold(*GC_THRESHOLD)
    cgroup = enter_cgroup(args.cgroup)
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Nginx() as nginx:
            for mode in args.modes.split(","):
                bench_mode(mode, arms, nginx, cgroup, cgroup_fd, args)
    finally:
        os.close(cgroup_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
