"""bench.empty_programs and the checks of bench.hooks: programs that return at once, attached
where the collector attaches its own, run as often as the kernel calls each hook (the runs per
connection bench.hooks' figures rest on), and someone else's programs are told from ours."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.empty_programs import ALL_HOOKS, HOOKS, EmptyHooks
from bench.hook_arms import foreign_programs
from ebpf import bpfsys, netns, progstats
from tests.conftest import require_tools

CONNECTIONS = 20

# Waits for a line on stdin (the test moves it into the cgroup meanwhile), then opens a
# listener and CONNECTIONS connections to it; each sends a byte, the client closes first, the
# server reads the end and closes.
CLIENT = """
import socket, sys
sys.stdin.readline()
count = int(sys.argv[1])
with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        client.sendall(b"x")
        accepted.recv(1)
        client.close()
        accepted.recv(1)
        accepted.close()
"""


@pytest.fixture
def cgroup(needs_root: None) -> Iterator[Path]:
    from ebpf.loader import resolve_cgroup

    path = resolve_cgroup(None) / f"fb-test-empty-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


@pytest.fixture
def namespace() -> Iterator[netns.Namespace]:
    require_tools("ip")
    name = f"fb-test-empty-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield netns.Namespace(0, f"/run/netns/{name}")
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def connect_in(cgroup: Path, namespace: netns.Namespace) -> None:
    name = Path(namespace.path).name
    child = subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-c", CLIENT, str(CONNECTIONS)],
        stdin=subprocess.PIPE, text=True,
    )
    try:
        # ip execs python in place: the pid is the client's once its namespace is entered,
        # and the client creates no socket before the go line.
        (cgroup / "cgroup.procs").write_text(f"{child.pid}\n")
        child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0


def others_sock_ops(cgroup: Path) -> bool:
    """Whether someone else's SOCK_OPS program runs for the cgroup's sockets (another
    collector on the root cgroup): one that sets the state callback flag on a socket makes
    the kernel call every SOCK_OPS program of it at each state change."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bool(progstats.cgroup_program_ids(fd, bpfsys.CGROUP_SOCK_OPS)
                    - progstats.held_program_ids())
    finally:
        os.close(fd)


def sock_ops_runs(cgroup: Path, program: str, hooks: tuple[str, ...],
                  namespace: netns.Namespace) -> tuple[dict[str, int], bool]:
    """Runs per program over CONNECTIONS connections, and whether another SOCK_OPS program ran
    for them (before or after)."""
    from ebpf.loader import tracefs_mount

    with progstats.stats_enabled():
        attached = netns.run_in(namespace, lambda: EmptyHooks(hooks, cgroup, tracefs_mount()))
        try:
            shared = others_sock_ops(cgroup)
            before = progstats.snapshot()
            connect_in(cgroup, namespace)
            runs = {name: cost.run_cnt for name, cost
                    in progstats.difference(progstats.snapshot(), before).items()}
            shared |= others_sock_ops(cgroup)
        finally:
            attached.close()
    return runs, shared


def test_each_hook_runs_as_often_as_the_kernel_calls_it(cgroup: Path,
                                                       namespace: netns.Namespace) -> None:
    runs, shared = sock_ops_runs(cgroup, "empty_ops_state", ALL_HOOKS, namespace)
    # Per connection: 9 callbacks any SOCK_OPS program gets (TIMEOUT_INIT, RWND_INIT and
    # NEEDS_ECN twice, TCP_CONNECT, ACTIVE_ and PASSIVE_ESTABLISHED) and 8 state changes; the
    # listener's TCP_LISTEN_CB once.
    if shared:  # another collector's program may set the flag on more sockets
        assert runs["empty_ops_state"] >= 17 * CONNECTIONS + 1
    else:
        assert runs["empty_ops_state"] == 17 * CONNECTIONS + 1
    assert runs["empty_connect4"] == CONNECTIONS
    assert runs["empty_connect6"] == 0
    # sock_create: each client socket and the listener (accepted sockets are not created by
    # socket(2)); sock_release: both sockets of each connection and the listener.
    assert runs["empty_create"] == CONNECTIONS + 1
    assert runs["empty_release"] == 2 * CONNECTIONS + 1
    assert runs["empty_bind4"] == 1  # the listener's bind; a connect's port is no bind
    # lo of the test's own namespace only: at least SYN, SYN-ACK, ACK, data, two FINs and
    # their ACKs (delayed ACKs may ride on later segments).
    assert 6 * CONNECTIONS <= runs["empty_tc"] <= 12 * CONNECTIONS
    # The tracepoint fires for every TCP socket the host destroys, other tests' too.
    assert runs["empty_destroy"] >= 2 * CONNECTIONS


def test_sock_ops_without_the_state_flag_gets_only_the_callbacks_of_any_program(
        cgroup: Path, namespace: netns.Namespace) -> None:
    runs, shared = sock_ops_runs(cgroup, "empty_sock_ops", ("sock_ops",), namespace)
    if shared:  # another collector's program set the state flag: state callbacks too
        assert runs["empty_sock_ops"] >= 9 * CONNECTIONS + 1
    else:
        assert runs["empty_sock_ops"] == 9 * CONNECTIONS + 1  # and the listener's LISTEN_CB


def test_programs_attached_by_someone_else_are_told_from_ours(cgroup: Path) -> None:
    """A program on the parent cgroup runs for the child's sockets: foreign unless ours, and
    gone once detached."""
    child = cgroup / "child"
    child.mkdir()
    try:
        child_fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with EmptyHooks(("connect",), cgroup) as hooks:
                assert len(hooks.prog_fds) == len(HOOKS["connect"])
                ours = progstats.held_program_ids()
                connect4 = {i for i in ours
                            if progstats.program_name_by_id(i) == "empty_connect4"}
                assert len(connect4) == 1
                assert connect4 <= foreign_programs(child_fd, set())
                assert not connect4 & foreign_programs(child_fd, ours)
            assert not connect4 & foreign_programs(child_fd, set())
        finally:
            os.close(child_fd)
    finally:
        child.rmdir()


def test_arms_are_compared_with_the_nearest_baselines_of_the_same_marks() -> None:
    """bench.hooks: baselines around every few arms, every other rotation reversed; an arm's
    round is paired with the baselines next to it in time that saw what it saw."""
    from bench.hook_arms import Arm
    from bench.hooks import BASELINE, neighbour_baselines, schedule

    arms = [Arm(name, "empty", (name,)) for name in ("tc", "sock_ops", "connect")]
    forward = schedule(arms, 2, 0)
    assert [a.name for a in forward] == ["none", "tc", "sock_ops", "none", "connect", "none"]
    assert schedule(arms, 2, 1) == forward[::-1]

    @dataclass
    class Measured:
        arm: Arm
        index: int
        shared: bool  # someone else's programs ran meanwhile

        @property
        def marks(self) -> tuple[frozenset[str], bool]:
            return frozenset({"tc_loopback"} if self.shared else ()), False

    rounds = [Measured(BASELINE, 0, False), Measured(arms[0], 1, False),
              Measured(BASELINE, 2, True), Measured(BASELINE, 3, False),
              Measured(BASELINE, 4, False)]
    assert [r.index for r in neighbour_baselines(rounds, rounds[1])] == [0, 3]
    shared = Measured(arms[1], 5, True)
    assert [r.index for r in neighbour_baselines([*rounds, shared], shared)] == [2]
