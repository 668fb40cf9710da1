"""The few bpf(2) commands bcc 0.26 does not offer in a usable form, called directly.

- BPF_LINK_CREATE: TCX and cgroup attachments as links. A link lives as long as its file
  descriptor, so a crashed agent never leaves programs attached to the cgroup root or to
  interfaces (bcc's attach_func uses BPF_PROG_ATTACH, which outlives the process).
- BPF_MAP_LOOKUP_BATCH into one flat buffer: the live-flow read of a poll. bcc's
  items_lookup_batch builds two ctypes objects per entry; one bytes buffer sliced with
  struct.iter_unpack is several times faster for 100k flows.
- BPF_MAP_LOOKUP_AND_DELETE_ELEM: take a flow's final counters and remove it atomically.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_ATTR_SIZE = 144  # union bpf_attr of 6.x; the kernel accepts a larger zero-filled tail

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_SCHED_CLS = 3

# enum bpf_attach_type
CGROUP_INET_INGRESS = 0
CGROUP_INET_EGRESS = 1
CGROUP_INET_SOCK_CREATE = 2
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_INET4_POST_BIND = 12
CGROUP_INET6_POST_BIND = 13
CGROUP_INET_SOCK_RELEASE = 34
TCX_INGRESS = 46
TCX_EGRESS = 47


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


def prog_load(prog_type: int, insns: bytes, name: str, license_: bytes = b"GPL",
              expected_attach_type: int = 0) -> int:
    """Load already-relocated bytecode (map fds in place, as bcc emits it); returns the fd.
    Cgroup programs other than sock_create must name their attach type at load
    (`expected_attach_type`, a CGROUP_* constant here).

    Loaded without a verifier log (a program verified fine fails with ENOSPC when its log does
    not fit the buffer); a failure is retried with the log, for its last line."""
    try:
        return _prog_load(prog_type, insns, name, license_, 0, expected_attach_type)
    except BpfError:
        pass
    return _prog_load(prog_type, insns, name, license_, 1 << 24, expected_attach_type)


def _prog_load(prog_type: int, insns: bytes, name: str, license_: bytes, log_size: int,
               expected_attach_type: int) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_)
    log = ctypes.create_string_buffer(max(log_size, 1))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(
        "<IIQQIIQII16sII",
        attr,
        0,
        prog_type,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(lic),
        1 if log_size else 0,
        log_size,
        ctypes.addressof(log) if log_size else 0,
        0,
        0,
        name.encode()[:15],
        0,  # prog_ifindex
        expected_attach_type,
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except BpfError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise BpfError(exc.errno, f"{exc.strerror}: {detail[0]}") from None


def map_name(map_fd: int) -> str:
    """The name a map was created with (struct bpf_map_info.name, at most 15 characters)."""
    info = ctypes.create_string_buffer(80)  # struct bpf_map_info up to its name and beyond
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, map_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw[24:40].split(b"\0", 1)[0].decode()


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: one per possible CPU (fixed until
    reboot: read once)."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = 0
        for part in f.read().strip().split(","):
            last = max(last, int(part.split("-")[-1]))
    return last + 1


def percpu_sums(map_fd: int, keys: int) -> list[int]:
    """Per key 0..keys-1 of a per-CPU array of u64, the sum over CPUs."""
    cpus = possible_cpus()
    sums = []
    for key in range(keys):
        raw = lookup(map_fd, key.to_bytes(4, "little"), 8 * cpus) or bytes(8 * cpus)
        sums.append(sum(struct.unpack(f"<{cpus}Q", raw)))
    return sums


def link_create(prog_fd: int, target: int, attach_type: int) -> int:
    """Attach prog_fd to target (a cgroup fd, or an ifindex for TCX); returns the link fd.

    For TCX the ifindex is resolved in the calling thread's network namespace."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIII", attr, 0, prog_fd, target, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr)


def _elem_attr(map_fd: int, key: ctypes.Array, value: ctypes.Array | None, flags: int = 0):
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(
        "<I4xQQQ",
        attr,
        0,
        map_fd,
        ctypes.addressof(key),
        ctypes.addressof(value) if value is not None else 0,
        flags,
    )
    return attr


def lookup_and_delete(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of key, removed from the map in the same step; None if absent."""
    return _lookup(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map_fd, key, value_size)


def lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    return _lookup(BPF_MAP_LOOKUP_ELEM, map_fd, key, value_size)


def _lookup(cmd: int, map_fd: int, key: bytes, value_size: int) -> bytes | None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(cmd, _elem_attr(map_fd, kbuf, vbuf))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def update(map_fd: int, key: bytes, value: bytes) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(map_fd, kbuf, vbuf))


def delete(map_fd: int, key: bytes) -> bool:
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(map_fd, kbuf, None))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


class ElemOps:
    """Single-element operations on one map with reused buffers (the end-of-flow path runs
    them per flow: allocating ctypes buffers each time cost more than the syscall)."""

    def __init__(self, map_fd: int, key_size: int, value_size: int) -> None:
        self.value_size = value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = _elem_attr(map_fd, self._key, self._value)
        self._flags_at = 24

    def _call(self, cmd: int, key: bytes, flags: int = 0) -> bool:
        ctypes.memmove(self._key, key, len(key))
        struct.pack_into("<Q", self._attr, self._flags_at, flags)
        try:
            _bpf(cmd, self._attr)
        except BpfError as exc:
            if exc.errno in (errno.ENOENT, errno.EEXIST):
                return False
            raise
        return True

    def lookup_and_delete(self, key: bytes) -> bytes | None:
        if not self._call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key):
            return None
        return self._value.raw

    def restore(self, key: bytes, value: bytes) -> bool:
        """Put a value back unless the key was created again meanwhile (BPF_NOEXIST): False
        then. Raises BpfError E2BIG when the map filled up meanwhile."""
        ctypes.memmove(self._value, value, len(value))
        return self._call(BPF_MAP_UPDATE_ELEM, key, flags=1)


class BatchReader:
    """Reads a whole hash map with BPF_MAP_LOOKUP_BATCH into reusable flat buffers."""

    def __init__(self, map_fd: int, key_size: int, value_size: int, chunk: int = 8192) -> None:
        self.map_fd = map_fd
        self.key_size = key_size
        self.value_size = value_size
        self.chunk = chunk
        self._keys = ctypes.create_string_buffer(key_size * chunk)
        self._values = ctypes.create_string_buffer(value_size * chunk)
        # The batch cursor is opaque; for hash maps it is a 4-byte bucket index.
        self._in = ctypes.create_string_buffer(8)
        self._out = ctypes.create_string_buffer(8)

    def read(self) -> Iterator[tuple[bytes, bytes]]:
        """(keys, values) chunks: concatenated fixed-size records, for struct.iter_unpack."""
        first = True
        while True:
            attr = ctypes.create_string_buffer(_ATTR_SIZE)
            struct.pack_into(
                "<QQQQIIQQ",
                attr,
                0,
                0 if first else ctypes.addressof(self._in),
                ctypes.addressof(self._out),
                ctypes.addressof(self._keys),
                ctypes.addressof(self._values),
                self.chunk,  # count: in = room, out = entries returned
                self.map_fd,
                0,  # elem_flags
                0,  # flags
            )
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                done = True
            count = struct.unpack_from("<I", attr, 32)[0]
            if count:  # string_at copies only what the kernel filled, not the whole buffer
                yield (
                    ctypes.string_at(self._keys, count * self.key_size),
                    ctypes.string_at(self._values, count * self.value_size),
                )
            if done:
                return
            ctypes.memmove(self._in, self._out, 8)
            first = False
