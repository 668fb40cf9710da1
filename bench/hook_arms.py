"""What bench.hooks attaches in each arm of its comparison: nothing, empty programs on some of
the collector's hooks (bench/empty_programs.py), the collector's own programs with nobody
reading their results, the collector polled as the agent polls it, or the whole agent.

An arm's `start()` attaches (everything loaded before the measured load starts) and returns a
run; the run's `finish()` detaches and says what the consumer cost and what it saw.
"""

from __future__ import annotations

import mmap
import os
import socket
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.churn import Agent
from bench.cpu import tree_cpu_seconds
from bench.empty_programs import ALL_HOOKS, EmptyHooks
from bench.overhead import ConnectionTally, wait_quiet
from ebpf import bpfsys, progstats
from ebpf.loader import tracefs_mount

RINGBUF_MAP_TYPE = 27  # BPF_MAP_TYPE_RINGBUF


@dataclass
class ArmResult:
    consumer_cpu_s: float = 0.0  # the collector's polling thread or the agent process
    missing: int | None = None  # logged connections without a flow (polled arms)
    losses: dict[str, int] = field(default_factory=dict)  # the collector's counted losses
    kernel: dict[str, progstats.ProgramCost] = field(default_factory=dict)  # stats arms


class Run:
    """An attached arm. `programs_pid`: the process holding its programs (for run_time_ns and
    to tell its programs from anyone else's)."""

    programs_pid: int | str = "self"

    def consumer_cpu_s(self) -> float:
        return 0.0

    def finish(self, logged: Counter[int]) -> ArmResult:
        return ArmResult()


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # none | empty | unpolled | polled | agent
    hooks: tuple[str, ...] = ()  # empty programs: bench.empty_programs.HOOKS names
    stats: bool = False  # BPF statistics on during the round (run_time_ns), else off

    def start(self, cgroup: Path, server_port: int) -> Run:
        if self.kind == "none":
            return Run()
        if self.kind == "empty":
            return EmptyRun(EmptyHooks(self.hooks, cgroup, tracefs_mount()))
        if self.kind == "agent":
            return AgentRun(cgroup)
        from ebpf.collector import FlowCollector  # bcc: only where a collector is wanted

        collector = FlowCollector(cgroup=str(cgroup))
        if self.kind == "unpolled":
            return UnpolledRun(collector)
        return PolledRun(collector, server_port)


class EmptyRun(Run):
    def __init__(self, hooks: EmptyHooks) -> None:
        self.hooks = hooks

    def finish(self, logged: Counter[int]) -> ArmResult:
        self.hooks.close()
        return ArmResult()


def events_ring_fd() -> int:
    """This process's descriptor of the collector's ring buffer (the only ring buffer map it
    holds while one collector is loaded)."""
    for name in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{name}") as f:
                if f"map_type:\t{RINGBUF_MAP_TYPE}\n" in f.read():
                    return int(name)
        except OSError:
            continue
    raise RuntimeError("no ring buffer map among this process's descriptors")


