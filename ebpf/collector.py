"""FlowCollector: the eBPF ObservationSource the agent consumes.

Live flows are read from the kernel's flow map in batches and reported when they changed since
the last poll. A TCP connection whose end the counting programs saw (both FINs acknowledged, or
a RST) arrives finalised by the kernel: one ring buffer record with both directions' final
counters, the entries already deleted. Other ends (socket release, a TCP close the kernel could
not finalise) arrive as events, and their final counters are taken from the map and removed in
one step. A TCP entry on lo counts both sockets' flows of its packets (ebpf/loopback.py). See
ebpf/README.md for the counting design and its limits.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from ebpf import bpfsys, layout, netns
from ebpf.attribution import Attribution
from ebpf.endings import Endings
from ebpf.errors import EbpfUnavailable
from ebpf.existing_scan import SocketMaps, learn_existing_sockets
from ebpf.flow_ends import NS_PER_MS, TCP, UDP, FlowEnds, Reported, epoch_offset_ns
from ebpf.interfaces import InterfaceAttacher
from ebpf.layout import FLOW_KEY, FLOW_VAL, ConnId
from ebpf.live_read import EVERY_FLOW, LIVE_READ_INTERVAL_NS, MIN_LIVE_AGE_NS, LiveRead
from ebpf.loader import load
from ebpf.loopback import LoopbackEnds
from ebpf.observation import (
    EndCause,
    FlowKey,
    FlowObservation,
    SourceStats,
    TcpHealth,
)
from ebpf.ringbuf import RingReader

log = logging.getLogger(__name__)


def socket_capacity(max_flows: int) -> int:
    """Entries of the socket maps (socks, ports, watched: one per socket, or per bound port) for
    a flow map of max_flows entries: as many. A connected socket's traffic takes two flow
    entries, but a TCP socket on lo takes one (its EGRESS entry counts both ends,
    ebpf/loopback.py): at half the capacity, a host busy with loopback connections would run
    out of socket entries (counted, sock_map_full) with the flow map half empty, and lose those
    sockets' processes. Allocated per entry, the maps cost their bucket array whatever their
    use: 16 bytes per entry of capacity rounded up to a power of two (6.3 MB more than at half,
    for 250,000 flows)."""
    return max(4096, max_flows)


class FlowCollector(LiveRead, FlowEnds, LoopbackEnds):
    """Loads and attaches everything on construction; `close()` detaches everything."""

    def __init__(
        self, cgroup: str | None = None, max_flows: int = 65536, poll_interval_s: float = 1.0
    ) -> None:
        if max_flows < 16:
            raise EbpfUnavailable(f"max_flows={max_flows}: must be at least 16")
        self.max_flows = max_flows
        self._max_socks = socket_capacity(max_flows)
        self.existing_unwatched = 0  # pre-existing sockets the kernel's socket maps had no room for
        self.poll_interval_s = poll_interval_s
        self._loaded = load(cgroup, max_flows, max_socks=self._max_socks)
        self._closed = False
        try:
            self._setup(cgroup)
        except BaseException:
            self.close()
            raise

    def _setup(self, cgroup: str | None) -> None:
        fd = self._loaded.table_fd
        self._flows_fd = fd("flows")
        self._excluded_fd = fd("excluded")
        self._excluded_ports_fd = fd("excluded_ports")
        self._watched_fd = fd("watched")
        self._socks_fd = fd("socks")
        self._ports_fd = fd("ports")
        # One for the collector's life: it remembers the watched cookies' ceiling across scans.
        self._socket_maps = SocketMaps(self._watched_fd, self._socks_fd, self._ports_fd,
                                       fd("watched_ceiling"))
        self._reader = bpfsys.BatchReader(self._flows_fd, FLOW_KEY.size, FLOW_VAL.size)
        self._elems = bpfsys.ElemOps(self._flows_fd, FLOW_KEY.size, FLOW_VAL.size)
        self._attacher = InterfaceAttacher(self._loaded.tc_programs)
        self._attacher.sync()
        self._attr = Attribution(
            bpfsys.BatchReader(fd("socks"), 8, layout.SOCK_INFO.size),
            scoped=cgroup is not None,
        )
        self._cgroup_path = self._loaded.cgroup
        self._raw_events: list[bytes] = []
        self._ring = RingReader(fd("events"))
        self._reported: dict[bytes, Reported] = {}  # by kernel key
        self._conn_keys: dict[ConnId, set[bytes]] = {}
        self._pending: list[FlowObservation] = []
        self._endings = Endings()
        self._rescanned = False
        self._retired_seen: dict[bytes, Reported] = {}
        self._retired_keys: set[bytes] = set()  # retired in this poll
        # Live in the map but to be reported at the next read even if unchanged (see poll).
        self._reread: set[bytes] = set()
        # Deferred finals reported in this poll (the poll's other finals are in its index).
        self._final_keys: set[bytes] = set()
        self._deferred_finals: list[tuple[bytes, FlowObservation]] = []
        self._flows_in_map = 0
        self._young_since_ns = EVERY_FLOW
        self._next_live_read_ns = 0
        self._offset_ns = epoch_offset_ns()
        self._stop = threading.Event()
        self.scan_existing()
        self._watcher = threading.Thread(target=self._watch, name="flowbridge-netns", daemon=True)
        self._watcher.start()

    # -- ObservationSource ----------------------------------------------------------------------

    def poll(self, timeout_ms: int, *, final: bool = False) -> list[FlowObservation]:
        self._ring.wait(int(timeout_ms))
        # Flows the kernel started counting after this (monotonic ns) wait for a later poll.
        self._young_since_ns = EVERY_FLOW if final else time.monotonic_ns() - MIN_LIVE_AGE_NS
        self._attr.new_poll()
        self._rescanned = False
        # One clock offset per poll: every record of a poll is converted the same way, and
        # reading the clocks per ended flow cost ~4% of the collector's CPU under churn.
        self._offset_ns = epoch_offset_ns()
        earlier, self._pending = self._pending, []
        self._final_keys.clear()
        if self._deferred_finals:
            earlier += self._take_deferred_finals()
        out: list[FlowObservation | None] = []
        index: dict[bytes, int] = {}
        read_ns = time.monotonic_ns()
        raw, self._raw_events = self._raw_events, []
        raw += self._ring.drain()
        # A socket's end finds its UDP/ICMP flows through what the live read linked: a poll with
        # one reads the map whatever the interval.
        if (final or read_ns >= self._next_live_read_ns
                or any(item[0] in layout.SOCKET_END_KINDS for item in raw)):
            self._next_live_read_ns = read_ns + LIVE_READ_INTERVAL_NS
            live = self._read_live()
            raw += self._raw_events  # drained during the read
            self._raw_events = []
            raw += self._ring.drain()
        else:
            live = []
        self._retired_keys.clear()
        retired: list[FlowObservation] = []
        ended = []
        finals = []
        loopback_finals = []
        for item in raw:
            kind = item[0]  # the u32 kind's low byte (layout.event_kind, without the call)
            if kind == layout.EV_FLOW_FINAL:
                finals.append(item)
            elif kind == layout.EV_LOOPBACK_FINAL:
                loopback_finals.append(item)
            elif kind == layout.EV_FLOW_RETIRED:
                self._retire_record(item, retired)
            else:
                ended.append(layout.decode_event(item))
        for event in ended:
            self._socket_ended(event, out, index)
        # After the socket ends: a close the agent heard of comes before its connection's final
        # record (the kernel sends the event only while the entries exist).
        if finals:
            self._finals(finals, out, index)
        if loopback_finals:
            self._loopback_finals(loopback_finals, out, index)
        for conn, cookie, gens in self._endings.ready(self._reported, read_ns):
            self._finish(cookie, [conn], out, index, gens)
        self._retired_seen.clear()
        # Live flows last: one that ended in this poll is reported once, with its final counters.
        # That includes a generation the kernel retired after the read (a client port reused):
        # its retired record supersedes the live one, which must not follow it as a new flow.
        offset = self._offset_ns
        observation = self._observation
        reported = self._reported
        # The agent's cache ends flows at the end of a batch: a newer generation's live record
        # in the same batch as the retired one would be merged into it. It waits for the next
        # poll (reread: reported as changed then).
        retired_keys = self._retired_keys
        decode_value = layout.decode_value
        for kraw, at, values, prev in live:
            if kraw in retired_keys:
                self._reread.add(kraw)
                continue
            if kraw not in index and reported.get(kraw) is prev:
                obs = observation(kraw, prev, decode_value(values, at), offset, EndCause.NONE)
                if obs is not None:
                    out.append(obs)
        # A connection that ended here under a key whose earlier connection was retired in the
        # same poll waits for the next one (same reason as above: one ending per key and batch).
        clashes = [kraw for kraw in retired_keys if kraw in index]
        for kraw in clashes:
            self._pending.append(out[index[kraw]])
            out[index[kraw]] = None
        if clashes:
            out = [obs for obs in out if obs is not None]
        # Deferred records came first; a retired flow is an earlier connection than anything
        # read live under its key.
        if earlier or retired:
            return earlier + retired + out  # type: ignore[operator]
        return out  # type: ignore[return-value]

    def release(self, keys: list[FlowKey]) -> None:
        cookies = {state.ns.inode: state.cookie for state in self._attacher.namespaces.values()}
        offset = self._offset_ns  # the poll's: every record of a step converts times alike
        released = {}
        for key in keys:
            cookie = cookies.get(key.netns)
            if cookie is not None:
                released[layout.encode_key(key, cookie)] = key
        done: set[bytes] = set()
        for kraw in released:
            if kraw in done:
                continue
            # A TCP entry on lo counts two flows (ebpf/loopback.py): both go with it.
            views = self._take_views(kraw, None) or [(kraw, None)]
            for view, value in views:
                done.add(view)
                seen = self._reported.pop(view, None)
                self._reread.discard(view)
                self._forget_conn_key(layout.conn_of(layout.key_parts(view)), view)
                if value is None or seen is None or value.last_ns == seen.last_ns:
                    continue
                if view not in released:
                    # The other flow of a lo entry, still live in the cache: its final counts
                    # (a later entry restarts from zero, which the cache takes as a reset).
                    obs = self._observation(view, seen, value, offset, EndCause.NONE)
                elif seen.packets is not None and seen.gen == value.gen:
                    # Counted after the last poll: report the remainder as a new flow.
                    obs = self._remainder(view, seen, value, offset)
                else:  # all of it: the entry holds a generation no poll read (newer connection)
                    obs = self._observation(view, seen, value, offset, EndCause.NONE)
                if obs is not None:
                    self._pending.append(obs)

    def stats(self) -> SourceStats:
        sums = self._loaded.counter_totals(len(layout.CTR_NAMES))
        totals = dict(zip(layout.CTR_NAMES, sums, strict=True))
        extra = {k: v for k, v in totals.items() if k not in ("flow_map_full", "events_lost")}
        extra.update(
            namespaces=len(self._attacher.namespaces),
            interfaces_attached=self._attacher.interface_count(),
            attach_errors=self._attacher.attach_errors,
            sockets_known=self._attr.known_sockets(),
            existing_sockets_unwatched=self.existing_unwatched,
        )
        return SourceStats(
            flows_in_map=self._flows_in_map,
            map_capacity=self.max_flows,
            map_full_drops=totals["flow_map_full"],
            events_lost=totals["events_lost"],
            extra=extra,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        watcher = getattr(self, "_watcher", None)  # absent when the start-up scan failed
        if watcher is not None:
            watcher.join(timeout=5)
        attacher = getattr(self, "_attacher", None)
        if attacher is not None:
            attacher.close()
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
        self._loaded.close()

    def __enter__(self) -> FlowCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- agent helpers --------------------------------------------------------------------------

    def exclude_socket(self, sock: socket.socket) -> None:
        """Never report flows of this socket's local port (the agent's own export/collect
        sockets). An unbound socket is bound to an ephemeral port first, so it has one."""
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"exclude_socket: unsupported socket type {sock.type!r}")
        port = sock.getsockname()[1]
        if port == 0:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
            port = sock.getsockname()[1]
        proto = TCP if sock.type == socket.SOCK_STREAM else UDP
        ns_cookie = int.from_bytes(
            sock.getsockopt(socket.SOL_SOCKET, netns.SO_NETNS_COOKIE, 8), "little"
        )
        bpfsys.update(self._excluded_fd, layout.PORT_KEY.pack(ns_cookie, port, proto), b"\x01")
        word = layout.U32.pack(port >> 6)
        bits = layout.U64.unpack(bpfsys.lookup(self._excluded_ports_fd, word, 8) or bytes(8))[0]
        bits |= 1 << (port & 63)
        bpfsys.update(self._excluded_ports_fd, word, layout.U64.pack(bits))

    def sync_interfaces(self) -> None:
        """Attach to namespaces and interfaces created since the last scan (the collector also
        does this every poll_interval_s on its own)."""
        self._attacher.sync()

    def stop_discovery(self) -> None:
        """Stop looking for new namespaces and interfaces (the periodic scan, and the rescan
        on an unknown namespace cookie); what is attached stays attached. For after a
        privilege drop: an ordinary user's scan would miss namespaces and detach them."""
        self._stop.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        self._attacher.freeze()

    def scan_existing(self) -> int:
        """Learn sockets that existed before attaching (sock_diag + /proc); returns how many."""
        namespaces = [(state.ns, state.cookie) for state in self._attacher.namespaces.values()]
        scan = learn_existing_sockets(namespaces, self._attr, self._socket_maps,
                                      self._cgroup_path)
        if scan.unwatched:
            self.existing_unwatched += scan.unwatched
            log.warning("%d sockets that existed before the agent did not fit the kernel's "
                        "socket maps (%d entries): their flows end by the idle timeout",
                        scan.unwatched, self._max_socks)
        return scan.learned

    # -- internals ------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self._attacher.sync()
            except Exception as exc:  # a namespace vanishing mid-scan must not kill the watcher
                log.warning("interface discovery: %s", exc)

    def _netns_inode(self, cookie: int) -> int:
        """Inode of a namespace by cookie; an unknown one (created since the last scan) makes
        one rescan per poll, and reads as 0 if it is gone already."""
        inode = self._attacher.cookie_to_inode.get(cookie)
        if inode is None and not self._rescanned:
            self._rescanned = True
            self._attacher.sync()
            inode = self._attacher.cookie_to_inode.get(cookie)
        return inode or 0

    def _observation(self, kraw: bytes, seen: Reported, value: layout.FlowValue, offset: int,
                     end: EndCause) -> FlowObservation | None:
        conn = seen.conn
        egress_cookie = value.cookie if kraw[layout.KEY_DIRECTION] else 0
        stale = egress_cookie and egress_cookie != seen.cookie
        if not seen.cookie or seen.process is None or stale:
            # Not attributed yet (or the socket changed): resolve; then reuse while it holds.
            seen.cookie, seen.process, seen.initiated = self._attr.resolve(conn, egress_cookie)
        if seen.process is None and self._attr.scoped:
            return None
        if seen.key is None:
            inode = self._attacher.cookie_to_inode.get(conn[0])
            if inode is None:
                inode = self._netns_inode(conn[0])
            seen.key = layout.key_of_conn(conn, kraw[layout.KEY_DIRECTION], inode, kraw)
        return FlowObservation(
            seen.key,
            value.ifindex,
            value.octets,
            value.packets,
            value.tcp_flags & 0xFF,
            (value.first_ns + offset) // NS_PER_MS,
            (value.last_ns + offset) // NS_PER_MS,
            seen.cookie,
            seen.process,
            self._attr.health(conn) if conn[1] == TCP else None,
            end,
            seen.initiated,
        )

    def _remainder(self, kraw: bytes, seen: Reported, value: layout.FlowValue,
                   offset: int) -> FlowObservation | None:
        """What was counted after the last poll read seen."""
        rest = value._replace(octets=value.octets - seen.octets,
                              packets=value.packets - seen.packets,
                              first_ns=seen.last_ns + 1)
        return self._observation(kraw, seen, rest, offset, EndCause.NONE)

    def _forget_conn_key(self, conn: ConnId, kraw: bytes) -> None:
        keys = self._conn_keys.get(conn)
        if keys is not None:
            keys.discard(kraw)
            if not keys:
                del self._conn_keys[conn]
                self._attr.forget_conn(conn)

__all__ = ["FlowCollector", "TcpHealth"]
