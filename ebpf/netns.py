"""Network namespaces: finding them all, and running code inside one.

Namespaces are found through /proc/<pid>/ns/net (every namespace some process lives in) and
/run/netns (named ones, `ip netns add`, which may hold no process). A namespace is identified
to userspace by its inode number (what FlowKey.netns carries) and to BPF programs by its
cookie (bpf_get_netns_cookie); `cookie` reads SO_NETNS_COOKIE from a socket made inside it.

Code runs inside a namespace on a short-lived thread of its own that calls setns(2): setns
changes only the calling thread, so the rest of the agent never leaves the host namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
NAMED_NETNS_DIRS = ("/run/netns", "/var/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Namespace:
    inode: int
    path: str  # a path that opens it: /proc/<pid>/ns/net or /run/netns/<name>


def current_inode() -> int:
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


def discover() -> dict[int, Namespace]:
    """Every network namespace on the host that a process or a bind mount keeps alive."""
    found: dict[int, Namespace] = {}
    for directory in NAMED_NETNS_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            found.setdefault(inode, Namespace(inode, path))
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        path = f"/proc/{pid}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue  # the process exited, or a kernel thread we may not look at
        found.setdefault(inode, Namespace(inode, path))
    return found


def run_in(ns: Namespace, func: Callable[[], T]) -> T:
    """func() on a thread that has joined ns; its result or its exception."""
    result: list = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(ns.path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns.path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    worker = threading.Thread(target=body, name=f"netns-{ns.inode}", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def cookie_here() -> int:
    """SO_NETNS_COOKIE of the calling thread's namespace (what BPF programs see)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def iter_links() -> Iterator[tuple[int, str, int, int]]:
    """(ifindex, name, link type ARPHRD_*, master ifindex or 0) of the calling thread's netns.

    Read from /sys/class/net of a fresh sysfs view would need a mount namespace; netlink is
    namespace-correct for the calling thread, so use it."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for link in ipr.get_links():
            yield (
                link["index"],
                link.get_attr("IFLA_IFNAME") or "",
                link["ifi_type"],
                link.get_attr("IFLA_MASTER") or 0,
            )
