"""TCP on lo: one kernel entry per packet direction, read as the two flows it stands for.

Every loopback packet crosses lo's egress once and both of its ends are local. The counting
program (flows.bpf.c handle) counts a TCP packet on lo into its EGRESS entry only: that entry
is the sender's EGRESS flow and, with the same counters, flags and times, the receiver's
INGRESS flow of the same 5-tuple (its "ingress view"), which has no socket facts of its own.
The kernel finalises such a connection with one EV_LOOPBACK_FINAL record holding both EGRESS
entries, each with its sending socket's facts. Userspace expands every such entry and record
(live reads, retired generations, final records, socket ends, releases) into exactly the
observations of the four entries the kernel used to keep: per local socket its EGRESS and its
INGRESS flow, with that socket's process, cookie, TCP health, initiator and end cause.

Such an entry is told by its key (TCP, EGRESS) and its value's ifindex: lo has ifindex 1 in
every namespace, and a packet to a local address always crosses lo. UDP and ICMP on lo keep an
entry per direction (the two sockets of a UDP exchange end separately, at their releases).
"""

from __future__ import annotations

import struct

from ebpf import bpfsys, layout
from ebpf.attribution import INITIATED_BY_ORIGIN
from ebpf.flow_ends import EGRESS_FIELDS, NS_PER_MS, TCP, TCP_FIN, TCP_RST
from ebpf.layout import DIRECTIONS, FLOW_VAL, KEY_DIRECTION, KEY_PROTOCOL, FlowValue
from ebpf.observation import EndCause, FlowKey, FlowObservation, TcpHealth

LOOPBACK_IFINDEX = 1
_IFINDEX_AT = struct.calcsize("<9Q")  # struct flow_val: ifindex after the nine u64 fields
_GEN_AT = struct.calcsize("<9Q7I")  # gen: after ifindex and six more u32
_LOOPBACK = layout.U32.pack(LOOPBACK_IFINDEX)
# What an INGRESS view keeps of its EGRESS entry (byte ranges of struct flow_val): the counters,
# first/last times and flags, the ifindex and the generation; the rest (socket cookie, cgroup,
# retransmissions, sequence and fin tracking, RTT, cwnd, state, process) is the sender's.
_VIEW_KEPT = ((0, 40), (_IFINDEX_AT, _IFINDEX_AT + 4), (_GEN_AT, _GEN_AT + 4))

# Both values of an EV_LOOPBACK_FINAL record decoded alike (each is a socket's EGRESS entry);
# LOOPBACK_DECODERS[ipver == 4].
LOOPBACK_DECODERS = [layout.final_decoder(EGRESS_FIELDS, EGRESS_FIELDS, ipv4).unpack
                     for ipv4 in (False, True)]


def is_shared(kraw: bytes, values: bytes, at: int = 0) -> bool:
    """Whether a kernel entry (key kraw, value at `at` in values) is a TCP EGRESS entry on lo,
    which stands for the INGRESS flow of the same packets too."""
    return (kraw[KEY_PROTOCOL] == TCP and kraw[KEY_DIRECTION] == 1
            and values[at + _IFINDEX_AT : at + _IFINDEX_AT + 4] == _LOOPBACK)


def is_shared_value(kraw: bytes, value: FlowValue) -> bool:
    """is_shared, for a value already decoded."""
    return (kraw[KEY_PROTOCOL] == TCP and kraw[KEY_DIRECTION] == 1
            and value.ifindex == LOOPBACK_IFINDEX)


def ingress_view_key(kraw: bytes) -> bytes:
    """The key the INGRESS flow of an EGRESS entry's packets would have (direction flipped)."""
    return kraw[:KEY_DIRECTION] + b"\x00" + kraw[KEY_DIRECTION + 1 :]


def egress_key_of_view(kraw: bytes) -> bytes:
    """The EGRESS key counting the packets of an INGRESS key."""
    return kraw[:KEY_DIRECTION] + b"\x01" + kraw[KEY_DIRECTION + 1 :]


def ingress_view_value(values: bytes, at: int = 0) -> bytes:
    """A struct flow_val as the INGRESS entry of the same packets held it."""
    out = bytearray(FLOW_VAL.size)
    for start, end in _VIEW_KEPT:
        out[start:end] = values[at + start : at + end]
    return bytes(out)


def ingress_view(value: FlowValue) -> FlowValue:
    return layout.decode_value(ingress_view_value(FLOW_VAL.pack(*value)))


