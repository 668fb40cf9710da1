"""End of flow in the collector: sockets that ended, and flows the kernel retired.

A mixin of FlowCollector (it works on the collector's maps and caches); kept apart so the
collector module stays about reading live flows.
"""

from __future__ import annotations

import errno
import time

from ebpf import layout
from ebpf.attribution import INITIATED_BY_ORIGIN
from ebpf.bpfsys import BpfError
from ebpf.layout import (
    DIRECTIONS,
    KEY_DIRECTION,
    ConnId,
)
from ebpf.observation import (
    Direction,
    EndCause,
    FlowKey,
    FlowObservation,
    ProcessInfo,
    TcpHealth,
)

TCP, UDP = 6, 17
TCP_FIN, TCP_RST = 0x01, 0x04
NS_PER_MS = 1_000_000
FLOW_KEY_PACK = layout.FLOW_KEY.pack

# What _finals decodes of a final record: both directions' counters, and the socket facts of
# the egress direction. One decoder per key direction (the egress value is the record's own or
# the other) and IP version: FINAL_DECODERS[direction + 2 * (ipver == 4)].
_COUNTS = ("octets", "packets", "first_ns", "last_ns", "tcp_flags", "ifindex")
EGRESS_FIELDS = ("octets", "packets", "first_ns", "last_ns", "tcp_flags", "cookie",
                 "cgroup_id", "retrans_packets", "retrans_bytes", "ifindex", "srtt_us",
                 "min_rtt_us", "snd_cwnd", "state", "tgid", "uid", "origin", "comm")
FINAL_DECODERS = [
    layout.final_decoder(own, other, ipv4).unpack
    for ipv4 in (False, True)
    for own, other in ((_COUNTS, EGRESS_FIELDS), (EGRESS_FIELDS, _COUNTS))
]


class Reported:
    """What the last poll read of one kernel flow key, for as long as the flow lives: its
    last_ns and generation, to skip it while unchanged; the counters and flags release() and
    the endings need of the last read (not the whole value: at 100k connections the last
    FlowValue of every key was ~0.5 KB a flow, bench.scale); and the FlowKey and attribution
    built once and reused. The direction and protocol are read from the kernel key itself
    (KEY_DIRECTION, KEY_PROTOCOL)."""

    __slots__ = ("conn", "last_ns", "gen", "octets", "packets", "tcp_flags", "key", "cookie",
                 "process", "initiated")

    def __init__(self, conn: ConnId, gen: int = 0) -> None:
        self.conn = conn
        self.last_ns = -1
        self.gen = gen
        self.octets = 0
        self.packets: int | None = None  # None: no poll read this generation yet
        self.tcp_flags = 0
        self.key: FlowKey | None = None
        self.cookie = 0
        self.process: ProcessInfo | None = None
        self.initiated: bool | None = None

    def keep(self, value: layout.FlowValue) -> None:
        """Remember what later polls need of a value just read."""
        self.last_ns = value.last_ns
        self.octets = value.octets
        self.packets = value.packets
        self.tcp_flags = value.tcp_flags


