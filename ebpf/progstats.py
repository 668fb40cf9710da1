"""Kernel CPU spent in a process's BPF programs: run_time_ns / run_cnt per program name.

The kernel keeps these per program only while statistics are enabled (they cost two clock
reads per run, so they are off by default): `stats_enabled()` holds a BPF_ENABLE_STATS file
descriptor, which is reference counted by the kernel, so that it does not switch off the
statistics of anyone else (as writing the `kernel.bpf_stats_enabled` sysctl back would).
Programs are found among a process's file descriptors (/proc/PID/fdinfo shows run_time_ns and
run_cnt for a program fd) and named with BPF_OBJ_GET_INFO_BY_FD on a descriptor of our own
(BPF_PROG_GET_FD_BY_ID: root only). Programs of one name (a copy of each TC program per
network namespace) are summed. The benchmarks report kernel ns per connection from it.

On a shared machine the counting programs also run for other namespaces' traffic (a copy per
namespace): `snapshot(tc_ifindexes=...)` counts only the TCX programs attached to those
interfaces of the caller's namespace (BPF_PROG_QUERY), so that a benchmark run in a namespace
(and a cgroup, for the socket hooks) of its own measures its own connections only. What still
runs for such a benchmark's traffic from outside (another collector's programs on the root
cgroup: `cgroup_program_ids`, or on its `lo`: `tcx_program_ids`, set against
`held_program_ids`) and who else holds the statistics on (`stats_holders`) can be checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ebpf import bpfsys

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_TASK_FD_QUERY = 20
BPF_ENABLE_STATS = 32
BPF_F_QUERY_EFFECTIVE = 1
PROG_TYPE_SCHED_CLS = 3
BPF_STATS_RUN_TIME = 0
_INFO_NAME_OFFSET = 64  # struct bpf_prog_info: char name[16] (stable since Linux 4.15)
_INFO_LEN = 80


@dataclass(frozen=True)
class ProgramCost:
    run_time_ns: int
    run_cnt: int

    def __add__(self, other: ProgramCost) -> ProgramCost:
        return ProgramCost(self.run_time_ns + other.run_time_ns, self.run_cnt + other.run_cnt)

    def __sub__(self, other: ProgramCost) -> ProgramCost:
        return ProgramCost(self.run_time_ns - other.run_time_ns, self.run_cnt - other.run_cnt)

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else 0.0


NO_COST = ProgramCost(0, 0)


def program_name(fd: int) -> str:
    info = ctypes.create_string_buffer(_INFO_LEN)
    attr = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, fd, _INFO_LEN, ctypes.addressof(info))
    bpfsys._bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw[_INFO_NAME_OFFSET : _INFO_NAME_OFFSET + 16].split(b"\0", 1)[0].decode()


def program_name_by_id(prog_id: int) -> str:
    attr = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
    struct.pack_into("<I", attr, 0, prog_id)
    fd = bpfsys._bpf(BPF_PROG_GET_FD_BY_ID, attr)
    try:
        return program_name(fd)
    finally:
        os.close(fd)


def _program_fds(pid: int | str) -> Iterator[tuple[int, dict[str, str]]]:
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # closed meanwhile
        if "run_cnt" in fields and "prog_type" in fields:
            yield int(name), {k: v.strip() for k, v in fields.items()}


def _tracepoint_program_fds(pid: int | str) -> Iterator[tuple[int, dict[str, str]]]:
    """Programs attached through a process's perf event descriptors (bcc's tracepoints: the
    process holds the perf event, not the program), each as a descriptor of our own and its
    fdinfo fields; closed after use."""
    task = os.getpid() if pid == "self" else int(pid)
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[perf_event]":
                continue
        except OSError:
            continue
        attr = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
        # struct bpf_attr.task_fd_query: pid, fd, flags, buf_len, buf, prog_id (out), ...
        struct.pack_into("<IIIIQ", attr, 0, task, int(name), 0, 0, 0)
        try:
            bpfsys._bpf(BPF_TASK_FD_QUERY, attr)
            (prog_id,) = struct.unpack_from("<I", attr, 24)
            get = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
            struct.pack_into("<I", get, 0, prog_id)
            fd = bpfsys._bpf(BPF_PROG_GET_FD_BY_ID, get)
        except bpfsys.BpfError:
            continue  # no program on this perf event, or it went meanwhile
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            yield fd, {k: v.strip() for k, v in fields.items()}
        finally:
            os.close(fd)


def _query(target: int, attach_type: int, flags: int = 0) -> set[int]:
    """BPF_PROG_QUERY: ids of the programs attached to a target (an ifindex for TCX, a cgroup
    fd for cgroup hooks); an interface that went meanwhile has none."""
    prog_ids = (ctypes.c_uint32 * 1024)()  # more than any target carries (else ENOSPC)
    attr = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
    # struct bpf_attr.query: target_ifindex or target_fd, attach_type, query_flags,
    # attach_flags, prog_ids (pointer), prog_cnt (in: room, out: count)
    struct.pack_into("<IIIIQI", attr, 0, target, attach_type, flags, 0,
                     ctypes.addressof(prog_ids), len(prog_ids))
    try:
        bpfsys._bpf(BPF_PROG_QUERY, attr)
    except bpfsys.BpfError as exc:
        if exc.errno == errno.ENODEV:
            return set()
        raise
    (count,) = struct.unpack_from("<I", attr, 24)
    return set(prog_ids[: min(count, len(prog_ids))])


def tcx_program_ids(ifindex: int) -> set[int]:
    """Ids of the TCX programs (ingress and egress) attached to an interface of the calling
    thread's network namespace."""
    return _query(ifindex, bpfsys.TCX_INGRESS) | _query(ifindex, bpfsys.TCX_EGRESS)