class LoopbackEnds:
    """The loopback parts of FlowCollector's end-of-flow handling (see the collector for the
    attributes)."""

    def _take_views(self, kraw: bytes, gen: int | None) -> list[tuple[bytes, FlowValue]]:
        """Remove the kernel entry behind kraw (see FlowEnds._take) and return every flow it
        counted: (key, final value), two for a TCP entry on lo, whose INGRESS view kraw may
        be."""
        value = self._take(kraw, gen)  # type: ignore[attr-defined]
        if value is not None:
            if is_shared_value(kraw, value):
                return [(kraw, value), (ingress_view_key(kraw), ingress_view(value))]
            return [(kraw, value)]
        if kraw[KEY_PROTOCOL] != TCP or kraw[KEY_DIRECTION]:
            return []
        egress_kraw = egress_key_of_view(kraw)
        peek = bpfsys.lookup(self._flows_fd, egress_kraw, FLOW_VAL.size)  # type: ignore[attr-defined]
        if peek is None or not is_shared(egress_kraw, peek):
            return []  # not a view: an INGRESS entry the kernel deleted already
        value = self._take(egress_kraw, gen)  # type: ignore[attr-defined]
        if value is None:
            return []
        return [(egress_kraw, value), (kraw, ingress_view(value))]

    def _loopback_finals(self, records: list[bytes], out: list[FlowObservation],
                         index: dict[bytes, int]) -> None:
        """TCP connections on lo the kernel finalised (EV_LOOPBACK_FINAL): per record both
        sockets' EGRESS entries, each also the other socket's INGRESS flow. Four observations
        (three or two when a direction sent nothing), with what FlowEnds._finals does per
        socket; as flat, for the same reason (the commonest record under churn on lo)."""
        offset = self._offset_ns  # type: ignore[attr-defined]
        reported = self._reported  # type: ignore[attr-defined]
        endings = self._endings  # type: ignore[attr-defined]
        closing = endings.closing
        inodes = self._attacher.cookie_to_inode  # type: ignore[attr-defined]
        attr = self._attr  # type: ignore[attr-defined]
        scoped = attr.scoped
        cookie_conns, cookie_socks = attr.cookie_tables()
        fin, closed, rst_sent, rst_received = (EndCause.FIN, EndCause.CLOSED, EndCause.RST_SENT,
                                               EndCause.RST_RECEIVED)
        final_keys, retired_keys, deferred = (  # type: ignore[attr-defined]
            self._final_keys, self._retired_keys, self._deferred_finals)
        key_bytes, pack_key, new = layout.FINAL_KEY_BYTES, layout.FLOW_KEY.pack, tuple.__new__
        ipver_at, at = layout.FINAL_IPVER_AT, KEY_DIRECTION
        decoders = LOOPBACK_DECODERS
        ingress, egress = DIRECTIONS
        process_of, processes = layout.process_info, layout.PROCESSES
        initiated_by = INITIATED_BY_ORIGIN.get
        # Keys taken this poll before these records: retired, or deferred finals sent already.
        clash_possible = bool(retired_keys or final_keys)
        for raw in records:
            ipver = raw[ipver_at]
            # X sent the packet that ended the connection (the record's key, X -> Y); Y's
            # value is all zero when Y sent nothing (has_y 0).
            (has_y, netns, saddr, daddr, sport, dport, proto,
             x_octets, x_packets, x_first, x_last, x_flags, x_cookie, x_cgroup, x_rpackets,
             x_rbytes, x_ifindex, x_srtt, x_min_rtt, x_cwnd, x_state, x_tgid, x_uid, x_origin,
             x_comm,
             y_octets, y_packets, y_first, y_last, y_flags, y_cookie, y_cgroup, y_rpackets,
             y_rbytes, y_ifindex, y_srtt, y_min_rtt, y_cwnd, y_state, y_tgid, y_uid, y_origin,
             y_comm) = decoders[ipver == 4](raw)
            inode = inodes.get(netns)
            if inode is None:
                inode = self._netns_inode(netns)  # type: ignore[attr-defined]
            x_first = (x_first + offset) // NS_PER_MS
            x_last = (x_last + offset) // NS_PER_MS
            y_first = (y_first + offset) // NS_PER_MS
            y_last = (y_last + offset) // NS_PER_MS
            x_sent = raw[key_bytes]
            y_received = x_sent[:at] + b"\x00" + x_sent[at + 1 :]
            y_sent = pack_key(netns, daddr, saddr, dport, sport, proto, ipver, 1)
            x_received = y_sent[:at] + b"\x00" + y_sent[at + 1 :]
            # x's packets are x's EGRESS flow and y's INGRESS flow; y's the reverse.
            x_to_y = (inode, egress, ipver, proto, saddr, daddr, sport, dport)
            y_to_x = (inode, egress, ipver, proto, daddr, saddr, dport, sport)
            x_to_y_in = (inode, ingress, ipver, proto, saddr, daddr, sport, dport)
            y_to_x_in = (inode, ingress, ipver, proto, daddr, saddr, dport, sport)
            for side in (0, 1):
                # This side's socket: its EGRESS flow (the entry it sent) and its INGRESS flow
                # (the entry the other side sent).
                if side:
                    conn = (netns, proto, ipver, daddr, dport, saddr, sport)
                    (cookie, cgroup_id, retrans_packets, retrans_bytes, srtt_us, min_rtt_us,
                     snd_cwnd, state, tgid, uid, origin, comm) = (
                        y_cookie, y_cgroup, y_rpackets, y_rbytes, y_srtt, y_min_rtt, y_cwnd,
                        y_state, y_tgid, y_uid, y_origin, y_comm)
                    sent, received = y_flags, x_flags
                    out_kraw, in_kraw = y_sent, y_received
                else:
                    conn = (netns, proto, ipver, saddr, sport, daddr, dport)
                    (cookie, cgroup_id, retrans_packets, retrans_bytes, srtt_us, min_rtt_us,
                     snd_cwnd, state, tgid, uid, origin, comm) = (
                        x_cookie, x_cgroup, x_rpackets, x_rbytes, x_srtt, x_min_rtt, x_cwnd,
                        x_state, x_tgid, x_uid, x_origin, x_comm)
                    sent, received = x_flags, y_flags
                    out_kraw, in_kraw = x_sent, x_received
                resolved = not origin
                if resolved:  # an older socket, or none sent (the start-up scan may know)
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
                forget = resolved
                if reported:
                    seen_out, seen_in = reported.pop(out_kraw, None), reported.pop(in_kraw, None)
                    forget = forget or seen_out is not None or seen_in is not None
                if forget:
                    attr.forget_conn(conn)
                if cookie and (cookie in cookie_conns or cookie in cookie_socks):
                    attr.forget_cookie(cookie)
                if closing and conn in closing:
                    waited = endings.cancel(conn)
                    if waited is not None and not endings.has_cookie(waited):
                        attr.forget_cookie(waited)
                if process is None and scoped:
                    continue
                if (sent | received) & TCP_RST:
                    cause = rst_sent if sent & TCP_RST else rst_received
                else:
                    cause = fin if (sent | received) & TCP_FIN else closed
                if side:
                    sent_obs = None if not has_y else FlowObservation(
                        new(FlowKey, y_to_x), y_ifindex, y_octets, y_packets, y_flags & 0xFF,
                        y_first, y_last, cookie, process, health, cause, initiated)
                    received_obs = FlowObservation(
                        new(FlowKey, x_to_y_in), x_ifindex, x_octets,
                        x_packets, x_flags & 0xFF, x_first, x_last, cookie, process, health,
                        cause, initiated)
                else:
                    sent_obs = FlowObservation(
                        new(FlowKey, x_to_y), x_ifindex, x_octets, x_packets, x_flags & 0xFF,
                        x_first, x_last, cookie, process, health, cause, initiated)
                    received_obs = None if not has_y else FlowObservation(
                        new(FlowKey, y_to_x_in), y_ifindex, y_octets,
                        y_packets, y_flags & 0xFF, y_first, y_last, cookie, process, health,
                        cause, initiated)
                # One ending per key and poll (see FlowEnds._finals).
                if sent_obs is not None:
                    if out_kraw in index or (clash_possible and (out_kraw in retired_keys
                                                              or out_kraw in final_keys)):
                        deferred.append((out_kraw, sent_obs))
                    else:
                        index[out_kraw] = len(out)
                        out.append(sent_obs)
                if received_obs is not None:
                    if in_kraw in index or (clash_possible and (in_kraw in retired_keys
                                                              or in_kraw in final_keys)):
                        deferred.append((in_kraw, received_obs))
                    else:
                        index[in_kraw] = len(out)
                        out.append(received_obs)

    def _retire_record(self, item: bytes, out: list[FlowObservation]) -> None:
        """An EV_FLOW_RETIRED record: the old generation of every flow its entry counted."""
        kraw, value = layout.decode_retired(item)
        self._retire(kraw, value, out)  # type: ignore[attr-defined]
        if is_shared_value(kraw, value):
            self._retire(ingress_view_key(kraw), ingress_view(value), out)  # type: ignore[attr-defined]
