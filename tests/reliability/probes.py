"""What a reliability test reads from a running agent: its Prometheus metrics, and its memory and
file descriptors from /proc (no metric of its own can be trusted to report its own leak)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.harness.agent_cli import metrics


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def scrape(port: int, timeout: float = 30.0) -> dict[str, float]:
    """The agent's metrics as {'name{labels}': value}, once its endpoint answers."""
    return metrics(port, timeout)


def per_collector(metrics: dict[str, float], name: str, port: int) -> float:
    """One collector's value of a per-collector metric (the label names its address)."""
    found = [v for k, v in metrics.items()
             if k.startswith(f"flowbridge_{name}") and f":{port}/" in k]
    if len(found) != 1:
        raise KeyError(f"flowbridge_{name} for port {port}: {len(found)} series")
    return found[0]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.25)


@dataclass(frozen=True)
class ProcessSample:
    at: float  # time.monotonic()
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float  # user + system time so far


def sample(pid: int) -> ProcessSample:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        ticks = stat.read().rsplit(")", 1)[1].split()
    cpu_s = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return ProcessSample(time.monotonic(), int(fields["VmRSS"][0]),
                         len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"][0]), cpu_s)
