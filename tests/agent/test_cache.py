"""The flow cache: deltas, timeouts, end reasons, eviction, biflow pairing (fake clock)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.cache import EndReason, FlowCache
from ebpf.observation import Direction, EndCause, TcpHealth

from .helpers import T0, key, obs, reverse

FLOW, OCTETS, PACKETS, START, END, REASON, RETRANS, RETRANS_BYTES, PEER = range(9)


def test_idle_timeout_exports_once_and_releases_kernel_state():
    cache = FlowCache(active_timeout=60, idle_timeout=15)
    k = key()
    assert cache.update([obs(k, 3000, 3, T0, T0 + 100)]) == []
    assert cache.sweep(T0 + 100 + 14_999) == []
    out = cache.sweep(T0 + 100 + 15_000)
    assert [(r[OCTETS], r[PACKETS], r[START], r[END], r[REASON]) for r in out] == [
        (3000, 3, T0, T0 + 100, EndReason.IDLE_TIMEOUT)
    ]
    assert len(cache) == 0
    assert cache.take_released() == [k]
    assert cache.records_by_reason[EndReason.IDLE_TIMEOUT] == 1


def test_a_flow_idle_when_its_period_ends_ends_by_the_idle_timeout():
    """With equal timeouts (or a late sweep) a one-packet flow is over both; it was not active,
    so its one record says idle (RFC 5102 flowEndReason), and it leaves the cache."""
    cache = FlowCache(active_timeout=2, idle_timeout=2)
    k = key()
    cache.update([obs(k, 52, 1, T0, T0)])
    out = cache.sweep(T0 + 2_000)
    assert [(r[PACKETS], r[REASON]) for r in out] == [(1, EndReason.IDLE_TIMEOUT)]
    assert len(cache) == 0 and cache.take_released() == [k]
    assert cache.records_by_reason[EndReason.ACTIVE_TIMEOUT] == 0


def test_a_flow_still_active_when_its_period_ends_ends_it_by_the_active_timeout():
    cache = FlowCache(active_timeout=2, idle_timeout=2)
    k = key()
    cache.update([obs(k, 52, 1, T0, T0)])
    cache.update([obs(k, 104, 2, T0, T0 + 1_500)])
    out = cache.sweep(T0 + 2_000)
    assert [(r[PACKETS], r[REASON]) for r in out] == [(2, EndReason.ACTIVE_TIMEOUT)]
    assert len(cache) == 1


def test_biflow_idle_direction_of_an_active_connection_gets_its_active_record():
    """The idle pass keeps a direction whose reverse is active (biflow): its period is over, so
    it still leaves by the active timeout, with its peer."""
    cache = FlowCache(active_timeout=2, idle_timeout=2, biflow=True)
    k = key()
    cache.update([obs(k, 52, 1, T0, T0), obs(reverse(k), 52, 1, T0, T0)])
    cache.update([obs(reverse(k), 104, 2, T0, T0 + 1_500)])
    out = cache.sweep(T0 + 2_000)
    assert [r[REASON] for r in out] == [EndReason.ACTIVE_TIMEOUT]
    assert out[0][PACKETS] + (out[0][PEER][PACKETS] if out[0][PEER] else 0) == 3
    assert len(cache) == 2


def test_activity_postpones_idle_timeout():
    cache = FlowCache(idle_timeout=15)
    k = key()
    cache.update([obs(k, 100, 1, T0, T0)])
    cache.update([obs(k, 200, 2, T0, T0 + 10_000)])
    assert cache.sweep(T0 + 20_000) == []
    assert [r[PACKETS] for r in cache.sweep(T0 + 25_000)] == [2]


def test_active_timeout_deltas_add_up_to_the_total():
    cache = FlowCache(active_timeout=60, idle_timeout=15)
    k = key()
    records = []
    octets = packets = 0
    for second in range(0, 200, 5):  # a 200 s flow, 10 packets of 1000 bytes every 5 s
        octets += 10_000
        packets += 10
        now = T0 + second * 1000
        records += cache.update([obs(k, octets, packets, T0, now)])
        records += cache.sweep(now)
    records += cache.flush_all()
    reasons = [r[REASON] for r in records]
    assert reasons == [EndReason.ACTIVE_TIMEOUT] * 3 + [EndReason.FORCED_END]
    assert sum(r[OCTETS] for r in records) == octets == 400_000
    assert sum(r[PACKETS] for r in records) == packets
    # periods follow each other without overlap
    for earlier, later in zip(records, records[1:], strict=False):
        assert earlier[END] <= later[START]
    assert records[0][START] == T0 and records[0][END] == T0 + 60_000


def test_end_of_flow_exports_at_once_without_release():
    cache = FlowCache()
    k = key()
    cache.update([obs(k, 500, 5, T0, T0 + 10)])
    out = cache.update([obs(k, 800, 7, T0, T0 + 20, flags=0x19, end=EndCause.FIN)])
    assert [(r[OCTETS], r[PACKETS], r[REASON]) for r in out] == [(800, 7, EndReason.END_OF_FLOW)]
    assert out[0][FLOW].tcp_flags == 0x19
    assert len(cache) == 0
    assert cache.take_released() == []


def test_end_after_active_export_sends_only_the_remainder():
    cache = FlowCache(active_timeout=1, idle_timeout=15)
    k = key()
    cache.update([obs(k, 1000, 10, T0, T0 + 500)])
    first = cache.sweep(T0 + 1000)
    last = cache.update([obs(k, 1300, 13, T0, T0 + 1500, end=EndCause.RST_RECEIVED)])
    assert [(r[OCTETS], r[PACKETS]) for r in first + last] == [(1000, 10), (300, 3)]
    assert last[0][START] == T0 + 500  # after the previous record's last packet


def test_end_with_nothing_new_exports_nothing():
    cache = FlowCache(active_timeout=1)
    k = key()
    cache.update([obs(k, 1000, 10, T0, T0 + 500)])
    assert len(cache.sweep(T0 + 1000)) == 1
    assert cache.update([obs(k, 1000, 10, T0, T0 + 500, end=EndCause.FIN)]) == []
    assert len(cache) == 0


def test_forced_end_flushes_every_flow():
    cache = FlowCache()
    keys = [key(sport=p) for p in range(40000, 40010)]
    cache.update([obs(k, 100 * i + 100, i + 1, T0, T0 + i) for i, k in enumerate(keys)])
    out = cache.flush_all()
    assert sorted(r[PACKETS] for r in out) == list(range(1, 11))
    assert {r[REASON] for r in out} == {EndReason.FORCED_END}
    assert len(cache) == 0


def test_full_cache_evicts_least_recently_active_with_lack_of_resources():
    cache = FlowCache(max_flows=2)
    a, b, c = key(sport=1), key(sport=2), key(sport=3)
    cache.update([obs(a, 100, 1, T0, T0), obs(b, 200, 2, T0, T0 + 1)])
    cache.update([obs(a, 150, 2, T0, T0 + 2)])  # a is now more recent than b
    out = cache.update([obs(c, 300, 3, T0, T0 + 3)])
    assert [(r[FLOW].key, r[PACKETS], r[REASON]) for r in out] == [
        (b, 2, EndReason.LACK_OF_RESOURCES)
    ]
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.take_released() == [b]


def test_counter_reset_keeps_unexported_counts():
    cache = FlowCache(active_timeout=1)
    k = key()
    cache.update([obs(k, 1000, 10, T0, T0)])
    cache.sweep(T0 + 1000)  # exports 10
    cache.update([obs(k, 1400, 14, T0, T0 + 1100)])  # 4 more, not exported yet
    cache.update([obs(k, 300, 3, T0 + 1200, T0 + 1200)])  # the kernel restarted counting
    out = cache.flush_all()
    assert [(r[OCTETS], r[PACKETS]) for r in out] == [(700, 7)]
    assert cache.counter_resets == 1


def test_retransmission_deltas():
    cache = FlowCache(active_timeout=1)
    k = key()
    tcp1 = TcpHealth(2, 2800, 500, 400, 10, 1)
    tcp2 = TcpHealth(5, 7000, 500, 400, 10, 1)
    cache.update([obs(k, 1000, 10, T0, T0, tcp=tcp1)])
    first = cache.sweep(T0 + 1000)
    cache.update([obs(k, 2000, 20, T0, T0 + 1100, tcp=tcp2)])
    last = cache.flush_all()
    assert [(r[RETRANS], r[RETRANS_BYTES]) for r in first + last] == [(2, 2800), (3, 4200)]


def test_sweep_stops_at_first_live_flow():
    cache = FlowCache(idle_timeout=15)
    old = [key(sport=p) for p in range(1, 6)]
    new = [key(sport=p) for p in range(100, 10_100)]
    cache.update([obs(k, 100, 1, T0, T0) for k in old])
    cache.update([obs(k, 100, 1, T0 + 10_000, T0 + 10_000) for k in new])
    out = cache.sweep(T0 + 15_000)
    assert sorted(r[FLOW].key.src_port for r in out) == [1, 2, 3, 4, 5]
    assert len(cache) == 10_000


def test_new_timeouts_apply_without_losing_state():
    cache = FlowCache(idle_timeout=15)
    k = key()
    cache.update([obs(k, 100, 1, T0, T0)])
    cache.set_timeouts(active_timeout=60, idle_timeout=5)
    assert [r[PACKETS] for r in cache.sweep(T0 + 5_000)] == [1]


# -- biflow ------------------------------------------------------------------------------------


def test_biflow_pair_leaves_together():
    cache = FlowCache(biflow=True, idle_timeout=15)
    out_key = key(40000, 80)
    in_key = reverse(out_key)
    cache.update([obs(out_key, 500, 5, T0, T0 + 100), obs(in_key, 9000, 7, T0 + 1, T0 + 120)])
    out = cache.sweep(T0 + 15_110)  # egress idle, ingress not yet: the connection is not idle
    assert out == []
    out = cache.sweep(T0 + 15_120)
    assert len(out) == 1
    record = out[0]
    pair = {(record[FLOW].key, record[PACKETS]), (record[PEER][FLOW].key, record[PEER][PACKETS])}
    assert pair == {(out_key, 5), (in_key, 7)}
    assert set(cache.take_released()) == {out_key, in_key}


def test_biflow_end_of_one_half_does_not_double_count_the_other():
    cache = FlowCache(biflow=True)
    out_key = key(40000, 80)
    in_key = reverse(out_key)
    cache.update([obs(out_key, 500, 5, T0, T0 + 100), obs(in_key, 9000, 7, T0, T0 + 120)])
    first = cache.update([obs(out_key, 600, 6, T0, T0 + 130, end=EndCause.FIN)])
    assert (first[0][PACKETS], first[0][PEER][PACKETS]) == (6, 7)
    # the ingress half's own final observation comes one poll later, with one more packet
    later = cache.update([obs(in_key, 9052, 8, T0, T0 + 131, end=EndCause.FIN)])
    assert [(r[FLOW].key, r[OCTETS], r[PACKETS], r[PEER]) for r in later] == [(in_key, 52, 1, None)]


# -- the invariant, for any traffic and any timeouts --------------------------------------------

step = st.tuples(
    st.integers(0, 5),  # new packets
    st.integers(0, 30_000),  # ms until the next poll
    st.booleans(),  # sweep after this poll
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(step, min_size=1, max_size=40),
    active=st.integers(1, 90),
    idle=st.integers(1, 30),
    end=st.booleans(),
    biflow=st.booleans(),
)
def test_records_add_up_exactly_and_never_overlap(steps, active, idle, end, biflow):
    cache = FlowCache(active_timeout=active, idle_timeout=idle, biflow=biflow)
    k = key()
    now = T0
    packets = 0
    first = None
    records = []
    for new, gap, sweep in steps:
        now += gap
        if new:
            packets += new
            first = first or now
            records += cache.update([obs(k, packets * 100, packets, first, now)])
        if sweep:
            records += cache.sweep(now)
        # a flow that went idle was released: the kernel starts counting again from zero
        if cache.take_released():
            packets, first = 0, None
    if end and packets:
        records += cache.update([obs(k, packets * 100, packets, first, now, end=EndCause.FIN)])
    records += cache.flush_all()
    total = sum(step[0] for step in steps)
    assert sum(r[PACKETS] for r in records) == total
    assert sum(r[OCTETS] for r in records) == total * 100
    assert all(r[PACKETS] > 0 and r[START] <= r[END] for r in records)
    for earlier, later in zip(records, records[1:], strict=False):
        assert earlier[END] <= later[START]
    assert all(r[FLOW].key.direction == Direction.EGRESS for r in records)


def test_a_flow_keeps_the_latest_rtt_not_the_kernels_tcp_state():
    """Records read only srtt_us of the TCP state (retransmissions are counted apart): the flow
    answers `tcp.srtt_us` itself instead of holding a TcpHealth (112 bytes a flow)."""
    cache = FlowCache(active_timeout=60, idle_timeout=15)
    timed, untimed = key(40001), key(40002)
    first, latest = TcpHealth(1, 1448, 900, 800, 10, 1), TcpHealth(2, 2896, 700, 650, 12, 1)
    cache.update([obs(timed, 100, 1, T0, T0, tcp=first), obs(untimed, 100, 1, T0, T0)])
    cache.update([obs(timed, 300, 3, T0, T0 + 5, tcp=latest)])
    flows = {r[FLOW].key: r for r in cache.sweep(T0 + 60_000)}
    assert flows[timed][FLOW].tcp.srtt_us == 700
    assert (flows[timed][RETRANS], flows[timed][RETRANS_BYTES]) == (2, 2896)
    assert flows[untimed][FLOW].tcp is None
    flow = flows[timed][FLOW]
    assert not any(isinstance(getattr(flow, slot), TcpHealth) for slot in type(flow).__slots__)


def test_flow_keys_are_the_held_flows():
    cache = FlowCache(idle_timeout=15)
    held, ended = key(sport=40001), key(sport=40002)
    cache.update([obs(held, 100, 1, T0, T0), obs(ended, 100, 1, T0, T0)])
    cache.update([obs(ended, 200, 2, T0, T0 + 1, end=EndCause.FIN)])
    assert list(cache.flow_keys()) == [held]
