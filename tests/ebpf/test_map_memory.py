"""The kernel maps' memory follows the flows they hold, not their capacity: preallocated for
250,000 entries, the flow map cost 64 MB before the first flow (bench.scale). Read from the
maps' memlock in /proc/self/fdinfo, which for a map allocated per entry counts its bucket array
and each live entry."""

from __future__ import annotations

import socket

from tests.ebpf.conftest import open_collector, poll_reading_the_map

BPF_F_NO_PREALLOC = 1
CAPACITY = 1 << 20
SENT_FLOWS = 3000
# A live flow entry: the kernel's element header (48 B), struct flow_key (48) and struct
# flow_val (144), and the allocator's list node (8).
ENTRY_BYTES = 248


def fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def entries_and_memlock(collector) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The flow map's entries (host-wide, as a poll reads them) and its memlock right after."""
    poll_reading_the_map(collector)
    return collector.stats().flows_in_map, int(fdinfo(collector._flows_fd)["memlock"])


def test_flow_map_memory_follows_its_entries(needs_root):
    collector = open_collector(max_flows=CAPACITY)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flows = fdinfo(collector._flows_fd)
        assert int(flows["max_entries"]) == CAPACITY
        assert int(flows["map_flags"], 16) & BPF_F_NO_PREALLOC
        for name in ("socks", "ports", "watched"):  # one entry per socket (on lo: per flow entry)
            info = fdinfo(collector._loaded.table_fd(name))
            assert int(info["max_entries"]) == CAPACITY, name
            assert int(info["map_flags"], 16) & BPF_F_NO_PREALLOC, name
        entries, memlock = entries_and_memlock(collector)
        # The bucket array (16 B per entry of capacity) and whatever the host has in flight;
        # preallocated, the capacity alone would be over 240 MB.
        assert memlock < CAPACITY * 16 + (entries + 10_000) * 2 * ENTRY_BYTES
        # UDP on lo: an entry per direction for each datagram's flow (a port unreachable
        # answer may add ICMP ones), until the sending socket is released.
        for port in range(40000, 40000 + SENT_FLOWS):
            sender.sendto(b"x", ("127.0.0.1", port))
        more_entries, more_memlock = entries_and_memlock(collector)
        added = more_entries - entries
        assert added >= SENT_FLOWS, f"{added} entries for {SENT_FLOWS} flows sent"
        per_entry = (more_memlock - memlock) / added
        # Other traffic on the host moves both readings a little; a preallocated map does not
        # move at all.
        assert 0.8 * ENTRY_BYTES < per_entry < 1.25 * ENTRY_BYTES, per_entry
    finally:
        sender.close()
        collector.close()
