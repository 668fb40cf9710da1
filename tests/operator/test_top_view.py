"""Top's view of a flow cache (bridge/top/view.py): live flows from the cache itself, ended ones
for the linger time from the records that left it; read whole while another thread writes."""

from __future__ import annotations

import threading

from bridge.agent import Agent
from bridge.cache import ACTIVE_TIMEOUT, IDLE_TIMEOUT, FlowCache
from bridge.config import AgentConfig, CollectorConfig
from bridge.state import view_of
from bridge.synthetic import SyntheticSource
from bridge.top.view import WATCH_MS, CacheView, FlowRow
from ebpf.observation import Direction, EndCause, FlowObservation, TcpHealth
from tests.agent.helpers import FakeClock, Sink
from tests.operator.test_top_model import CURL, DB, LOCAL, WEB, obs, web_and_db

TCP_CLOSING = TcpHealth(1, 1500, 900, 800, 10, 4)  # FIN_WAIT1


class Owner:
    """A cache's owner as the agent is: update, sweep, hand the records that left to the view."""

    def __init__(self, *, biflow: bool = False, active_s: float = 60.0, idle_s: float = 5.0,
                 max_flows: int = 1000) -> None:
        self.now_ms = 10_000
        self.cache = FlowCache(active_timeout=active_s, idle_timeout=idle_s,
                               max_flows=max_flows, biflow=biflow)
        self.lock = threading.Lock()
        self.view = CacheView(self.cache, self.lock, linger_ms=1_000,
                              clock_ms=lambda: self.now_ms, watched=True)
        self.released: list = []

    def step(self, observations: list[FlowObservation], advance_ms: int = 0) -> None:
        self.now_ms += advance_ms
        with self.lock:
            records = self.cache.update(observations)
            records += self.cache.sweep(self.now_ms)
            self.released += self.cache.take_released()
            self.view.records_left(records, self.now_ms)

    def rows(self) -> dict[tuple[str, int], FlowRow]:
        return {(row.direction, row.sport): row for row in self.view.rows()}


def test_live_flows_are_the_caches_own() -> None:
    owner = Owner()
    owner.step(web_and_db())
    rows = owner.rows()
    assert len(rows) == 5 and len(owner.cache) == 5
    out = rows[("out", 40000)]
    assert (out.src, out.dst, out.octets, out.packets, out.retrans, out.srtt_us) == (
        LOCAL, WEB, 2_000, 20, 5, 48_000)
    assert (out.tcp_state, out.end, out.pid, out.comm) == (1, "", 100, "curl")
    owner.step(web_and_db(3), advance_ms=100)  # counters are the kernel's, cumulative
    assert owner.rows()[("out", 40000)].octets == 6_000


def test_an_ended_flow_lingers_then_leaves_and_an_idle_one_just_leaves() -> None:
    owner = Owner(idle_s=5.0)
    live = obs(Direction.EGRESS, LOCAL, WEB, 1, 443, 100, 1, last_ms=10_000)
    owner.step([live])
    # The second connection ends unseen before (the cache never holds it, uniflow): its one
    # record stands in for it, with the kernel's last TCP state.
    short = obs(Direction.EGRESS, LOCAL, DB, 2, 5432, 300, 3, last_ms=10_100,
                end=EndCause.FIN, process=CURL, tcp=TCP_CLOSING)
    owner.step([short], advance_ms=100)
    assert len(owner.cache) == 1
    rows = owner.rows()
    assert set(rows) == {("out", 1), ("out", 2)}
    assert (rows[("out", 2)].end, rows[("out", 2)].tcp_state, rows[("out", 2)].octets) == (
        "fin", 4, 300)
    owner.now_ms += 999
    assert ("out", 2) in owner.rows(), "lingers for linger_ms"
    owner.now_ms += 1
    assert set(owner.rows()) == {("out", 1)}
    owner.step([], advance_ms=4_000)  # 5 s after its last packet: idle, released, not lingering
    assert owner.released == [live.key]
    assert owner.rows() == {}
    # What the view keeps: the batches of the last linger_ms only (the idle record's).
    assert [at for at, _ in owner.view._left] == [owner.now_ms]


def test_ended_flows_are_kept_only_while_someone_watches() -> None:
    owner = Owner()
    owner.now_ms += WATCH_MS + 1  # nobody has read the view for longer than WATCH_MS
    ended = obs(Direction.EGRESS, LOCAL, DB, 2, 5432, 300, 3, last_ms=owner.now_ms,
                end=EndCause.FIN)
    owner.step([ended])
    assert not owner.view._left, "no reader: the records are not kept"
    assert owner.rows() == {}  # a reader: watched from now on
    owner.step([obs(Direction.EGRESS, LOCAL, DB, 3, 5432, 300, 3, last_ms=owner.now_ms,
                    end=EndCause.FIN)], advance_ms=WATCH_MS)
    assert [(r.sport, r.end) for r in owner.view.rows()] == [(3, "fin")]


