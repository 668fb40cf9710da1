"""CPU time of processes, from /proc: what the benchmarks charge to an exporter (utime + stime of
it and its descendants) and to the load (nginx's workers, wrk as a waited-for child)."""

from __future__ import annotations

import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (pmacctd forks a process per plugin, nginx its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # exited meanwhile
    return found


def _user_system_ticks(pid: int) -> tuple[int, int]:
    """utime and stime (fields 14 and 15 of /proc/PID/stat), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            total += sum(_user_system_ticks(member))
        except OSError:
            continue  # exited meanwhile
    return total / CLK_TCK


def tree_runtime_ns(pid: int) -> int:
    """Nanoseconds the scheduler ran a process's threads and its descendants' threads
    (/proc/PID/task/TID/schedstat): exact, where utime and stime count whole clock ticks."""
    total = 0
    for member in process_tree(pid):
        try:
            for task in os.listdir(f"/proc/{member}/task"):
                with open(f"/proc/{member}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            continue  # exited meanwhile
    return total


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process: what the agent spends in Python and in the kernel."""
    user, system = _user_system_ticks(pid)
    return user / CLK_TCK, system / CLK_TCK


def children_cpu_seconds() -> float:
    """user + system CPU of every child this process has waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
