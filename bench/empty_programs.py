"""BPF programs that return at once, attached where the collector attaches its own: what merely
entering each hook costs the traffic, beside what the collector's programs do there.

Each program is a few hand-assembled instructions loaded with ebpf.bpfsys.prog_load and
attached as the loader attaches the real ones (BPF links: TCX egress on `lo`, the cgroup hooks
on one cgroup v2 directory, the tcp:tcp_destroy_sock tracepoint through a perf event). The
SOCK_OPS one comes in two kinds: `sock_ops` returns at once (the kernel then makes only the
callbacks it makes for any attached program), `sock_ops_state` also sets the state-change
callback flag at connect and at establishment, as the collector's program does, so that every
TCP state change calls it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ebpf import bpfsys

# enum bpf_prog_type
PROG_SCHED_CLS = 3
PROG_TRACEPOINT = 5
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18
BPF_PERF_EVENT = 41  # enum bpf_attach_type: a program on a perf event (the tracepoint's)

TCX_NEXT = -1  # a TCX program's "carry on with the next program", as flows.bpf.c returns
HELPER_SOCK_OPS_CB_FLAGS_SET = 59  # bpf_sock_ops_cb_flags_set
SOCK_OPS_TCP_CONNECT_CB, SOCK_OPS_ACTIVE_ESTABLISHED_CB, SOCK_OPS_PASSIVE_ESTABLISHED_CB = 3, 4, 5
SOCK_OPS_STATE_CB_FLAG = 1 << 2
SOCK_OPS_CB_FLAGS_OFFSET = 84  # struct bpf_sock_ops.bpf_sock_ops_cb_flags

PERF_TYPE_TRACEPOINT = 2
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
_PERF_ATTR_SIZE = 128
_libc = ctypes.CDLL(None, use_errno=True)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction: opcode, registers (src in the high nibble), offset, immediate."""
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


MOV64_IMM, MOV64_REG, OR64_IMM, LDX_W, JEQ_IMM, JA, CALL, EXIT = (
    0xB7, 0xBF, 0x47, 0x61, 0x15, 0x05, 0x85, 0x95)


def returning(value: int) -> bytes:
    """r0 = value; exit."""
    return insn(MOV64_IMM, 0, imm=value) + insn(EXIT)


# At TCP_CONNECT_CB, ACTIVE_ and PASSIVE_ESTABLISHED_CB: bpf_sock_ops_cb_flags_set(skops,
# skops->bpf_sock_ops_cb_flags | STATE_CB_FLAG), as flows.bpf.c's sock_ops does; return 1.
SOCK_OPS_STATE = b"".join([
    insn(MOV64_REG, 6, 1),  # r6 = skops
    insn(LDX_W, 2, 1, off=0),  # r2 = skops->op
    insn(JEQ_IMM, 2, off=3, imm=SOCK_OPS_TCP_CONNECT_CB),
    insn(JEQ_IMM, 2, off=2, imm=SOCK_OPS_ACTIVE_ESTABLISHED_CB),
    insn(JEQ_IMM, 2, off=1, imm=SOCK_OPS_PASSIVE_ESTABLISHED_CB),
    insn(JA, off=4),
    insn(LDX_W, 2, 6, off=SOCK_OPS_CB_FLAGS_OFFSET),
    insn(OR64_IMM, 2, imm=SOCK_OPS_STATE_CB_FLAG),
    insn(MOV64_REG, 1, 6),
    insn(CALL, imm=HELPER_SOCK_OPS_CB_FLAGS_SET),
    returning(1),
])


@dataclass(frozen=True)
class EmptyProgram:
    name: str  # at most 15 characters (the kernel keeps 15)
    prog_type: int
    attach_type: int  # a cgroup or TCX attach type; BPF_PERF_EVENT for the tracepoint
    code: bytes


