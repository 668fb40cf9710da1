"""Handing the sockets that existed before the agent (ebpf/existing.py) to the kernel maps and to
attribution: established TCP sockets into `watched`, so that their destruction is reported;
listeners and UDP sockets into `socks`/`ports`, so that accepted sockets inherit their process
and their release is reported. A full map is counted, never fatal: those sockets' packets are
counted all the same, their ends come from the idle timeout."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ebpf import bpfsys, existing, layout, netns
from ebpf.attribution import Attribution
from ebpf.existing import ExistingSocket
from ebpf.loader import cgroup2_mount
from ebpf.observation import ProcessInfo

TCP = 6


@dataclass
class SocketMaps:
    watched_fd: int
    socks_fd: int
    ports_fd: int
    watched_ceiling_fd: int
    ceiling: int = 0  # the highest cookie written to watched_ceiling

    def watch(self, cookie: int, ns_cookie: int) -> None:
        """A pre-existing TCP socket into `watched`, so that its destruction is reported; the
        ceiling first (tcp_destroy_sock skips every cookie above it), so that no destruction
        between the two writes is missed."""
        if cookie > self.ceiling:
            bpfsys.update(self.watched_ceiling_fd, layout.U32.pack(0), layout.U64.pack(cookie))
            self.ceiling = cookie
        bpfsys.update(self.watched_fd, layout.U64.pack(cookie), layout.U64.pack(ns_cookie))


@dataclass
class ScanResult:
    learned: int = 0
    unwatched: int = 0  # found no room in the kernel's socket maps


def learn_existing_sockets(
    namespaces: Iterable[tuple[object, int]],
    attribution: Attribution,
    maps: SocketMaps,
    cgroup_path: Path | None,
) -> ScanResult:
    """`namespaces`: (namespace handle for netns.run_in, its netns cookie)."""
    owners = existing.socket_owners()
    result = ScanResult()
    for ns, ns_cookie in namespaces:
        try:
            found = netns.run_in(ns, existing.scan_here)
        except OSError:
            continue
        for sock in found:
            pid = owners.get(sock.inode)
            if pid is None:
                continue
            if attribution.scoped and not in_cgroup_scope(pid, cgroup_path):
                continue
            conn = (ns_cookie, sock.protocol, sock.ip_version, sock.local_addr,
                    sock.local_port, sock.remote_addr, sock.remote_port)
            process = existing.process_of(pid, sock.uid)
            attribution.learn_existing(conn, sock, process)
            try:
                if sock.protocol == TCP and sock.state != existing.TCP_LISTEN_STATE:
                    maps.watch(sock.cookie, ns_cookie)
                else:
                    register_socket(maps, ns_cookie, sock, process)
            except bpfsys.BpfError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                result.unwatched += 1
            result.learned += 1
    return result


def in_cgroup_scope(pid: int, cgroup_path: Path | None) -> bool:
    path = existing.cgroup_path_of(pid)
    root = cgroup2_mount()
    if path is None or root is None or cgroup_path is None:
        return False
    scope = "/" + str(cgroup_path.relative_to(root)).strip(".")
    scope = scope.rstrip("/")
    return not scope or path == scope or path.startswith(scope + "/")


def register_socket(
    maps: SocketMaps, ns_cookie: int, sock: ExistingSocket, process: ProcessInfo
) -> None:
    info = layout.SOCK_INFO.pack(
        ns_cookie, process.cgroup_id, process.pid, process.uid, sock.local_port,
        sock.protocol, 5, process.comm.encode()[:15],
    )
    cookie = layout.U64.pack(sock.cookie)
    bpfsys.update(maps.socks_fd, cookie, info)
    bpfsys.update(maps.ports_fd, layout.PORT_KEY.pack(ns_cookie, sock.local_port, sock.protocol),
                  cookie)
