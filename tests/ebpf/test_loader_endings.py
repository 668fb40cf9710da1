"""When a closed TCP connection's flows are final (ebpf/endings.py): pure Python, no root.

The collector judges quiet at the time its map read began, not when it gets to the endings: a
slow poll must not take a flow that was quiet long ago for finished while its last ACK may have
been counted since the read (that ACK would come back as a flow of its own)."""

from __future__ import annotations

import errno
import time

import pytest

from ebpf import layout
from ebpf.bpfsys import BpfError
from ebpf.endings import SETTLE_NS, Endings
from ebpf.flow_ends import FlowEnds, Reported

TCP_ACK, TCP_FIN = 0x10, 0x01
LAST_ACK = 9  # tcp_states.h: not a hand-over to a timewait socket
FIN_WAIT2 = 5


def connection(netns: int = 7, client_port: int = 40000):
    conn = (netns, 6, 4, b"\x7f\x00\x00\x01", client_port, b"\x7f\x00\x00\x01", 80)
    return conn, layout.kernel_keys_of(conn)


def seen(kraw: bytes, last_ns: int, flags: int) -> Reported:
    reported = Reported(layout.conn_of(layout.key_parts(kraw)))
    reported.keep(layout.FlowValue(*([0] * 4), flags, *([0] * 12))._replace(last_ns=last_ns))
    return reported


def closing(old_state: int, last_ns: int, flags: int):
    conn, keys = connection()
    reported = {kraw: seen(kraw, last_ns, flags) for kraw in keys}
    endings = Endings()
    endings.add(conn, cookie=1234, old_state=old_state, gens={k: 0 for k in keys})
    return endings, reported, conn


def test_quiet_is_judged_at_the_read_not_at_the_end_of_a_slow_poll():
    read_ns = time.monotonic_ns()
    last_packet = read_ns - SETTLE_NS // 2  # 10 ms before the read: not quiet then
    endings, reported, conn = closing(LAST_ACK, last_packet, TCP_FIN | TCP_ACK)
    time.sleep(2 * SETTLE_NS / 1e9)  # the poll took long: "now" is quiet, the read was not
    assert endings.ready(reported, read_ns) == []
    assert conn in endings.closing
    done = endings.ready(reported, read_ns + SETTLE_NS)
    assert [c for c, _, _ in done] == [conn]
    assert conn not in endings.closing


def test_without_a_read_time_quiet_is_judged_now():
    last_packet = time.monotonic_ns() - 2 * SETTLE_NS
    endings, reported, conn = closing(LAST_ACK, last_packet, TCP_FIN | TCP_ACK)
    assert [c for c, cookie, _ in endings.ready(reported)] == [conn]


def test_hand_over_waits_for_both_fins_even_when_quiet():
    read_ns = time.monotonic_ns()
    endings, reported, conn = closing(FIN_WAIT2, read_ns - 2 * SETTLE_NS, TCP_ACK)
    egress = next(k for k in reported if k[layout.KEY_DIRECTION] == 1)
    reported[egress] = seen(egress, read_ns - 2 * SETTLE_NS, TCP_FIN | TCP_ACK)
    assert endings.ready(reported, read_ns) == []  # our FIN only: the peer's is still due
    for kraw in reported:
        reported[kraw] = seen(kraw, read_ns - 2 * SETTLE_NS, TCP_FIN | TCP_ACK)
    assert [c for c, _, _ in endings.ready(reported, read_ns)] == [conn]


def test_flows_no_poll_read_settle_from_the_close():
    """A connection closed before a poll read its flows (young: ebpf/collector.py
    MIN_LIVE_AGE_NS) has no last packet time here: its packets may still be arriving, so it is
    taken only once the close is SETTLE_NS old, not at once."""
    conn, _ = connection()
    endings = Endings()
    endings.add(conn, cookie=1234, old_state=LAST_ACK, gens={})
    heard = endings.closing[conn].heard_ns
    assert endings.ready({}, heard + SETTLE_NS // 2) == []
    assert [c for c, _, _ in endings.ready({}, heard + SETTLE_NS)] == [conn]


class TakingFlows(FlowEnds):
    """FlowEnds over a fake map whose put-back fails the way the kernel's can under churn."""

    def __init__(self, restore_outcome: object) -> None:
        self._restore_outcome = restore_outcome
        self._elems = self
        self.entries: dict[bytes, bytes] = {}

    def lookup_and_delete(self, kraw: bytes) -> bytes | None:
        return self.entries.pop(kraw, None)

    def restore(self, kraw: bytes, raw: bytes) -> bool:
        if isinstance(self._restore_outcome, BaseException):
            raise self._restore_outcome
        if self._restore_outcome:
            self.entries[kraw] = raw
        return bool(self._restore_outcome)


def test_a_full_map_on_put_back_does_not_end_the_poll() -> None:
    """Under a flood of connections other CPUs can fill the map between the delete and the
    put-back: E2BIG then, which once killed the collector's poll."""
    _, keys = connection()
    flows = TakingFlows(BpfError(errno.E2BIG, "map full"))
    newer = layout.FlowValue(*([0] * 17))._replace(packets=7, gen=3)
    flows.entries[keys[0]] = layout.FLOW_VAL.pack(*newer)
    assert flows._take(keys[0], gen=2) is None  # not the generation asked for
    broken = TakingFlows(BpfError(errno.EBADF, "bad fd"))
    broken.entries[keys[0]] = layout.FLOW_VAL.pack(*newer)
    with pytest.raises(BpfError):  # anything else is still an error
        broken._take(keys[0], gen=2)


def test_a_newer_generation_goes_back_into_the_map() -> None:
    _, keys = connection()
    flows = TakingFlows(True)
    newer = layout.FlowValue(*([0] * 17))._replace(packets=7, gen=3)
    flows.entries[keys[0]] = raw = layout.FLOW_VAL.pack(*newer)
    assert flows._take(keys[0], gen=2) is None
    assert flows.entries == {keys[0]: raw}
    assert flows._take(keys[0], gen=3) == newer
