"""Reading live flows: the flow map in batches, each flow that changed since the last poll.

A mixin of FlowCollector (it works on the collector's maps and per-key state); kept apart so
the collector module stays about the poll as a whole. A TCP entry on lo is read as the two flows
it counts (ebpf/loopback.py).
"""

from __future__ import annotations

from ebpf import layout
from ebpf.flow_ends import NS_PER_MS, TCP, UDP, Reported
from ebpf.layout import FLOW_KEY, FLOW_VAL, ConnId
from ebpf.loopback import ingress_view_key, ingress_view_value, is_shared

# A TCP flow the kernel started counting less than this ago is not reported live yet: under
# connection churn most connections end within milliseconds and arrive finalised by the kernel
# (with their process) a poll or two later, so reading them live first (state per key,
# attribution, an observation, a cache entry the final record must then update) was ~40% of the
# agent's CPU (py-spy under bench.churn). A longer flow is reported from the first poll after
# this age; the agent's last poll before it stops reports every flow (poll(final=True)). UDP
# and ICMP flows are read at once: their end (the socket's release) finds its flows through
# what the live read linked.
MIN_LIVE_AGE_NS = 500 * NS_PER_MS
EVERY_FLOW = 1 << 64  # as a young-since limit: no flow is too young
# The live read walks every bucket of the flow map whatever it holds (~0.4 ms at 65,536
# buckets): under churn the ring buffer wakes a poll ~20 times a second, and reading the map at
# each cost ~10% of the agent's CPU. Between reads, polls handle end-of-flow records only; a
# poll that waited its whole timeout (POLL_MS, 200 ms, on a quiet host) always reads.
LIVE_READ_INTERVAL_NS = 190 * NS_PER_MS


class LiveRead:
    """The live read of FlowCollector (see the collector for the attributes)."""

    def _read_live(self) -> list[tuple[bytes, int, bytes, Reported]]:
        """Every flow that changed since the last poll: (kernel key, where its value is in
        values, the batch's values, its Reported updated to that value). The values are
        decoded again when reported: all of a poll's decoded values at once (200,000 at the
        first poll of an agent on a busy host: ~0.5 KB each) left the agent's heap that much
        fragmented for good (bench.scale)."""
        reported = self._reported
        ksize, vsize = FLOW_KEY.size, FLOW_VAL.size
        first_at, last_at = layout.FLOW_VAL_FIRST_NS_OFFSET, layout.FLOW_VAL_LAST_NS_OFFSET
        young_since = self._young_since_ns
        protocol_at = layout.KEY_PROTOCOL
        unpack_u64 = layout.U64.unpack_from
        changed: list[tuple[bytes, int, bytes, Reported | None]] = []
        total = 0
        drain, pending = self._ring.drain, self._raw_events
        reread, self._reread = self._reread, set()
        for keys, values in self._reader.read():
            pending += drain()  # a long read must not let end-of-flow events overflow the ring
            n = len(keys) // ksize
            total += n
            for i in range(n):
                kraw = keys[i * ksize : (i + 1) * ksize]
                at = i * vsize
                last_ns = unpack_u64(values, at + last_at)[0]
                prev = reported.get(kraw)
                if prev is None:
                    if (kraw[protocol_at] == TCP
                            and unpack_u64(values, at + first_at)[0] > young_since):
                        continue  # not yet: most connections end before a later poll
                elif prev.last_ns == last_ns and not (reread and kraw in reread):
                    continue
                changed.append((kraw, at, values, prev))
                if is_shared(kraw, values, at):  # also the INGRESS flow of the same packets
                    view = ingress_view_key(kraw)
                    seen = reported.get(view)
                    if seen is None or seen.last_ns != last_ns or (reread and view in reread):
                        changed.append((view, 0, ingress_view_value(values, at), seen))
        self._flows_in_map = total
        learn = self._attr.learn_from_egress
        decode_value = layout.decode_value
        egress_at = layout.KEY_DIRECTION
        for j, (kraw, at, values, prev) in enumerate(changed):
            renewed = prev is None
            if renewed:
                prev = Reported(self._conn_of_key(kraw))
                reported[kraw] = prev
                if kraw[protocol_at] not in (TCP, UDP):  # TCP/UDP keys follow from the conn
                    self._conn_keys.setdefault(prev.conn, set()).add(kraw)
            value = decode_value(values, at)
            if value.gen != prev.gen:
                # A new connection took this key (the kernel retired the old flow): start over.
                self._retired_seen[kraw] = prev
                prev = Reported(prev.conn, gen=value.gen)
                reported[kraw] = prev
                renewed = True
            if kraw[egress_at]:  # egress: the socket's cookie and TCP health
                learn(prev.conn, value)
            prev.keep(value)
            if renewed:
                changed[j] = (kraw, at, values, prev)
        return changed  # type: ignore[return-value]  # every Reported is set now

    def _conn_of_key(self, kraw: bytes) -> ConnId:
        """The connection of a kernel key, the same tuple as its other direction's when that is
        held already (both directions of a socket are one connection): one tuple per socket
        instead of one per key saved 48 bytes a flow at 100k sockets (bench.scale)."""
        twin = self._reported.get(layout.twin_key(kraw))
        if twin is not None:
            return twin.conn
        return layout.conn_of(layout.key_parts(kraw))
