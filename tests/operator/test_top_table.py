"""FlowTable's lazy writes: what a reader sees equals a table that applies every update at once.

The agent tees every observation into the table; the table only queues batches and applies
them when read or pruned, so that ended flows older than the linger time never enter it
(bridge/top/table.py). Checked against an eager model of the same rules on random sequences of
updates, forgets, prunes and reads, and on the cases that made the lazy rules subtle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.top.table import FlowTable
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation

LOCAL, REMOTE = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def flow(port: int, last_ms: int, end: EndCause = EndCause.NONE, packets: int = 1
         ) -> FlowObservation:
    key = FlowKey(1, Direction.EGRESS, 4, 6, LOCAL, REMOTE, port, 80)
    return FlowObservation(key, 2, 60 * packets, packets, 0x18, last_ms - 5, last_ms, end=end)


class EagerTable:
    """The rules without queueing: every update applied at once, as the table did before."""

    def __init__(self, idle_ms: int, linger_ms: int, max_flows: int) -> None:
        self.idle_ms, self.linger_ms, self.max_flows = idle_ms, linger_ms, max_flows
        self.flows: dict[FlowKey, FlowObservation] = {}
        self.ended_at: dict[FlowKey, int] = {}

    def update(self, observations: list[FlowObservation], now_ms: int) -> None:
        for obs in observations:
            if obs.key not in self.flows and len(self.flows) >= self.max_flows:
                continue
            self.flows[obs.key] = obs
            if obs.end is not EndCause.NONE:
                self.ended_at[obs.key] = now_ms
            else:
                self.ended_at.pop(obs.key, None)

    def forget(self, keys: list[FlowKey]) -> None:
        for key in keys:
            self.flows.pop(key, None)
            self.ended_at.pop(key, None)

    def prune(self, now_ms: int) -> list[FlowKey]:
        for key in [k for k, at in self.ended_at.items() if now_ms - at >= self.linger_ms]:
            del self.ended_at[key], self.flows[key]
        idle = [k for k, obs in self.flows.items()
                if obs.last_ms < now_ms - self.idle_ms and k not in self.ended_at]
        for key in idle:
            del self.flows[key]
        return idle


# One step: (what, port, time step in ms, ended?, packets)
steps = st.lists(
    st.tuples(st.sampled_from(["update", "update", "update", "forget", "prune", "read"]),
              st.integers(1, 6), st.integers(0, 900), st.booleans(), st.integers(1, 4)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_reads_and_prunes_match_an_eager_table(ops) -> None:
    """Below the table's bound (at the bound, an ended flow that has lingered out by the time
    its batch is applied takes no place: see the bound's own test), and for observations of
    recent packets (last_ms at most 450 ms before the update), as a source's are."""
    lazy = FlowTable(idle_ms=2_000, linger_ms=1_000)
    eager = EagerTable(2_000, 1_000, lazy.max_flows)
    now = 10_000
    for what, port, step, ended, packets in ops:
        now += step
        if what == "update":
            batch = [flow(port, now - step // 2, EndCause.FIN if ended else EndCause.NONE,
                          packets),
                     flow(port + 1, now, EndCause.NONE, packets)]
            lazy.update(batch, now)
            eager.update(batch, now)
        elif what == "forget":
            key = flow(port, 0).key
            lazy.forget([key])
            eager.forget([key])
        elif what == "prune":
            assert sorted(lazy.prune(now)) == sorted(eager.prune(now))
        else:
            assert {o.key: o for o in lazy.observations()} == eager.flows
    assert {o.key: o for o in lazy.observations()} == eager.flows


def test_an_ended_flow_older_than_the_linger_time_never_enters_the_table() -> None:
    table = FlowTable(idle_ms=5_000, linger_ms=1_000)
    live, ended = flow(1, 10_000), flow(2, 10_000, EndCause.FIN)
    table.update([live, ended], now_ms=10_000)
    assert table.prune(10_500) == []
    assert table._queued, "a batch younger than the linger time stays queued"
    assert table.prune(11_000) == []
    assert not table._queued and list(table._flows) == [live.key]
    assert table._ended_at == {}


def test_a_newer_queued_observation_keeps_a_flow_from_being_idle() -> None:
    table = FlowTable(idle_ms=2_000, linger_ms=1_000)
    table.update([flow(1, 10_000)], now_ms=10_000)
    assert table.prune(11_000) == []  # applied: the flow is in the table, last seen at 10 s
    table.update([flow(1, 12_500, packets=2)], now_ms=12_500)
    assert table.prune(12_600) == []  # idle by the applied observation, not by the queued one
    assert [o.packets for o in table.observations()] == [2]
    assert table.prune(14_600) == [flow(1, 0).key]


def test_forget_applies_after_what_was_queued_before_it() -> None:
    table = FlowTable(linger_ms=1_000)
    first, again = flow(1, 10_000), flow(1, 10_100, packets=3)
    table.update([first], now_ms=10_000)
    table.forget([first.key])
    table.update([again], now_ms=10_100)
    assert table.observations() == [again]
    table.forget([again.key])
    assert len(table) == 0


def test_the_queue_is_bounded_like_the_table() -> None:
    table = FlowTable(max_flows=3, linger_ms=60_000)
    for port in range(10):
        table.update([flow(port, 10_000)], now_ms=10_000)
        assert table._queued_observations <= 3
    assert len(table) == 3 and table.dropped == 7


def test_at_the_bound_a_lingered_out_flow_takes_no_place() -> None:
    table = FlowTable(max_flows=1, linger_ms=1_000)
    ended, live = flow(1, 10_000, EndCause.FIN), flow(2, 10_100)
    table.update([ended], now_ms=10_000)
    table.update([live], now_ms=10_100)
    table.prune(11_000)  # the ended flow's batch has lingered out: it is not applied as a flow
    assert table.observations() == [live] and table.dropped == 0
