"""Compiling flows.bpf.c with bcc in a child process, so that LLVM never lives in the agent.

bcc compiles in-process with clang/LLVM: importing and running it costs the agent ~120 MB of
resident memory it never needs again (bench.scale: RSS ~160 MB after loading, of which the
Python agent itself is ~40 MB). So a short-lived child (`python -m ebpf.compiler`) compiles
the module, creates its maps, loads the socket-level programs, lets bcc attach the tracepoint
and dumps the counting programs' bytecode (they are loaded per network namespace later). It
hands every map, program and perf-event file descriptor to the parent over a unix socket
(SCM_RIGHTS) and exits without bcc's cleanup; the kernel objects live on in the parent's
descriptors. The dumped bytecode names maps by the child's descriptor numbers (ld_imm64 with
BPF_PSEUDO_MAP_FD); `relocate_maps` rewrites them to the parent's.

Protocol, child -> parent on one SOCK_STREAM socket: the descriptors ride on the first
sendmsg, then a JSON document follows until EOF: {"maps": [[name, child_fd], ...],
"programs": [name, ...], "tracepoints": n, "tc_code": {name: hex}, "headers": {...}} in the
order the descriptors were sent (maps, programs, tracepoint perf events), or {"error": text}.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ebpf import bpfsys
from ebpf.errors import EbpfUnavailable
from ebpf.headers import KernelHeaders

SOURCE = Path(__file__).with_name("flows.bpf.c")
LD_IMM64 = 0x18
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2  # ld_imm64 src_reg: imm holds a map fd
MAX_FDS = 64  # more than flows.bpf.c will ever hand over; a larger count fails loudly
COMPILE_TIMEOUT_S = 300  # clang on a loaded 2-core VM takes ~10 s


@dataclass
class Compiled:
    """What the child made, as file descriptors of this process."""

    maps: dict[str, int]
    programs: dict[str, int]  # the socket-level programs, loaded, not attached
    tracepoint_fds: list[int]  # perf events holding the attached tracepoint programs
    tc_code: dict[str, bytes]  # counting programs' bytecode, maps relocated to `maps`
    headers: KernelHeaders

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.programs.values(), *self.tracepoint_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)


def relocate_maps(insns: bytes, fds: dict[int, int]) -> bytes:
    """The bytecode with every map fd in an ld_imm64 replaced by fds[fd]."""
    code = bytearray(insns)
    at = 0
    while at + 16 <= len(code):
        if code[at] == LD_IMM64:
            if code[at + 1] >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                old = int.from_bytes(code[at + 4 : at + 8], "little")
                if old not in fds:
                    raise EbpfUnavailable(f"bytecode refers to map fd {old}, which was not passed")
                code[at + 4 : at + 8] = fds[old].to_bytes(4, "little")
            at += 16  # ld_imm64 takes two instruction slots
        else:
            at += 8
    return bytes(code)


def compile_in_child(max_flows: int, max_socks: int, ringbuf_pages: int) -> Compiled:
    """Runs the compile in `python -m ebpf.compiler`; raises EbpfUnavailable with its error."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent_end:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "ebpf.compiler", str(child_end.fileno()),
                 str(max_flows), str(max_socks), str(ringbuf_pages)],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the agent's stdout may be a record stream
                cwd=Path(__file__).resolve().parent.parent,
            )
        finally:
            child_end.close()
        fds: list[int] = []
        try:
            parent_end.settimeout(COMPILE_TIMEOUT_S)
            data, fds = _receive_all(parent_end)
        except OSError as exc:
            child.kill()
            raise EbpfUnavailable(f"the BPF compiler process failed: {exc}") from exc
        finally:
            child.wait()
    try:
        return _decode(data, fds, child.returncode)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive_all(sock: socket.socket) -> tuple[bytes, list[int]]:
    chunks, fds = [], []
    while True:
        data, more, flags, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS,
                                                 socket.MSG_CMSG_CLOEXEC)
        fds += more
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise OSError(f"more than {MAX_FDS} descriptors sent")
        if not data:
            return b"".join(chunks), fds
        chunks.append(data)