def cgroup_program_ids(cgroup_fd: int, attach_type: int) -> set[int]:
    """Ids of the programs that run for a cgroup's sockets at one hook: its own and those
    attached to its ancestors (the effective set), whoever attached them."""
    return _query(cgroup_fd, attach_type, BPF_F_QUERY_EFFECTIVE)


def held_program_ids(pid: int | str = "self") -> set[int]:
    """Ids of the BPF programs a process holds a descriptor of."""
    return {int(fields["prog_id"]) for _fd, fields in _program_fds(pid) if "prog_id" in fields}


def stats_holders() -> list[int]:
    """Processes holding a BPF_ENABLE_STATS descriptor: while any does, every program run
    pays the statistics' clock reads (the sysctl kernel.bpf_stats_enabled does not show it)."""
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-stats":
                    holders.append(int(pid))
                    break
        except OSError:
            continue  # exited meanwhile, or a descriptor closed
    return holders


def snapshot(pid: int | str = "self", tc_ifindexes: tuple[int, ...] | None = None
             ) -> dict[str, ProgramCost]:
    """Cumulative cost per program name of every BPF program a process holds open or attached
    through a perf event it holds (tracepoints: these run for the whole machine, whatever the
    namespace); with `tc_ifindexes`, of the TC programs only those attached to these interfaces
    of the calling thread's namespace."""
    totals: dict[str, ProgramCost] = {}
    seen_ids: set[str] = set()
    tc_ids = None
    if tc_ifindexes is not None:
        tc_ids = {str(i) for ifindex in tc_ifindexes for i in tcx_program_ids(ifindex)}
    for _fd, fields in itertools.chain(_program_fds(pid), _tracepoint_program_fds(pid)):
        if fields.get("prog_id") in seen_ids:
            continue  # the same program under two fds (bcc keeps its own)
        seen_ids.add(fields.get("prog_id", ""))
        if (tc_ids is not None and fields.get("prog_type") == str(PROG_TYPE_SCHED_CLS)
                and fields.get("prog_id") not in tc_ids):
            continue
        try:
            name = program_name_by_id(int(fields["prog_id"]))
        except (OSError, KeyError, ValueError):
            continue
        totals[name] = totals.get(name, NO_COST) + ProgramCost(int(fields["run_time_ns"]),
                                                               int(fields["run_cnt"]))
    return totals


def difference(after: dict[str, ProgramCost], before: dict[str, ProgramCost]
               ) -> dict[str, ProgramCost]:
    return {name: cost - before.get(name, NO_COST) for name, cost in after.items()}


def merged(costs: Iterable[dict[str, ProgramCost]]) -> dict[str, ProgramCost]:
    """Several measurements' costs added per program name."""
    total: dict[str, ProgramCost] = {}
    for cost in costs:
        for name, one in cost.items():
            total[name] = total.get(name, NO_COST) + one
    return total


def total_ns(costs: dict[str, ProgramCost]) -> int:
    return sum(cost.run_time_ns for cost in costs.values())


def describe(costs: dict[str, ProgramCost], per: int, unit: str) -> str:
    """One line: each program's runs and ns per run, per `unit` (e.g. per connection)."""
    parts = [f"{name} {cost.run_cnt / per:.1f} x {cost.ns_per_run:.0f} ns"
             for name, cost in sorted(costs.items(), key=lambda item: -item[1].run_time_ns)
             if cost.run_cnt and per]
    return f"per {unit}: " + ", ".join(parts)


@contextlib.contextmanager
def stats_enabled() -> Iterator[None]:
    """Run-time statistics of every BPF program on while inside (needs CAP_SYS_ADMIN)."""
    attr = ctypes.create_string_buffer(bpfsys._ATTR_SIZE)
    struct.pack_into("<I", attr, 0, BPF_STATS_RUN_TIME)
    fd = bpfsys._bpf(BPF_ENABLE_STATS, attr)
    try:
        yield
    finally:
        os.close(fd)
