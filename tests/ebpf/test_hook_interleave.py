"""bench.hook_interleave end to end, briefly: flows.bpf.c's programs attached and detached block
by block under one wrk run, in a namespace and cgroup of the test's own; with the statistics on
they run as often per `Connection: close` request as the collector's do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tools

ROOT = Path(__file__).resolve().parents[2]


def test_real_programs_toggled_per_block_run_per_connection_as_attached(needs_root: None) -> None:
    require_tools("ip", "nginx", "wrk")
    name = f"fb-test-interleave-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", name, "sh", "-c",
             'mount -t cgroup2 none /sys/fs/cgroup && exec "$0" -m bench.hook_interleave '
             f"--cgroup {name} --cycles 2 --block 1 --arms real_stats --modes close",
             sys.executable],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
        from ebpf.loader import resolve_cgroup

        cgroup = resolve_cgroup(None) / name
        if cgroup.is_dir():
            cgroup.rmdir()  # emptied: every process of the benchmark has exited
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["name"] for line in lines] == [
        "hook_interleave_close_real_stats_extra_cpu_per_request"]
    assert lines[0]["peer_value"] > 0  # nginx + wrk CPU per request with nothing attached
    runs = dict(re.findall(r"(\w+) ([\d.]+) x \d+ ns", done.stderr))
    # Per connection on lo: SYN, SYN-ACK, ACK, request, response, two FINs and their ACKs,
    # some ACKs delayed onto later segments; 9 SOCK_OPS callbacks of any program and 8 state
    # changes; one connect.
    assert 7 <= float(runs["tc_loopback"]) <= 12
    assert 16.5 <= float(runs["sock_ops"]) <= 17.5
    assert 0.9 <= float(runs["connect4"]) <= 1.1
