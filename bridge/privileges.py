"""Least privilege at run time: after its programs are attached the agent can become an ordinary
user, because everything it still needs is a file descriptor it already holds.

Whether that works is the kernel's call. Up to Linux 6.4, with `kernel.unprivileged_bpf_disabled`
set (the default of most distributions), bpf(2) refused *every* command to a caller without
CAP_BPF/CAP_SYS_ADMIN, map lookups on an open descriptor included. Linux 6.5 (commit "bpf: move
unprivileged checks into map_create() and bpf_prog_load()") checks privilege only where objects
are created, so map reads, batch reads and deletes through inherited descriptors keep working.
`map_access_after_drop` does not guess from the version: it creates a map, hands its descriptor
to a child running as the target user, and lets the child read and write it.

What an unprivileged agent can no longer do: attach programs to interfaces or network
namespaces that appear after the drop (that needs CAP_BPF, CAP_NET_ADMIN and setns), and read
other users' /proc/<pid>/fd. So `--user` suits hosts whose interfaces are stable; on container
hosts keep the agent privileged and confine it with capability bounding (deploy/).
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import struct
import subprocess
import sys
from dataclasses import dataclass

from bridge.errors import UserError

log = logging.getLogger("flowbridge.privileges")

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_ATTR_SIZE = 144
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_TYPE_ARRAY = 2
PR_SET_NO_NEW_PRIVS = 38

# Runs in the child as the target user: update then read back key 0 of the inherited map.
# Kept to the standard library so that the probe costs one interpreter start, not an import of
# the agent. Exit status: 0 ok, otherwise the errno of the failed bpf(2) call.
_CHILD = r"""
import ctypes, os, struct, sys
fd, nr = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
key = ctypes.create_string_buffer(struct.pack("<I", 0), 4)
value = ctypes.create_string_buffer(struct.pack("<Q", 0x5EED), 8)
back = ctypes.create_string_buffer(8)
for cmd, val in ((2, value), (1, back)):
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<I4xQQQ", attr, 0, fd, ctypes.addressof(key), ctypes.addressof(val), 0)
    if libc.syscall(nr, cmd, ctypes.byref(attr), 144) < 0:
        sys.exit(ctypes.get_errno() or 1)
sys.exit(0 if struct.unpack("<Q", back.raw)[0] == 0x5EED else 125)
"""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> Account:
    """The account to become; a name or a numeric uid."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise UserError(f"--user {name!r}: no such user on this host") from None
    if entry.pw_uid == 0:
        raise UserError(f"--user {name!r}: that is root; name an unprivileged account")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _create_probe_map() -> int:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # map_type, key_size, value_size, max_entries
    struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    return _bpf(BPF_MAP_CREATE, attr)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def map_access_after_drop(account: Account | None = None) -> ProbeResult:
    """Can a process running as `account` (default: nobody) use a BPF map through a descriptor
    that a privileged process opened? Measured, not inferred from the kernel version."""
    if os.geteuid() != 0:
        return ProbeResult(False, "not tried: needs root to create the probe map")
    if account is None:
        try:
            account = lookup_user("nobody")
        except UserError as exc:
            return ProbeResult(False, f"not tried: {exc}")
    try:
        fd = _create_probe_map()
    except OSError as exc:
        return ProbeResult(False, f"not tried: creating a BPF map failed: {exc.strerror}")
    try:
        child = subprocess.run(
            [os.path.realpath(sys.executable), "-S", "-c", _CHILD, str(fd), str(_SYS_BPF)],
            pass_fds=[fd],
            user=account.uid,
            group=account.gid,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            cwd="/",
        )
    finally:
        os.close(fd)
    unpriv = _read_sysctl("/proc/sys/kernel/unprivileged_bpf_disabled")
    setting = f"kernel.unprivileged_bpf_disabled={unpriv}" if unpriv is not None else ""
    release = os.uname().release
    if child.returncode == 0:
        return ProbeResult(
            True, f"uid {account.uid} ({account.name}) read and wrote a map through an "
            f"inherited descriptor (Linux {release}{', ' + setting if setting else ''})"
        )
    if child.returncode == 125:
        reason = "the value read back differed from the one written"
    elif 0 < child.returncode < 125:
        reason = f"bpf(2) failed: {os.strerror(child.returncode)}"
    else:
        reason = f"probe exited with {child.returncode}: {child.stderr.decode().strip()[-200:]}"
    return ProbeResult(
        False, f"uid {account.uid} ({account.name}) cannot use an inherited map descriptor: "
        f"{reason} (Linux {release}{', ' + setting if setting else ''}; map access without "
        "CAP_BPF through open descriptors needs Linux 6.5+)"
    )


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def privilege_drop_check():  # type: ignore[no-untyped-def]
    """The `flowbridge doctor` line for `--user`: an ebpf.preflight.Check, optional (the agent
    runs either way; only `run --user` depends on it)."""
    from ebpf.preflight import Check

    result = map_access_after_drop()
    fix = "" if result.ok else "run the agent as root with a capability bounding set (deploy/)"
    return Check("run --user (drop privileges)", result.ok, result.detail, fix, required=False)


def drop_privileges(account: Account) -> None:
    """Become `account` for good: no supplementary groups, its gid and uid, no capabilities
    left (the kernel clears them when a root process sets all its uids to non-zero), and no way
    back through set-uid programs. Raises UserError when any of it did not hold."""
    if os.geteuid() != 0:
        raise UserError(f"--user {account.name}: the agent must start as root to drop to a user")
    try:
        group_name = grp.getgrgid(account.gid).gr_name
    except KeyError:
        group_name = str(account.gid)
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise UserError(f"--user {account.name}: prctl(PR_SET_NO_NEW_PRIVS) failed")
    effective = effective_capabilities()
    if os.getuid() != account.uid or os.geteuid() != account.uid or effective:
        raise UserError(
            f"--user {account.name}: privileges still held after the drop "
            f"(uid {os.geteuid()}, CapEff {effective:#x})"
        )
    log.info("dropped privileges: now uid %d (%s), gid %d (%s), no capabilities",
             account.uid, account.name, account.gid, group_name)


def effective_capabilities(pid: int | str = "self") -> int:
    """CapEff of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def stop_interface_discovery(source: object) -> bool:
    """After the drop, the eBPF collector's periodic namespace scan would see only the
    namespaces an ordinary user may look at (/proc/<pid>/ns/net of root's processes is
    closed to it) and detach the programs of all the others. Stop that scan; what is attached
    stays attached. Returns whether there was a scan to stop (sources without one: False)."""
    stop_discovery = getattr(source, "stop_discovery", None)
    if not callable(stop_discovery):
        return False
    stop_discovery()
    return True
