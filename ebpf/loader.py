"""Loading flows.bpf.c (compiled by bcc in a child process: ebpf.compiler) and attaching the
socket-level hooks.

Counting programs (TCX) are attached per interface by ebpf.interfaces; this module attaches
the rest to one cgroup v2 directory (the root by default): sock_create, connect4/6,
post_bind4/6, sock_release, sock_ops, and the tcp_destroy_sock tracepoint. Cgroup programs are
attached as BPF links (file descriptors of this process), so nothing stays attached after the
agent exits, even if it is killed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ebpf import bpfsys
from ebpf.compiler import LD_IMM64, Compiled, compile_in_child
from ebpf.errors import EbpfUnavailable
from ebpf.headers import KernelHeaders
from ebpf.interfaces import Programs

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# (function, bcc program type name, expected attach type, cgroup attach type)
CGROUP_PROGRAMS = (
    ("sock_create", "CGROUP_SOCK", bpfsys.CGROUP_INET_SOCK_CREATE),
    ("sock_release", "CGROUP_SOCK", bpfsys.CGROUP_INET_SOCK_RELEASE),
    ("post_bind4", "CGROUP_SOCK", bpfsys.CGROUP_INET4_POST_BIND),
    ("post_bind6", "CGROUP_SOCK", bpfsys.CGROUP_INET6_POST_BIND),
    ("connect4", "CGROUP_SOCK_ADDR", bpfsys.CGROUP_INET4_CONNECT),
    ("connect6", "CGROUP_SOCK_ADDR", bpfsys.CGROUP_INET6_CONNECT),
    ("sock_ops", "SOCK_OPS", bpfsys.CGROUP_SOCK_OPS),
)
TC_PROGRAMS = ("tc_ingress", "tc_egress", "tc_loopback", "tc_ingress_l3", "tc_egress_l3")
NETNS_PLACEHOLDER = 0x6662746E73636B69  # as in flows.bpf.c
RINGBUF_PAGES = 4096  # 16 MB of end-of-flow events: churn between two polls must fit
MAP_NAME_LEN = 15  # the kernel keeps 15 characters of a map's name


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup or /sys/fs/cgroup/unified)."""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return Path(fields[1])
    except OSError:
        return None
    return None


def tracefs_mount() -> Path | None:
    """A mounted tracefs (bcc needs it for tracepoints); mounts it when missing and allowed."""
    for directory in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(directory, "events")):
            return Path(directory)
    if (
        os.geteuid() == 0
        and os.path.isdir(TRACEFS_DIRS[0])
        and _mount_tracefs(TRACEFS_DIRS[0])
    ):
        return Path(TRACEFS_DIRS[0])
    return None


def _mount_tracefs(directory: str) -> bool:
    try:  # an argument list, never a shell (tests/security/test_no_shell.py)
        done = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    except OSError:
        return False
    return done.returncode == 0


def resolve_cgroup(cgroup: str | None) -> Path:
    root = cgroup2_mount()
    if root is None:
        raise EbpfUnavailable(
            "no cgroup v2 hierarchy mounted; mount one: "
            "mount -t cgroup2 none /sys/fs/cgroup/unified"
        )
    if cgroup is None:
        return root
    path = Path(cgroup)
    if not path.is_absolute():
        path = root / cgroup
    if not path.is_dir():
        raise EbpfUnavailable(f"cgroup {cgroup}: no such directory under {root}")
    if root not in (path, *path.parents):
        raise EbpfUnavailable(f"cgroup {cgroup}: not inside the cgroup v2 hierarchy at {root}")
    return path


def bind_netns(insns: bytes, netns_cookie: int) -> bytes:
    """The bytecode with the namespace placeholder constant replaced by netns_cookie."""
    code = bytearray(insns)
    lo, hi = NETNS_PLACEHOLDER & 0xFFFFFFFF, NETNS_PLACEHOLDER >> 32
    found = 0
    for at in range(0, len(code) - 15, 8):
        if code[at] != LD_IMM64 or code[at + 1] >> 4 != 0:  # src_reg 0: a plain constant
            continue
        if (int.from_bytes(code[at + 4 : at + 8], "little") == lo
                and int.from_bytes(code[at + 12 : at + 16], "little") == hi):
            code[at + 4 : at + 8] = (netns_cookie & 0xFFFFFFFF).to_bytes(4, "little")
            code[at + 12 : at + 16] = (netns_cookie >> 32).to_bytes(4, "little")
            found += 1
    if found == 0:
        raise EbpfUnavailable("flows.bpf.c: the netns placeholder constant was optimised away")
    return bytes(code)


@dataclass
class LoadedPrograms:
    """The maps and programs the compiler process made, and everything attached outside
    interfaces (all file descriptors of this process)."""

    compiled: Compiled
    cgroup: Path
    link_fds: list[int] = field(default_factory=list)
    cgroup_fd: int = -1

    @property
    def headers(self) -> KernelHeaders:
        return self.compiled.headers

    def table_fd(self, name: str) -> int:
        return self.compiled.maps[name[:MAP_NAME_LEN]]

    def counter_totals(self, count: int) -> list[int]:
        """The per-CPU `counters` array of flows.bpf.c summed over CPUs, entries 0..count-1."""
        return bpfsys.percpu_sums(self.table_fd("counters"), count)

    def tc_programs(self, netns_cookie: int) -> Programs:
        """The counting programs for one network namespace (the caller closes their fds)."""
        fds: list[int] = []
        try:
            for name in TC_PROGRAMS:
                code = bind_netns(self.compiled.tc_code[name], netns_cookie)
                fds.append(bpfsys.prog_load(bpfsys.BPF_PROG_TYPE_SCHED_CLS, code, name))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Programs(*fds)

    def close(self) -> None:
        for fd in self.link_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.link_fds.clear()
        if self.cgroup_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.cgroup_fd)
            self.cgroup_fd = -1
        self.compiled.close()  # the tracepoint's perf event with it: detached


def import_bcc():
    try:
        import bcc
    except ImportError as exc:
        raise EbpfUnavailable(
            f"bcc is not importable ({exc}); apt-get install python3-bpfcc and use a virtualenv "
            "made with --system-site-packages"
        ) from exc
    return bcc


def load(cgroup: str | None, max_flows: int, max_socks: int,
         ringbuf_pages: int = RINGBUF_PAGES) -> LoadedPrograms:
    """Compile (in a child process), load every program, attach the cgroup hooks and the
    tracepoint."""
    target = resolve_cgroup(cgroup)
    if os.geteuid() != 0:
        raise EbpfUnavailable(
            "loading BPF programs needs root (or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON)"
        )
    loaded = LoadedPrograms(compile_in_child(max_flows, max_socks, ringbuf_pages), target)
    try:
        loaded.tc_programs(0).close()  # let the verifier see them once now: fail early
        loaded.cgroup_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        for func, _, attach_type in CGROUP_PROGRAMS:
            try:
                link = bpfsys.link_create(loaded.compiled.programs[func], loaded.cgroup_fd,
                                          attach_type)
            except OSError as exc:
                raise EbpfUnavailable(f"attaching {func} to cgroup {target} failed: {exc}") from exc
            loaded.link_fds.append(link)
        # The compiler process had bcc attach tracepoint__tcp__tcp_destroy_sock; its perf event
        # is one of ours now.
    except EbpfUnavailable:
        loaded.close()
        raise
    except Exception as exc:
        loaded.close()
        raise EbpfUnavailable(f"loading the flow programs failed: {exc}") from exc
    return loaded