# Hook name -> the programs the collector has there (connect and post_bind: IPv4 and IPv6).
HOOKS: dict[str, tuple[EmptyProgram, ...]] = {
    "tc": (EmptyProgram("empty_tc", PROG_SCHED_CLS, bpfsys.TCX_EGRESS, returning(TCX_NEXT)),),
    "sock_ops": (EmptyProgram("empty_sock_ops", PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS,
                              returning(1)),),
    "sock_ops_state": (EmptyProgram("empty_ops_state", PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS,
                                    SOCK_OPS_STATE),),
    "sock_create": (EmptyProgram("empty_create", PROG_CGROUP_SOCK,
                                 bpfsys.CGROUP_INET_SOCK_CREATE, returning(1)),),
    "sock_release": (EmptyProgram("empty_release", PROG_CGROUP_SOCK,
                                  bpfsys.CGROUP_INET_SOCK_RELEASE, returning(1)),),
    "connect": (
        EmptyProgram("empty_connect4", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT,
                     returning(1)),
        EmptyProgram("empty_connect6", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT,
                     returning(1)),
    ),
    "post_bind": (
        EmptyProgram("empty_bind4", PROG_CGROUP_SOCK, bpfsys.CGROUP_INET4_POST_BIND,
                     returning(1)),
        EmptyProgram("empty_bind6", PROG_CGROUP_SOCK, bpfsys.CGROUP_INET6_POST_BIND,
                     returning(1)),
    ),
    "destroy_tp": (EmptyProgram("empty_destroy", PROG_TRACEPOINT, BPF_PERF_EVENT,
                                returning(0)),),
}
# Every hook the collector uses, its SOCK_OPS program with state callbacks as the real one.
ALL_HOOKS = ("tc", "sock_ops_state", "sock_create", "sock_release", "connect", "post_bind",
             "destroy_tp")


def tracepoint_id(tracefs: Path, category: str, event: str) -> int:
    return int((tracefs / "events" / category / event / "id").read_text())


def perf_event_open_tracepoint(tp_id: int) -> int:
    """A perf event on a tracepoint, for a BPF program to hang on (cpu 0, any process: the
    program runs wherever the tracepoint fires, as bcc attaches tracepoints)."""
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    # type, size, config (the tracepoint id), sample_period 1
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, tp_id, 1)
    fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(tracepoint {tp_id}): {os.strerror(err)}")
    return fd


class EmptyHooks:
    """The empty programs of some hooks, loaded and attached; close() detaches them all."""

    def __init__(self, hooks: tuple[str, ...], cgroup: Path, tracefs: Path | None = None,
                 ifindex: int = 1) -> None:
        self._fds: list[int] = []
        self.prog_fds: list[int] = []
        try:
            cgroup_fd = self._keep(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY))
            for hook in hooks:
                for program in HOOKS[hook]:
                    self._attach(program, cgroup_fd, tracefs, ifindex)
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _attach(self, program: EmptyProgram, cgroup_fd: int, tracefs: Path | None,
                ifindex: int) -> None:
        expected = program.attach_type if program.prog_type in (
            PROG_CGROUP_SOCK, PROG_CGROUP_SOCK_ADDR) else 0
        prog_fd = self._keep(bpfsys.prog_load(program.prog_type, program.code, program.name,
                                              expected_attach_type=expected))
        self.prog_fds.append(prog_fd)
        if program.prog_type == PROG_SCHED_CLS:
            target = ifindex
        elif program.prog_type == PROG_TRACEPOINT:
            if tracefs is None:
                raise OSError("no tracefs mounted: cannot attach to tcp:tcp_destroy_sock")
            tp_id = tracepoint_id(tracefs, "tcp", "tcp_destroy_sock")
            target = self._keep(perf_event_open_tracepoint(tp_id))
        else:
            target = cgroup_fd
        self._keep(bpfsys.link_create(prog_fd, target, program.attach_type))

    def close(self) -> None:
        for fd in reversed(self._fds):  # links first, then programs, events and the cgroup
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.prog_fds.clear()

    def __enter__(self) -> EmptyHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