class RingDiscarder:
    """Empties a ring buffer without reading it: the consumer position is moved up to the
    producer's ten times a second, so that the kernel programs' reservations never fail for
    want of room (a full ring makes them cheaper than they are with a reader)."""

    def __init__(self, ring_fd: int) -> None:
        self._consumer = mmap.mmap(ring_fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(ring_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=mmap.PAGESIZE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._consumer[:8] = self._producer[:8]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()
        self._producer.close()


class UnpolledRun(Run):
    """The collector's programs at work with no Python consumer: what the kernel side costs the
    load, apart from the agent's CPU competing with it."""

    def __init__(self, collector) -> None:
        self.collector = collector
        self.discarder = RingDiscarder(events_ring_fd())

    def finish(self, logged: Counter[int]) -> ArmResult:
        self.discarder.close()
        self.collector.close()
        return ArmResult()


class PolledRun(Run):
    """The collector polled as the agent polls it (bench.overhead's ConnectionTally), every
    logged connection checked against its flows."""

    def __init__(self, collector, server_port: int) -> None:
        self.collector = collector
        self.tally = ConnectionTally(collector, server_port).start()

    def consumer_cpu_s(self) -> float:
        return self.tally.cpu_seconds()

    def finish(self, logged: Counter[int]) -> ArmResult:
        try:
            wait_quiet(self.tally)
            cpu = self.tally.cpu_seconds()
            stats = self.collector.stats()
        finally:
            self.tally.stop()
            self.collector.close()
        if self.tally.error is not None:
            raise RuntimeError(f"poll() failed: {self.tally.error!r}")
        losses = {"events_lost": stats.events_lost, "map_full_drops": stats.map_full_drops}
        return ArmResult(cpu, max(self.tally.missing(logged).values()), losses=losses)


class ScopedAgent(Agent):
    """`flowbridge run` with its socket hooks on the benchmark's cgroup only."""

    def __init__(self, collector: tuple[str, int], workdir: Path, cgroup: Path) -> None:
        super().__init__(collector, workdir)
        self.argv += ["--cgroup", str(cgroup)]


class AgentRun(Run):
    """The whole agent exporting IPFIX to a UDP socket nobody reads (the kernel drops what
    does not fit its buffer): its CPU competes with the load's as in production."""

    def __init__(self, cgroup: Path) -> None:
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.workdir = Path(tempfile.mkdtemp(prefix="fb-overhead-agent-"))
        self.agent = ScopedAgent(self.sink.getsockname(), self.workdir, cgroup)
        try:
            self.agent.__enter__()
        except BaseException:
            self.finish(Counter())
            raise
        self.programs_pid = self.agent.pid

    def consumer_cpu_s(self) -> float:
        return tree_cpu_seconds(self.agent.pid)

    def finish(self, logged: Counter[int]) -> ArmResult:
        running = self.agent.process is not None and self.agent.process.poll() is None
        cpu = self.consumer_cpu_s() if running else 0.0
        self.agent.stop()
        self.sink.close()
        for path in self.workdir.iterdir():
            path.unlink()
        self.workdir.rmdir()
        return ArmResult(cpu)


def default_arms() -> list[Arm]:
    """Every hook alone with an empty program, all of them, the real programs unpolled, polled
    and with statistics on, and the agent. Baselines (`none`) are placed by bench.hooks."""
    singles = [Arm(f"empty_{hook}", "empty", (hook,)) for hook in
               ("tc", "sock_ops", "sock_ops_state", "sock_create", "sock_release", "connect",
                "post_bind", "destroy_tp")]
    return singles + [
        Arm("empty_all", "empty", ALL_HOOKS),
        Arm("empty_all_stats", "empty", ALL_HOOKS, stats=True),
        Arm("collector_unpolled", "unpolled"),
        Arm("collector_polled", "polled"),
        Arm("collector_polled_stats", "polled", stats=True),
        Arm("agent", "agent"),
    ]


def own_program_ids(run: Run) -> set[int]:
    ids = progstats.held_program_ids("self")
    if run.programs_pid != "self":
        ids |= progstats.held_program_ids(run.programs_pid)
    return ids


def foreign_programs(cgroup_fd: int, mine: set[int]) -> set[int]:
    """Programs someone else attached that run for this benchmark's traffic: on this
    namespace's `lo` (TCX) or effective on its cgroup (attached to it or to an ancestor)."""
    attached = progstats.tcx_program_ids(1)
    for attach_type in (bpfsys.CGROUP_INET_SOCK_CREATE, bpfsys.CGROUP_INET_SOCK_RELEASE,
                        bpfsys.CGROUP_SOCK_OPS, bpfsys.CGROUP_INET4_CONNECT,
                        bpfsys.CGROUP_INET4_POST_BIND, bpfsys.CGROUP_INET_INGRESS,
                        bpfsys.CGROUP_INET_EGRESS):
        attached |= progstats.cgroup_program_ids(cgroup_fd, attach_type)
    return attached - mine


def ksoftirqd_cpu_seconds() -> float:
    """CPU of the ksoftirqd threads: loopback receive work deferred to them is charged there,
    not to nginx or wrk (shared with every other load on the machine)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("ksoftirqd/"):
                    continue
            total += tree_cpu_seconds(int(pid))
        except OSError:
            continue
    return total