def test_a_reused_key_shows_the_new_connection_and_a_later_end_wins() -> None:
    owner = Owner()
    first = obs(Direction.EGRESS, LOCAL, WEB, 7, 443, 100, 2, end=EndCause.RST_SENT)
    owner.step([first])
    again = obs(Direction.EGRESS, LOCAL, WEB, 7, 443, 50, 1, last_ms=10_200)
    owner.step([again], advance_ms=200)
    (row,) = owner.view.rows()
    assert (row.end, row.octets) == ("", 50)
    ended = obs(Direction.EGRESS, LOCAL, WEB, 7, 443, 80, 2, last_ms=10_300, end=EndCause.FIN)
    owner.step([ended], advance_ms=100)
    (row,) = owner.view.rows()
    assert (row.end, row.octets) == ("fin", 80)


def test_evicted_active_timeout_and_idle_records_do_not_linger() -> None:
    owner = Owner(max_flows=1, active_s=10.5, idle_s=5.0)  # obs() flows start at 1 s
    owner.step([obs(Direction.EGRESS, LOCAL, WEB, 1, 443, 100, 1, last_ms=10_000)])
    owner.step([obs(Direction.EGRESS, LOCAL, WEB, 2, 443, 100, 1, last_ms=10_100)], 100)
    assert owner.cache.evictions == 1
    assert set(owner.rows()) == {("out", 2)}
    owner.step([obs(Direction.EGRESS, LOCAL, WEB, 2, 443, 300, 3, last_ms=12_100)], 2_000)
    assert owner.cache.records_by_reason[ACTIVE_TIMEOUT] == 1
    assert [(r.sport, r.octets, r.end) for r in owner.view.rows()] == [(2, 300, "")]
    owner.step([obs(Direction.EGRESS, LOCAL, WEB, 2, 443, 400, 4, last_ms=12_200)], 100)
    owner.step([], advance_ms=5_000)  # idle: its last 100 bytes leave as an idle record
    assert owner.cache.records_by_reason[IDLE_TIMEOUT] == 1 and len(owner.cache) == 0
    assert owner.rows() == {}


def test_biflow_connection_lingers_with_both_directions() -> None:
    owner = Owner(biflow=True)
    out = obs(Direction.EGRESS, LOCAL, WEB, 40000, 443, 2_000, 20)
    back = obs(Direction.INGRESS, WEB, LOCAL, 443, 40000, 9_000, 30)
    owner.step([out, back])
    owner.step([obs(Direction.EGRESS, LOCAL, WEB, 40000, 443, 2_100, 21, last_ms=10_100,
                    end=EndCause.FIN)], advance_ms=100)
    assert len(owner.cache) == 0
    rows = owner.rows()
    assert (rows[("out", 40000)].end, rows[("out", 40000)].octets) == ("fin", 2_100)
    assert (rows[("in", 443)].end, rows[("in", 443)].octets) == ("", 9_000)


def test_the_agent_hands_its_records_to_the_view() -> None:
    sink = Sink()
    clock = FakeClock(10_000_000)
    source = SyntheticSource()
    agent = Agent(AgentConfig(collectors=(CollectorConfig(host=sink.host, port=sink.port),)),
                  source, clock=clock)
    view = view_of(agent)
    agent.on_records = view.records_left
    source.feed([obs(Direction.EGRESS, LOCAL, DB, 3, 5432, 300, 3, last_ms=clock.ms,
                     end=EndCause.FIN)])
    agent.step(0)
    assert not view._left, "nobody has read the agent's view: it keeps no records"
    assert [r.sport for r in view.rows()] == []  # top connects: ended flows are kept from now
    live = obs(Direction.EGRESS, LOCAL, WEB, 1, 443, 100, 1, last_ms=clock.ms)
    short = obs(Direction.EGRESS, LOCAL, DB, 2, 5432, 300, 3, last_ms=clock.ms,
                end=EndCause.FIN)
    source.feed([live, short])
    agent.step(0)
    assert {(r.sport, r.end) for r in view.rows()} == {(1, ""), (2, "fin")}
    clock.advance(3.0)  # past the default linger time
    agent.step(0)
    assert {(r.sport, r.end) for r in view.rows()} == {(1, "")}
    agent.shutdown(drain_seconds=0)
    sink.close()


def test_a_reader_waits_for_the_owners_lock() -> None:
    """The owner changes flows under its lock; a read copies them under it, so it never sees
    a flow half-updated, nor a flow between leaving the cache and being handed over."""
    owner = Owner()
    owner.step(web_and_db())
    read: list[int] = []
    with owner.lock:
        reader = threading.Thread(target=lambda: read.append(len(owner.view.rows())))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not read
    reader.join(60)
    assert read == [5]