class FlowEnds:
    """End-of-flow handling of FlowCollector (see the collector for the attributes)."""

    def _socket_ended(self, event: layout.Event, out: list[FlowObservation],
                      index: dict[bytes, int]) -> None:
        conns = self._attr.conns_of_cookie(event.cookie)
        if event.conn is not None:
            conns.add(event.conn)
        if event.info is not None:
            self._attr.remember(event.cookie, event.info)
        if event.kind == layout.EV_SOCK_RELEASE:
            self._finish(event.cookie, conns, out, index)
            return
        for conn in conns:  # TCP: the flows may outlive the socket (ebpf/endings.py)
            gens = {k: self._reported[k].gen for k in layout.kernel_keys_of(conn)
                    if k in self._reported}
            replaced = self._endings.add(conn, event.cookie, event.old_state, gens)
            if replaced is not None and replaced.cookie != event.cookie:
                self._attr.forget_cookie(replaced.cookie)

    def _take(self, kraw: bytes, gen: int | None) -> layout.FlowValue | None:
        """Remove a flow entry and return its value, unless a newer connection (another
        generation than gen) holds it now: then it goes back and None is returned."""
        raw = self._elems.lookup_and_delete(kraw)
        if raw is None:
            return None
        value = layout.decode_value(raw)
        if gen is None or value.gen == gen:
            return value
        try:
            self._elems.restore(kraw, raw)
        except BpfError as exc:
            # Other flows filled the map between the delete and the put-back (churn on other
            # CPUs): the newer connection's counts so far are lost, but a poll must not die of
            # it (it did, with E2BIG, under a flood of connections).
            if exc.errno != errno.E2BIG:
                raise
        return None

    def _retire(self, kraw: bytes, value: layout.FlowValue, out: list[FlowObservation]) -> None:
        """The kernel restarted a flow entry for a new connection on the same 5-tuple; value
        holds the old connection's final counters."""
        seen = self._retired_seen.pop(kraw, None)
        current = self._reported.get(kraw)
        if seen is None:
            if current is not None and current.gen == value.gen:
                seen = current
            else:
                seen = Reported(layout.conn_of(layout.key_parts(kraw)), gen=value.gen)
        if current is None or current.gen == value.gen:
            self._reported[kraw] = Reported(seen.conn, gen=value.gen + 1)
        twin = self._reported.get(layout.twin_key(kraw))
        twin_flags = twin.tcp_flags if twin is not None else 0
        egress = kraw[KEY_DIRECTION] == Direction.EGRESS
        sent, received = (value.tcp_flags, twin_flags) if egress else (twin_flags, value.tcp_flags)
        cause = _cause_from_flags(sent, received)
        obs = self._observation(kraw, seen, value, self._offset_ns, cause)
        if obs is None:
            return
        if kraw in self._retired_keys:
            self._pending.append(obs)  # one ending per key and poll (see FlowCollector.poll)
        else:
            out.append(obs)
            self._retired_keys.add(kraw)

    def _finals(self, records: list[bytes], out: list[FlowObservation],
                index: dict[bytes, int]) -> None:
        """TCP connections the kernel finalised (EV_FLOW_FINAL): a record holds both directions'
        final counters and the sending process, and the entries are gone already. No map
        operation here, and state only for a connection a poll saw live or whose socket's
        close came first (ebpf/flows.bpf.c: close_needs_agent).

        The commonest work of the agent under connection churn (a TCP connection on lo comes
        as one EV_LOOPBACK_FINAL instead: LoopbackEnds._loopback_finals), so written flat: a
        record is decoded into only the fields used (decoding all 56 was ~40% of this loop),
        and no call is made per record that a lookup avoids."""
        offset = self._offset_ns
        reported = self._reported
        closing = self._endings.closing
        inodes = self._attacher.cookie_to_inode
        attr = self._attr
        scoped = attr.scoped
        cookie_conns, cookie_socks = attr.cookie_tables()
        fin, closed, rst_sent, rst_received = (EndCause.FIN, EndCause.CLOSED, EndCause.RST_SENT,
                                               EndCause.RST_RECEIVED)
        final_keys, retired_keys, deferred = (self._final_keys, self._retired_keys,
                                              self._deferred_finals)
        key_bytes, pack_key, new = layout.FINAL_KEY_BYTES, FLOW_KEY_PACK, tuple.__new__
        ipver_at, direction_at = layout.FINAL_IPVER_AT, layout.FINAL_DIRECTION_AT
        decoders = FINAL_DECODERS
        ingress, egress = DIRECTIONS
        process_of, processes = layout.process_info, layout.PROCESSES
        initiated_by = INITIATED_BY_ORIGIN.get
        # Keys taken this poll before these records: retired, or deferred finals sent already.
        clash_possible = bool(retired_keys or final_keys)
        for raw in records:
            ipver, direction = raw[ipver_at], raw[direction_at]
            if direction:  # EGRESS: the key is local -> remote, and its value the sender's
                (has_other, netns, saddr, daddr, sport, dport, proto,
                 octets, packets, first_ns, last_ns, own_flags, cookie, cgroup_id,
                 retrans_packets, retrans_bytes, ifindex, srtt_us, min_rtt_us, snd_cwnd, state,
                 tgid, uid, origin, comm,
                 o_octets, o_packets, o_first_ns, o_last_ns, other_flags, o_ifindex,
                 ) = decoders[1 + 2 * (ipver == 4)](raw)
                conn = (netns, proto, ipver, saddr, sport, daddr, dport)
                sent = own_flags
                received = other_flags if has_other else 0
            else:
                (has_other, netns, saddr, daddr, sport, dport, proto,
                 octets, packets, first_ns, last_ns, own_flags, ifindex,
                 o_octets, o_packets, o_first_ns, o_last_ns, other_flags, cookie, cgroup_id,
                 retrans_packets, retrans_bytes, o_ifindex, srtt_us, min_rtt_us, snd_cwnd, state,
                 tgid, uid, origin, comm,
                 ) = decoders[2 * (ipver == 4)](raw)
                conn = (netns, proto, ipver, daddr, dport, saddr, sport)
                received = own_flags
                if has_other:
                    sent = other_flags
                else:  # no egress direction in the record: nothing known of the socket
                    sent = cookie = srtt_us = snd_cwnd = origin = 0
            kraw = raw[key_bytes]
            twin = pack_key(netns, daddr, saddr, dport, sport, proto, ipver, 1 - direction)
            resolved = not origin
            if resolved:  # a socket older than the agent: the start-up scan knows it
                cookie, process, initiated = attr.resolve(conn, cookie)
            else:
                process = processes.get((tgid, uid, cgroup_id, comm))
                if process is None:
                    process = process_of(tgid, uid, cgroup_id, comm)
                initiated = initiated_by(origin)
            if srtt_us or snd_cwnd:
                health = TcpHealth(retrans_packets, retrans_bytes, srtt_us, min_rtt_us,
                                   snd_cwnd, state)
            else:
                health = attr.health(conn)
            # Forget what a live read, the socket map read or an earlier close event kept of the
            # connection and its socket (a TCP socket has one connection).
            forget = resolved
            if reported:  # both keys go, whatever the first one says
                seen, seen_twin = reported.pop(kraw, None), reported.pop(twin, None)
                forget = forget or seen is not None or seen_twin is not None
            if forget:
                attr.forget_conn(conn)
            if cookie and (cookie in cookie_conns or cookie in cookie_socks):
                attr.forget_cookie(cookie)
            if closing and conn in closing:
                waited = self._endings.cancel(conn)
                if waited is not None and not self._endings.has_cookie(waited):
                    attr.forget_cookie(waited)
            if process is None and scoped:
                continue
            if (sent | received) & TCP_RST:  # _cause_from_flags, inlined
                cause = rst_sent if sent & TCP_RST else rst_received
            else:
                cause = fin if (sent | received) & TCP_FIN else closed
            inode = inodes.get(netns)
            if inode is None:
                inode = self._netns_inode(netns)
            # FlowKey is a NamedTuple: tuple.__new__ builds it without its Python __new__.
            key = new(FlowKey, (inode, egress if direction else ingress, ipver, proto, saddr,
                                daddr, sport, dport))
            obs = FlowObservation(key, ifindex, octets, packets, own_flags & 0xFF,
                                  (first_ns + offset) // NS_PER_MS, (last_ns + offset) // NS_PER_MS,
                                  cookie, process, health, cause, initiated)
            # One ending per key and poll (see FlowCollector.poll): later ones wait for a later
            # poll.
            if kraw in index or (clash_possible and (kraw in retired_keys
                                                      or kraw in final_keys)):
                deferred.append((kraw, obs))
            else:
                index[kraw] = len(out)
                out.append(obs)
            if not has_other:
                continue
            key = new(FlowKey, (inode, ingress if direction else egress, ipver, proto, daddr,
                                saddr, dport, sport))
            obs = FlowObservation(key, o_ifindex, o_octets, o_packets, other_flags & 0xFF,
                                  (o_first_ns + offset) // NS_PER_MS,
                                  (o_last_ns + offset) // NS_PER_MS,
                                  cookie, process, health, cause, initiated)
            if twin in index or (clash_possible and (twin in retired_keys
                                                      or twin in final_keys)):
                deferred.append((twin, obs))
            else:
                index[twin] = len(out)
                out.append(obs)

    def _take_deferred_finals(self) -> list[FlowObservation]:
        """Finals a key clash held back: the oldest one per key goes out in this poll."""
        waiting, self._deferred_finals = self._deferred_finals, []
        taken = self._final_keys
        now = []
        for key, obs in waiting:
            if key in taken:
                self._deferred_finals.append((key, obs))
            else:
                taken.add(key)
                now.append(obs)
        return now

    def _finish(self, cookie: int, conns, out: list[FlowObservation],
                index: dict[bytes, int], gens: dict[bytes, int] | None = None) -> None:
        """Take the flows' final counters out of the map and report them ended. gens: the
        generation each key had when the socket closed; a key the kernel has restarted since
        belongs to a newer connection and is left alone. A TCP connection on lo ends for both
        of its sockets (its entries count both: ebpf/loopback.py)."""
        offset = self._offset_ns
        for conn in conns:
            kraws = set(self._conn_keys.pop(conn, ()))
            if conn[1] in (TCP, UDP):
                kraws.update(layout.kernel_keys_of(conn))
            by_conn: dict[ConnId, list] = {}  # the finals of each socket's view
            for kraw in kraws:
                for view, value in self._take_views(kraw, gens.get(kraw) if gens else None):
                    seen = self._reported.pop(view, None)
                    if seen is None:
                        seen = Reported(layout.conn_of(layout.key_parts(view)))
                    by_conn.setdefault(seen.conn, []).append((view, seen, value))
                self._reported.pop(kraw, None)
            for view_conn, finals in by_conn.items():
                for kraw, _, value in finals:
                    if kraw[KEY_DIRECTION] == Direction.EGRESS:
                        self._attr.learn_from_egress(view_conn, value)
                cause = _end_cause(conn[1], finals)
                for kraw, seen, value in finals:
                    obs = self._observation(kraw, seen, value, offset, cause)
                    if obs is None:
                        continue
                    if kraw in index:
                        out[index[kraw]] = obs
                    else:
                        index[kraw] = len(out)
                        out.append(obs)
                if view_conn != conn:
                    self._attr.forget_conn(view_conn)
            self._attr.forget_conn(conn)
        if not self._endings.has_cookie(cookie):
            self._attr.forget_cookie(cookie)


