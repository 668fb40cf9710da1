"""Container ids in the ntop profile: the local process's container on the local side, from
the agent's one cgroup resolver."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.agent import Agent, container_ids
from bridge.config import AgentConfig, CollectorConfig
from bridge.containers import CgroupResolver, cgroup2_mount
from bridge.synthetic import SyntheticSource
from ebpf.observation import Direction, EndCause, ProcessInfo

from .helpers import T0, FakeClock, Sink, key, obs

CONTAINER = "0123456789abcdef" * 4
IN_CI = os.environ.get("CI") == "true"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_container_ids_walk_at_most_once_per_interval_and_then_cost_no_walk(tmp_path: Path):
    clock = Clock()
    resolver = CgroupResolver(root=str(tmp_path), refresh_interval=2.0, clock=clock)
    ids = container_ids(resolver)
    scope = tmp_path / "system.slice" / f"docker-{CONTAINER}.scope"
    host = tmp_path / "system.slice" / "sshd.service"
    host.mkdir(parents=True)
    host_id = host.stat().st_ino
    assert ids(host_id) == ""  # a host process
    assert resolver.walks == 1
    scope.mkdir()
    scope_id = scope.stat().st_ino
    for _ in range(100):  # a container started since the walk: no walk per flow
        assert ids(scope_id) == ""
    assert resolver.walks == 1
    clock.now += 2.0
    assert ids(scope_id) == CONTAINER
    assert resolver.walks == 2
    scope.rmdir()  # known ids stay known (records of a container that just exited)
    clock.now += 10.0
    assert [ids(scope_id) for _ in range(100)] == [CONTAINER] * 100
    assert ids(host_id) == ""
    assert resolver.walks == 2


def _cgroup2_scope() -> tuple[Path, Path]:
    """A real docker-like scope under the cgroup2 mount (root only), and its parent slice."""
    mount = cgroup2_mount()
    reason = None
    if mount is None:
        reason = "no cgroup2 mount"
    elif os.geteuid() != 0:
        reason = "making a cgroup needs root"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI runs as root with cgroup v2: {reason}")
        pytest.skip(reason)
    slice_dir = Path(mount) / f"flowbridge-test-{os.getpid()}.slice"
    scope = slice_dir / f"docker-{CONTAINER}.scope"
    scope.mkdir(parents=True)
    return slice_dir, scope


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
def test_agent_puts_the_container_on_the_local_side(protocol: str):
    """The shipped ntop profile carries it: the whole id in IPFIX (variable-length), nProbe's
    16-character prefix in v9 (fixed-length)."""
    slice_dir, scope = _cgroup2_scope()
    sink = Sink()
    try:
        in_container = ProcessInfo(pid=321, comm="nginx", uid=33, cgroup_id=scope.stat().st_ino)
        on_host = ProcessInfo(pid=99, comm="curl", uid=0, cgroup_id=slice_dir.stat().st_ino)
        source = SyntheticSource()
        collector = CollectorConfig(host=sink.host, port=sink.port, protocol=protocol,
                                    profile="ntop")  # fmt: skip
        agent = Agent(AgentConfig(collectors=(collector,)), source, clock=FakeClock(T0 + 1000))
        served = key(45000, 80, src="10.9.0.2", dst="10.9.0.1", direction=Direction.INGRESS)
        answered = key(80, 45000, src="10.9.0.1", dst="10.9.0.2")
        fetched = key(46000, 443, src="10.9.0.1", dst="10.9.0.3")
        source.feed([
            obs(served, 500, 5, T0, T0 + 9, process=in_container, end=EndCause.FIN),
            obs(answered, 9000, 8, T0, T0 + 9, process=in_container, end=EndCause.FIN),
            obs(fetched, 700, 6, T0, T0 + 9, process=on_host, end=EndCause.FIN),
        ])  # fmt: skip
        agent.step(poll_ms=0)
        records = {r["sourceTransportPort"]: r for r in sink.records(timeout=1)}
        agent.shutdown(drain_seconds=0)
    finally:
        sink.close()
        scope.rmdir()
        slice_dir.rmdir()
    assert sorted(records) == [80, 45000, 46000]
    ingress, egress, host = records[45000], records[80], records[46000]
    exported = CONTAINER if protocol == "ipfix" else CONTAINER[:16]
    assert ingress["DST_PROC_CONTAINER_ID"] == exported
    assert ingress["DST_PROC_NAME"] == "nginx"
    assert ingress["SRC_PROC_CONTAINER_ID"] == ""
    assert egress["SRC_PROC_CONTAINER_ID"] == exported
    assert egress["DST_PROC_CONTAINER_ID"] == ""
    assert host["SRC_PROC_NAME"] == "curl"
    assert host["SRC_PROC_CONTAINER_ID"] == host["DST_PROC_CONTAINER_ID"] == ""


def test_no_cgroup2_means_no_container_and_no_error(tmp_path: Path):
    resolver = CgroupResolver(root=None)
    resolver.root = None  # as on a host without cgroup v2
    assert container_ids(resolver)(12345) == ""
