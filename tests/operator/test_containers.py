"""Container and pod identity from cgroup v2 paths, and the cgroup id -> path resolver."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bridge.containers import CgroupResolver, ContainerInfo, cgroup2_mount, parse_cgroup_path
from tests.conftest import skip_or_fail

CID = "3f4e1a9c0b2d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"
OTHER = "a" * 64
POD = "8d3c5e1a-27b4-4c1f-9a0e-6b2d7f3e4c5a"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/docker/{CID}", ContainerInfo("docker", CID)),
        (f"/system.slice/docker-{CID}.scope", ContainerInfo("docker", CID)),
        (f"/kubepods/burstable/pod{POD}/{CID}", ContainerInfo("kubernetes", CID, POD)),
        (f"/kubepods/pod{POD}/{CID}", ContainerInfo("kubernetes", CID, POD)),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
            ContainerInfo("containerd", CID, POD),
        ),
        (
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope",
            ContainerInfo("cri-o", CID, POD),
        ),
        (
            f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/docker-{CID}.scope",
            ContainerInfo("docker", CID, POD),
        ),
        (f"/machine.slice/crio-conmon-{CID}.scope", ContainerInfo("cri-o", CID, monitor=True)),
        (f"/machine.slice/libpod-{CID}.scope/container", ContainerInfo("podman", CID)),
        (
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
            ContainerInfo("podman", CID),
        ),
        (f"/machine.slice/libpod-conmon-{CID}.scope", ContainerInfo("podman", CID, monitor=True)),
        (f"/default/{CID}", ContainerInfo("containerd", CID)),
        # The pause container's parent: a pod without a container id.
        (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice",
         ContainerInfo("kubernetes", "", POD)),
        # systemd inside a container: the container's own scope is the outer one.
        (f"/system.slice/docker-{CID}.scope/system.slice/nginx.service",
         ContainerInfo("docker", CID)),
    ],
)
def test_runtime_patterns(path: str, expected: ContainerInfo) -> None:
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/system.slice/nginx.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/system.slice/docker.service",  # the daemon itself is not a container
        f"/system.slice/docker-{CID[:63]}.scope",  # 63 digits: not an id
        f"/system.slice/docker-{CID.upper()}.scope",
        "/pod-not-a-uuid/x",
    ],
)
def test_host_paths_are_no_container(path: str) -> None:
    assert parse_cgroup_path(path) is None


def test_short_id_is_docker_ps_form() -> None:
    assert ContainerInfo("docker", CID).short_id == CID[:12]


def test_cgroup2_mount_from_mounts_table(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroup2_mount(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n")
    assert cgroup2_mount(str(mounts)) is None
    assert cgroup2_mount(str(tmp_path / "missing")) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_resolver_maps_directory_inodes_and_refreshes_on_miss(tmp_path: Path) -> None:
    """The resolver's contract on any directory tree: id == directory inode."""
    scope = tmp_path / "system.slice" / f"docker-{CID}.scope"
    scope.mkdir(parents=True)
    clock = FakeClock()
    resolver = CgroupResolver(str(tmp_path), refresh_interval=2.0, clock=clock)
    assert resolver.path(tmp_path.stat().st_ino) == "/"
    assert resolver.path(scope.stat().st_ino) == f"/system.slice/docker-{CID}.scope"
    assert resolver.container(scope.stat().st_ino) == ContainerInfo("docker", CID)
    assert resolver.container((tmp_path / "system.slice").stat().st_ino) is None
    assert resolver.walks == 1

    # A container started later: its id is a miss, and a walk finds it (once the interval
    # since the last walk has passed; before that, misses do not walk again).
    late = tmp_path / "kubepods" / f"pod{POD}" / OTHER
    late.mkdir(parents=True)
    assert resolver.container(late.stat().st_ino) is None
    assert resolver.walks == 1
    clock.now += 2.0
    assert resolver.container(late.stat().st_ino) == ContainerInfo("kubernetes", OTHER, POD)
    assert resolver.walks == 2
    clock.now += 10.0
    assert resolver.container(late.stat().st_ino) == ContainerInfo("kubernetes", OTHER, POD)
    assert resolver.walks == 2  # hits are cached
    assert resolver.path(0) is None


def test_resolver_without_cgroup2_resolves_nothing() -> None:
    resolver = CgroupResolver(root=None)
    resolver.root = None
    assert resolver.container(12345) is None
    assert resolver.walks == 0


def test_real_cgroup_id_of_a_process_in_a_container_scope() -> None:
    """As root: a real cgroup named like docker's, a real process in it; the cgroup id the
    kernel reports for the process (/proc/<pid>/cgroup's directory inode, which is what
    bpf_get_current_cgroup_id returns) resolves to the container."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (creates a cgroup)")
    root = cgroup2_mount()
    if root is None:
        skip_or_fail("no cgroup v2 hierarchy mounted")
    import subprocess
    import time

    scope = Path(root) / f"flowbridge-test-{os.getpid()}.slice" / f"docker-{CID}.scope"
    scope.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (scope / "cgroup.procs").write_text(str(sleeper.pid))
        for _ in range(50):
            line = Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines()
            v2 = [x for x in line if x.startswith("0::")][0][3:]
            if v2.endswith(".scope"):
                break
            time.sleep(0.02)
        cgroup_id = os.stat(f"{root}{v2}").st_ino
        assert cgroup_id == scope.stat().st_ino
        resolver = CgroupResolver()
        assert resolver.container(cgroup_id) == ContainerInfo("docker", CID)
    finally:
        sleeper.kill()
        sleeper.wait()
        for _ in range(50):  # the cgroup is removable once its last process is reaped
            try:
                scope.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        shutil.rmtree(scope.parent, ignore_errors=True)
        if scope.parent.exists():
            scope.parent.rmdir()
