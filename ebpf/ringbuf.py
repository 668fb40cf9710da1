"""Reading a BPF ring buffer map through its mmap, all pending records at once.

bcc's ring buffer reader calls a Python (ctypes) callback per record; under connection churn
that is tens of thousands of callbacks a second, each copying its record with string_at. Here a
drain walks the records between the consumer and producer positions in the mapped memory and
slices them out, then publishes the new consumer position once.

Layout (kernel/bpf/ringbuf.c, the same contract libbpf's ring_buffer__consume uses): page 0 is
the consumer position (u64, ours to write); page 1 the producer position (u64, read-only); the
data area follows, mapped twice in a row so that a record wrapping around the end reads as one
slice. Each record has an 8-byte header: u32 length with BUSY (bit 31: still being written) and
DISCARD (bit 30) flags, u32 page offset; records are 8-byte aligned.

Ordering: the kernel publishes a record by clearing BUSY with a release store after writing it,
and we read the header before the record. x86-64 does not reorder loads with other loads, so
plain reads suffice there; on weakly ordered CPUs (arm64) a record could in principle be read
before its header, which the interpreter's hundreds of instructions between the two reads make
improbable but not impossible.
"""

from __future__ import annotations

import mmap
import select
import struct

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = struct.Struct("<II")
U64 = struct.Struct("<Q")


def map_max_entries(map_fd: int) -> int:
    """A map's max_entries (for a ring buffer: its data size in bytes), from fdinfo."""
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        for line in f:
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    raise OSError(f"fd {map_fd} is not a BPF map")


class RingReader:
    def __init__(self, map_fd: int) -> None:
        self.size = map_max_entries(map_fd)
        if self.size & (self.size - 1):
            raise ValueError(f"ring buffer size {self.size} is not a power of two")
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data_at = page  # in the producer mapping
        self._poller = select.poll()
        self._poller.register(map_fd, select.POLLIN)
        self._closed = False

    def wait(self, timeout_ms: int) -> None:
        """Sleep until a record is pending or timeout_ms passed. A ring buffer polls readable
        whenever its consumer position is behind the producer's, wakeups or not: under churn
        (records pending again by the time a drain is done) this returns at once. What the kernel's
        BPF_RB_NO_WAKEUP changes: an agent already asleep here is not woken by a new record, so
        a quiet host's agent wakes per poll timeout, not per record."""
        self._poller.poll(max(0, timeout_ms))

    def drain(self) -> list[bytes]:
        """Every complete record pending, oldest first; they are consumed."""
        consumer_pos = U64.unpack_from(self._consumer, 0)[0]
        producer_pos = U64.unpack_from(self._producer, 0)[0]
        if consumer_pos >= producer_pos:
            return []
        data, base, mask = self._producer, self._data_at, self.size - 1
        unpack_header = HEADER.unpack_from
        records = []
        pos = consumer_pos
        while pos < producer_pos:
            at = base + (pos & mask)
            length = unpack_header(data, at)[0]
            if length & BUSY:
                break  # reserved, not submitted yet: later records wait behind it
            flags_cleared = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                records.append(data[at + 8 : at + 8 + flags_cleared])
            pos += (flags_cleared + 8 + 7) & ~7
        if pos != consumer_pos:
            U64.pack_into(self._consumer, 0, pos)
        return records

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._consumer.close()
        self._producer.close()