def _end_cause(protocol: int, finals) -> EndCause:
    if protocol != TCP:
        return EndCause.CLOSED
    sent = received = 0
    for kraw, _, value in finals:
        if kraw[KEY_DIRECTION] == Direction.EGRESS:
            sent |= value.tcp_flags
        else:
            received |= value.tcp_flags
    return _cause_from_flags(sent, received)


def _cause_from_flags(sent: int, received: int) -> EndCause:
    if sent & TCP_RST:
        return EndCause.RST_SENT
    if received & TCP_RST:
        return EndCause.RST_RECEIVED
    if (sent | received) & TCP_FIN:
        return EndCause.FIN
    return EndCause.CLOSED


def epoch_offset_ns(tries: int = 3) -> int:
    """Add to a bpf_ktime_get_ns() (CLOCK_MONOTONIC) value to get Unix epoch nanoseconds.

    The two clocks cannot be read at once: the realtime reading is bracketed by two monotonic
    ones and the tightest bracket of a few wins, so that the agent being preempted between the
    reads (16 ms seen on a loaded 2-core VM) does not shift every timestamp of a poll."""
    best_gap, best_offset = None, 0
    for _ in range(tries):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        if best_gap is None or after - before < best_gap:
            best_gap, best_offset = after - before, real - (before + after) // 2
    return best_offset
