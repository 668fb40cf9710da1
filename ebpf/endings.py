"""When a TCP connection's flows are final, for the connections the kernel does not finalise.

Most TCP connections end in the kernel: the counting programs see both FINs acknowledged (or a
RST), send the final counters and delete the entries (ebpf/flows.bpf.c track_end). The agent
hears of a socket's end only when that cannot happen on its own: SOCK_OPS reports a close while
the connection's entries exist and the socket did not hand over to a timewait socket (SYN_SENT
and LAST_ACK timeouts, a close just before an abortive RST), and tcp_destroy_sock reports the
sockets that existed before the agent. A socket closed in FIN_WAIT1/FIN_WAIT2/CLOSING (old
state unknown included) hands over to a timewait mini-socket, which still receives the peer's
FIN and sends the last ACK: such a connection stays open here until both FINs (or a RST) went by
and the flows were quiet for SETTLE_NS, or until tcp_fin_timeout passed. Other closes end once
the flows are quiet. A final record arriving meanwhile cancels the wait (FlowEnds._finals).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ebpf import layout
from ebpf.layout import KEY_DIRECTION, ConnId
from ebpf.observation import Direction

SETTLE_NS = 20_000_000
TCP_FIN, TCP_RST = 0x01, 0x04
# Old states after which a timewait socket may still exchange FIN/ACK (tcp_states.h numbers);
# 0: unknown (tcp_destroy_sock does not say).
HANDOVER_STATES = {0, 4, 5, 11}  # unknown, FIN_WAIT1, FIN_WAIT2, CLOSING


def fin_timeout_ns() -> int:
    try:
        with open("/proc/sys/net/ipv4/tcp_fin_timeout") as f:
            seconds = int(f.read().strip())
    except (OSError, ValueError):
        seconds = 60
    return (seconds + 1) * 1_000_000_000


@dataclass
class Closing:
    cookie: int
    handover: bool
    deadline_ns: int
    gens: dict[bytes, int]  # kernel key -> generation when the socket closed
    keys: list[bytes]  # the connection's two kernel keys
    heard_ns: int  # when the close was heard (monotonic)


class Endings:
    def __init__(self) -> None:
        self.closing: dict[ConnId, Closing] = {}
        self._cookies: dict[int, int] = {}  # cookie -> connections of it still closing
        self._fin_timeout_ns = fin_timeout_ns()

    def add(self, conn: ConnId, cookie: int, old_state: int, gens: dict[bytes, int]
            ) -> Closing | None:
        """Start waiting for conn's end; returns the entry it replaces (an earlier connection
        on the same 5-tuple, whose flows the kernel retired when the new one began)."""
        handover = old_state in HANDOVER_STATES
        now = time.monotonic_ns()
        deadline = now + (self._fin_timeout_ns if handover else 0)
        replaced = self.closing.get(conn)
        if replaced is not None:
            self._drop_cookie(replaced.cookie)
        self.closing[conn] = Closing(cookie, handover, deadline, gens, layout.kernel_keys_of(conn),
                                     now)
        self._cookies[cookie] = self._cookies.get(cookie, 0) + 1
        return replaced

    def cancel(self, conn: ConnId) -> int | None:
        """The kernel finalised conn itself: stop waiting; returns its cookie if it waited."""
        closing = self.closing.pop(conn, None)
        if closing is None:
            return None
        self._drop_cookie(closing.cookie)
        return closing.cookie

    def has_cookie(self, cookie: int) -> bool:
        return cookie in self._cookies

    def _drop_cookie(self, cookie: int) -> None:
        left = self._cookies.get(cookie, 0) - 1
        if left > 0:
            self._cookies[cookie] = left
        else:
            self._cookies.pop(cookie, None)

    def ready(self, reported: dict, read_ns: int | None = None
              ) -> list[tuple[ConnId, int, dict[bytes, int]]]:
        """(connection, cookie, generations) of connections whose flows are final now; they
        leave the closing set. read_ns: when the read that filled `reported` began. Quiet is
        judged at that time, not now: a slow poll must not take a flow that was quiet when
        read but got its last ACK since for finished (that ACK would become a new flow)."""
        now = time.monotonic_ns()
        if read_ns is None:
            read_ns = now
        done = []
        for conn, closing in self.closing.items():
            sent = received = last_ns = current = 0
            for kraw in closing.keys:
                seen = reported.get(kraw)  # collector.Reported of the last poll
                if seen is None or seen.packets is None or seen.gen != closing.gens.get(kraw, 0):
                    continue  # unseen, or a newer connection already took the key
                current += 1
                last_ns = max(last_ns, seen.last_ns)
                if kraw[KEY_DIRECTION] == Direction.EGRESS:
                    sent |= seen.tcp_flags
                else:
                    received |= seen.tcp_flags
            if not current and not closing.gens:
                # No poll had read the flows when the socket closed (a TCP flow is read live
                # only once it is MIN_LIVE_AGE_NS old): quiet counts from the close instead.
                last_ns = closing.heard_ns
            quiet = read_ns - last_ns >= SETTLE_NS
            finished = (sent | received) & TCP_RST or (sent & received & TCP_FIN)
            # Every key retired by the kernel (a new connection took the 5-tuple): done.
            timed_out = now >= closing.deadline_ns or bool(closing.gens and not current)
            if quiet and (finished or timed_out or not closing.handover):
                done.append((conn, closing.cookie, closing.gens))
        for conn, cookie, _ in done:
            del self.closing[conn]
            self._drop_cookie(cookie)
        return done
