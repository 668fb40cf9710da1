"""Which container (and Kubernetes pod) a process runs in, from its cgroup v2 path.

The eBPF side reports a cgroup id (ProcessInfo.cgroup_id). On cgroup v2 that id is the inode
number of the cgroup's directory, so `CgroupResolver` walks the cgroup2 mount once, keeps
inode -> path, and walks again when an id is missing (a container started since), at most once
per `refresh_interval` so that ids of cgroups already gone cannot make it walk on every flow.

Path patterns of the runtimes (container ids are 64 hex digits; pod uids are UUIDs, written with
'_' instead of '-' by the systemd cgroup driver):

    docker, cgroupfs driver       /docker/<id>
    docker, systemd driver        /system.slice/docker-<id>.scope
    containerd (nerdctl)          /default/<id>, /<namespace>/<id>  (needs a runtime hint: below)
    kubelet, cgroupfs driver      /kubepods/burstable/pod<uid>/<id>
    kubelet, systemd driver       /kubepods.slice/kubepods-burstable.slice/
                                      kubepods-burstable-pod<uid_with_underscores>.slice/
                                      cri-containerd-<id>.scope | crio-<id>.scope |
                                      docker-<id>.scope
    cri-o                         crio-<id>.scope (crio-conmon-<id>.scope is its monitor process)
    podman                        libpod-<id>.scope, and /machine.slice/libpod-<id>.scope/container
                                  (rootless: under user@<uid>.service); libpod-conmon-<id>.scope
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_ID = r"[0-9a-f]{64}"
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"

# A scope unit holding one container: <prefix>-<id>.scope. The prefix names the runtime.
_SCOPE = re.compile(
    rf"^(?P<prefix>docker|cri-containerd|crio-conmon|crio|libpod-conmon|libpod|containerd|"
    rf"nerdctl|cri-dockerd)-(?P<id>{_ID})\.scope$"
)
_SCOPE_RUNTIME = {
    "docker": "docker",
    "cri-dockerd": "docker",
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "nerdctl": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
    "libpod": "podman",
    "libpod-conmon": "podman",
}
_BARE_ID = re.compile(rf"^{_ID}$")
_POD = re.compile(rf"^(?:kubepods-(?:burstable-|besteffort-|guaranteed-)?)?pod(?P<uid>{_UUID})"
                  r"(?:\.slice)?$")


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    runtime: str  # docker, containerd, cri-o, podman, kubernetes (runtime not in the path)
    container_id: str  # 64 hex digits; "" for a pod-level cgroup (the pause/sandbox parent)
    pod_uid: str = ""  # Kubernetes pod UID with dashes, "" outside Kubernetes
    monitor: bool = False  # conmon (cri-o/podman): the container's monitor, not the container

    @property
    def short_id(self) -> str:
        return self.container_id[:12]


def parse_cgroup_path(path: str) -> ContainerInfo | None:
    """The container (and pod) a cgroup v2 path belongs to; None for host processes.

    The innermost container wins: a cgroup nested inside a container (systemd in a container,
    podman's `/container` leaf) still belongs to that container."""
    parts = [p for p in path.split("/") if p]
    pod_uid = ""
    in_kubepods = False
    found: ContainerInfo | None = None
    for index, part in enumerate(parts):
        if part.startswith("kubepods"):
            in_kubepods = True
        pod = _POD.match(part)
        if pod and (in_kubepods or part.startswith("pod")):
            pod_uid = pod.group("uid").replace("_", "-")
            continue
        scope = _SCOPE.match(part)
        if scope:
            prefix = scope.group("prefix")
            found = ContainerInfo(_SCOPE_RUNTIME[prefix], scope.group("id"), pod_uid,
                                  monitor=prefix.endswith("conmon"))
            continue
        if _BARE_ID.match(part) and found is None:
            parent = parts[index - 1] if index else ""
            found = ContainerInfo(_bare_runtime(parent, pod_uid), part, pod_uid)
    if found is not None:
        return found if found.pod_uid == pod_uid else ContainerInfo(
            found.runtime, found.container_id, pod_uid, found.monitor)
    if pod_uid:
        return ContainerInfo("kubernetes", "", pod_uid)
    return None


def _bare_runtime(parent: str, pod_uid: str) -> str:
    """Runtime of a cgroupfs-driver path /<parent>/<id>: docker's parent is `docker`; under
    kubepods the runtime is not in the path; containerd names the parent after its namespace."""
    if parent == "docker":
        return "docker"
    if pod_uid:
        return "kubernetes"
    if parent in ("libpod_parent", "machine.slice"):
        return "podman"
    return "containerd"


def cgroup2_mount(mounts_file: str = "/proc/self/mounts") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid layout)."""
    try:
        with open(mounts_file) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return fields[1].replace("\\040", " ")
    except OSError:
        return None
    return None


class CgroupResolver:
    """cgroup id -> cgroup path (relative to the v2 root, '/'-rooted) and -> ContainerInfo.

    Thread-safe: the agent's loop and the state socket's thread may both ask."""

    def __init__(
        self,
        root: str | None = None,
        refresh_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root if root is not None else cgroup2_mount()
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._paths: dict[int, str] = {}
        self._containers: dict[int, ContainerInfo | None] = {}
        self._walked_at: float | None = None
        self._lock = threading.Lock()
        self.walks = 0

    def _walk(self) -> None:
        paths: dict[int, str] = {}
        root = self.root
        if root is not None:
            for directory, _subdirs, _files in os.walk(root, onerror=lambda _err: None):
                try:
                    inode = os.stat(directory).st_ino
                except OSError:
                    continue  # removed while walking
                relative = directory[len(root):] or "/"
                paths[inode] = relative if relative.startswith("/") else "/" + relative
        self._paths = paths
        self._containers = {}
        self._walked_at = self._clock()
        self.walks += 1

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.root is None:
            return None
        with self._lock:
            found = self._paths.get(cgroup_id)
            if found is None and self._may_walk():
                self._walk()
                found = self._paths.get(cgroup_id)
            return found

    def _may_walk(self) -> bool:
        return (self._walked_at is None
                or self._clock() - self._walked_at >= self.refresh_interval)

    def container(self, cgroup_id: int) -> ContainerInfo | None:
        """The container of a cgroup id; None for host processes and unknown ids."""
        with self._lock:
            if cgroup_id in self._containers:
                return self._containers[cgroup_id]
        path = self.path(cgroup_id)
        info = parse_cgroup_path(path) if path is not None else None
        with self._lock:
            if path is not None:  # unknown ids are asked again later: they may appear
                self._containers[cgroup_id] = info
        return info