def _decode(data: bytes, fds: list[int], returncode: int) -> Compiled:
    try:
        doc = json.loads(data)
    except ValueError:
        raise EbpfUnavailable(
            f"the BPF compiler process exited with status {returncode} without a result"
        ) from None
    if "error" in doc:
        raise EbpfUnavailable(doc["error"])
    names = [name for name, _ in doc["maps"]]
    expected = len(names) + len(doc["programs"]) + doc["tracepoints"]
    if len(fds) != expected:
        raise EbpfUnavailable(f"the BPF compiler passed {len(fds)} of {expected} descriptors")
    maps = dict(zip(names, fds, strict=False))
    moved = {child_fd: fds[i] for i, (_, child_fd) in enumerate(doc["maps"])}
    programs = dict(zip(doc["programs"], fds[len(names) :], strict=False))
    tracepoints = fds[len(names) + len(programs) :]
    tc_code = {name: relocate_maps(bytes.fromhex(code), moved)
               for name, code in doc["tc_code"].items()}
    headers = doc["headers"]
    headers["source_dir"] = Path(headers["source_dir"])
    headers["cflags"] = tuple(headers["cflags"])
    return Compiled(maps, programs, tracepoints, tc_code, KernelHeaders(**headers))


# -- the child ----------------------------------------------------------------------------------


def _compile_and_send(sock: socket.socket, max_flows: int, max_socks: int,
                      ringbuf_pages: int) -> None:
    from ebpf import loader

    bcc = loader.import_bcc()
    module, headers = _compile(bcc, max_flows, max_socks, ringbuf_pages)
    maps = _map_fds()
    programs = {}
    for func, prog_type, attach_type in loader.CGROUP_PROGRAMS:
        fn = module.load_func(func.encode(), getattr(bcc.BPF, prog_type), attach_type=attach_type)
        programs[func] = fn.fd
    tracepoints = list(module.tracepoint_fds.values())  # bcc attached TRACEPOINT_PROBEs
    tc_code = {name: module.dump_func(name.encode()).hex() for name in loader.TC_PROGRAMS}
    header = asdict(headers)
    header["source_dir"] = str(header["source_dir"])
    doc = {"maps": [[name, fd] for name, fd in maps.items()], "programs": list(programs),
           "tracepoints": len(tracepoints), "tc_code": tc_code, "headers": header}
    socket.send_fds(sock, [json.dumps(doc).encode()],
                    [*maps.values(), *programs.values(), *tracepoints])


def _map_fds() -> dict[str, int]:
    """name -> fd of every BPF map this process holds (all of them bcc's, in the child)."""
    found = {}
    for entry in os.listdir("/proc/self/fdinfo"):
        fd = int(entry)
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                is_map = any(line.startswith("map_type:") for line in f)
        except OSError:
            continue
        if is_map:
            found[bpfsys.map_name(fd)] = fd
    return found


def _compile(bcc, max_flows: int, max_socks: int, ringbuf_pages: int):  # type: ignore[no-untyped-def]
    from ebpf.headers import find_headers
    from ebpf.loader import tracefs_mount

    headers = find_headers()
    if tracefs_mount() is None:
        raise EbpfUnavailable("tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing")
    cflags = [
        f"-DMAX_FLOWS={max_flows}",
        f"-DMAX_SOCKS={max_socks}",
        f"-DRINGBUF_PAGES={ringbuf_pages}",
        *headers.cflags,
    ]
    with tempfile.TemporaryFile() as diagnostics:
        try:
            with _stderr_to(diagnostics), headers.applied():
                module = bcc.BPF(src_file=str(SOURCE).encode(), cflags=cflags)
        except Exception as exc:
            diagnostics.seek(0)
            errors = [line for line in diagnostics.read().decode(errors="replace").splitlines()
                      if "error" in line.lower()]
            detail = errors[0].strip() if errors else str(exc)
            raise EbpfUnavailable(
                f"bcc could not compile {SOURCE.name} with headers {headers.describe()}: {detail}"
            ) from exc
    return module, headers


@contextlib.contextmanager
def _stderr_to(file) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Send file descriptor 2 (where clang and libbpf write) to file meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    try:
        _compile_and_send(sock, *(int(a) for a in argv[1:4]))
    except Exception as exc:  # the parent gets the reason instead of a bare exit status
        message = str(exc) if isinstance(exc, EbpfUnavailable) else (
            f"loading the flow programs failed: {type(exc).__name__}: {exc}")
        sock.sendall(json.dumps({"error": message}).encode())
    sock.close()
    # No interpreter teardown: bcc's cleanup would detach the tracepoint the parent now holds.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
