"""Sockets that existed before the agent attached: netlink sock_diag per namespace, /proc for pids.

SOCK_OPS never calls back for connections established before it was attached, and the
process hooks never saw those sockets being created. sock_diag gives their 5-tuple, socket
cookie, uid, inode and (TCP) tcp_info; /proc/<pid>/fd maps the inode to the owning process.
Their packets are counted by the interface programs from attach time on, like any other.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, replace

from ebpf.observation import ProcessInfo, TcpHealth

INET_DIAG_INFO = 2
TCP_LISTEN_STATE = 10
TCP_TIME_WAIT_STATE = 6
SKIPPED_TCP_STATES = {TCP_TIME_WAIT_STATE, 12}  # 12: NEW_SYN_RECV


@dataclass(frozen=True, slots=True)
class ExistingSocket:
    protocol: int
    ip_version: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int
    cookie: int
    inode: int
    uid: int
    state: int
    tcp: TcpHealth | None
    accepted: bool = False  # TCP: a listener of this namespace has the same local port


def _packed(family: int, words) -> bytes:
    text = words if isinstance(words, str) else None
    if text is not None:
        return socket.inet_pton(family, text)
    raise ValueError(f"unexpected address form {words!r}")


def _health(msg) -> TcpHealth | None:
    info = msg.get_attr("INET_DIAG_INFO")
    if info is None:
        return None
    return TcpHealth(
        retrans_packets=info.get("tcpi_total_retrans") or 0,
        retrans_bytes=info.get("tcpi_bytes_retrans") or 0,
        srtt_us=info.get("tcpi_rtt") or 0,
        min_rtt_us=info.get("tcpi_min_rtt") or 0,
        snd_cwnd=info.get("tcpi_snd_cwnd") or 0,
        state=info.get("tcpi_state") or msg["idiag_state"],
    )


def scan_here() -> list[ExistingSocket]:
    """TCP and UDP sockets of the calling thread's network namespace (run it via netns.run_in)."""
    from pyroute2 import DiagSocket

    found: list[ExistingSocket] = []
    with DiagSocket() as diag:
        diag.bind()
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                ext = 1 << (INET_DIAG_INFO - 1) if protocol == socket.IPPROTO_TCP else 0
                for msg in diag.get_sock_stats(family=family, protocol=protocol, extensions=ext):
                    state = msg["idiag_state"]
                    if protocol == socket.IPPROTO_TCP and state in SKIPPED_TCP_STATES:
                        continue
                    local = _packed(family, msg["idiag_src"])
                    remote = _packed(family, msg["idiag_dst"])
                    ipver = version
                    if version == 6 and local.startswith(b"\0" * 10 + b"\xff\xff"):
                        local, remote, ipver = local[12:], remote[12:], 4
                    found.append(
                        ExistingSocket(
                            protocol=protocol,
                            ip_version=ipver,
                            local_addr=local,
                            local_port=msg["idiag_sport"],
                            remote_addr=remote,
                            remote_port=msg["idiag_dport"],
                            cookie=msg["idiag_cookie"],
                            inode=msg["idiag_inode"],
                            uid=msg["idiag_uid"],
                            state=state,
                            tcp=_health(msg) if protocol == socket.IPPROTO_TCP else None,
                        )
                    )
    listening = {(s.ip_version, s.local_port) for s in found
                 if s.protocol == socket.IPPROTO_TCP and s.state == TCP_LISTEN_STATE}
    listening_any = {port for _, port in listening}
    return [
        replace(s, accepted=True)
        if s.protocol == socket.IPPROTO_TCP and s.state != TCP_LISTEN_STATE
        and s.local_port in listening_any
        else s
        for s in found
    ]


def socket_owners() -> dict[int, int]:
    """socket inode -> pid, from /proc/<pid>/fd (the first process holding it)."""
    owners: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{fd_dir}/{fd}")
                    if target.startswith("socket:["):
                        owners.setdefault(int(target[8:-1]), int(pid))
    return owners


def process_of(pid: int, uid: int) -> ProcessInfo:
    comm = ""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
        comm = f.read().strip()
    return ProcessInfo(pid=pid, comm=comm, uid=uid, cgroup_id=cgroup_id_of(pid))


def cgroup_path_of(pid: int) -> str | None:
    """The process's cgroup v2 path (relative to the v2 root), e.g. '/system.slice/x.service'."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def cgroup_id_of(pid: int) -> int:
    """cgroup v2 id = inode number of the cgroup's directory (what bpf_get_current_cgroup_id
    returns)."""
    from ebpf.loader import cgroup2_mount

    path = cgroup_path_of(pid)
    root = cgroup2_mount()
    if path is None or root is None:
        return 0
    try:
        return os.stat(f"{root}{path}").st_ino
    except OSError:
        return 0
