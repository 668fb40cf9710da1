"""top's data model and rendering, from a synthetic source: no kernel, no terminal."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from rich.console import Console

from bridge.cache import FlowCache
from bridge.containers import ContainerInfo
from bridge.top.live import Settings, Viewer, frames
from bridge.top.model import RateMeter, build_frame, by_host, by_process, connections, ranked
from bridge.top.render import human_bytes, render
from bridge.top.view import CacheView, FlowRow
from ebpf.observation import (
    Direction,
    EndCause,
    FlowKey,
    FlowObservation,
    ProcessInfo,
    TcpHealth,
)

LOCAL, WEB, DB = "10.0.0.1", "93.184.216.34", "10.0.0.9"
CID = "c" * 64
POD = "8d3c5e1a-27b4-4c1f-9a0e-6b2d7f3e4c5a"


def obs(direction: Direction, src: str, dst: str, sport: int, dport: int, octets: int,
        packets: int, *, process: ProcessInfo | None = None, tcp: TcpHealth | None = None,
        end: EndCause = EndCause.NONE, last_ms: int = 10_000, protocol: int = 6,
        ) -> FlowObservation:
    key = FlowKey(1, direction, 4, protocol, ipaddress.ip_address(src).packed,
                  ipaddress.ip_address(dst).packed, sport, dport)
    return FlowObservation(key, 2, octets, packets, 0x18, 1_000, last_ms, 0, process, tcp, end)


CURL = ProcessInfo(100, "curl", 1000, 7)
PSQL = ProcessInfo(200, "psql", 1000, 8)
TCP_SLOW = TcpHealth(5, 7000, 48_000, 40_000, 10, 1)
TCP_FAST = TcpHealth(0, 0, 300, 200, 10, 1)


def web_and_db(scale: int = 1) -> list[FlowObservation]:
    return [
        obs(Direction.EGRESS, LOCAL, WEB, 40000, 443, 2_000 * scale, 20 * scale,
            process=CURL, tcp=TCP_SLOW),
        obs(Direction.INGRESS, WEB, LOCAL, 443, 40000, 90_000 * scale, 70 * scale,
            process=CURL, tcp=TCP_SLOW),
        obs(Direction.EGRESS, LOCAL, DB, 40002, 5432, 30_000 * scale, 30 * scale,
            process=PSQL, tcp=TCP_FAST),
        obs(Direction.INGRESS, DB, LOCAL, 5432, 40002, 10_000 * scale, 25 * scale,
            process=PSQL, tcp=TCP_FAST),
        obs(Direction.EGRESS, LOCAL, WEB, 40004, 443, 500, 5, process=PSQL, tcp=TCP_FAST),
    ]


class StubResolver:
    def container(self, cgroup_id: int) -> ContainerInfo | None:
        return ContainerInfo("containerd", CID, POD) if cgroup_id == 8 else None


def view_of_observations(observations: list[FlowObservation]) -> CacheView:
    """A cache holding the observations, and top's view of it."""
    cache = FlowCache()
    cache.update(observations)
    return CacheView(cache, threading.Lock(), resolver=StubResolver(),  # type: ignore[arg-type]
                     clock_ms=lambda: 10_000)


def table_rows(observations: list[FlowObservation]) -> list[FlowRow]:
    return view_of_observations(observations).rows()


def test_rows_carry_the_observation_and_the_container() -> None:
    rows = {(r.direction, r.sport): r for r in table_rows(web_and_db())}
    out = rows[("out", 40000)]
    assert (out.src, out.dst, out.dport, out.octets, out.packets) == (LOCAL, WEB, 443, 2000, 20)
    assert (out.pid, out.comm, out.retrans, out.srtt_us) == (100, "curl", 5, 48_000)
    assert out.container == "" and out.pod == ""
    db = rows[("in", 5432)]
    assert (db.container, db.pod, db.runtime) == (CID, POD, "containerd")
    assert FlowRow.from_json(db.to_json()) == db


def test_directions_join_into_connections() -> None:
    conns = connections(table_rows(web_and_db()))
    assert len(conns) == 3
    web = conns[(1, 6, LOCAL, 40000, WEB, 443)]
    assert (web.bytes_out, web.bytes_in, web.total_packets) == (2_000, 90_000, 90)
    # The socket's retransmissions are shared by both directions: taken once, not doubled.
    assert web.retrans == 5 and web.srtt_us == 48_000
    assert web.process_label == "curl[100]"


def test_groups_per_process_and_per_host() -> None:
    conns = list(connections(table_rows(web_and_db())).values())
    processes = {g.label: g for g in by_process(conns)}
    assert processes["psql[200]"].connections == 2
    assert processes["psql[200]"].total_bytes == 40_500
    assert processes["psql[200]"].members == {DB, WEB}
    assert processes["psql[200]"].pod == POD
    hosts = {g.label: g for g in by_host(conns)}
    assert hosts[WEB].connections == 2
    assert hosts[WEB].total_bytes == 92_500
    assert hosts[WEB].members == {"curl", "psql"}
    assert hosts[WEB].retrans == 5
    assert hosts[WEB].srtt_us == 48_000


@pytest.mark.parametrize(
    ("sort", "first"),
    [("bytes", 40000), ("retrans", 40000), ("rtt", 40000), ("packets", 40000)],
)
def test_sort_orders(sort: str, first: int) -> None:
    conns = connections(table_rows(web_and_db()))
    order = [c.local[1] for c in ranked(conns.values(), sort)]
    assert order[0] == first
    assert order[-1] == 40004  # the smallest in every measure


def test_ranking_by_bytes_is_strictly_by_total() -> None:
    conns = connections(table_rows(web_and_db()))
    totals = [c.total_bytes for c in ranked(conns.values(), "bytes")]
    assert totals == [92_000, 40_000, 500]
    assert [c.local[1] for c in ranked(conns.values(), "bytes", limit=1)] == [40000]
    with pytest.raises(ValueError, match="sort 'size'"):
        ranked(conns.values(), "size")


def test_rates_between_frames() -> None:
    meter = RateMeter()
    first = connections(table_rows(web_and_db(1)))
    meter.apply(first, 10_000)
    assert all(c.rate == 0 for c in first.values())  # one sample: no rate yet
    second = connections(table_rows(web_and_db(3)))
    meter.apply(second, 12_000)  # two seconds later, web/db carried 3x their bytes
    web = second[(1, 6, LOCAL, 40000, WEB, 443)]
    assert web.rate == pytest.approx((3 * 92_000 - 92_000) / 2)
    idle = second[(1, 6, LOCAL, 40004, WEB, 443)]
    assert idle.rate == 0  # unchanged bytes
    frame = build_frame(second, "flows", "rate", 12_000, "test")
    assert frame.rows[0].key == web.key
    assert frame.rate_total == pytest.approx((92_000 * 2 + 40_000 * 2) / 2)


class ListFeed:
    """A feed replaying prepared samples, like AgentFeed/LocalFeed would deliver them."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def sample(self):  # type: ignore[no-untyped-def]
        return self.samples.pop(0)

    def close(self) -> None:
        pass


def test_rendered_frame_shows_the_flows() -> None:
    from bridge.top.live import Sample

    feed = ListFeed([
        Sample(table_rows(web_and_db(1)), 10_000, "synthetic"),
        Sample(table_rows(web_and_db(2)), 11_000, "synthetic",
               ["kernel ring buffer: 3 end-of-flow events lost"]),
    ])
    viewer = Viewer(feed, Settings(interval=0.01))  # type: ignore[arg-type]
    *_, frame = frames(viewer, 2)
    console = Console(record=True, width=200)
    console.print(render(frame))
    text = console.export_text()
    assert "3 connections, 2 processes, 2 remote hosts" in text
    assert "93.184.216.34:443" in text and "curl[100]" in text
    assert f"pod 8d3c5e1a {CID[:12]}" in text
    assert "48.00 ms" in text  # curl's RTT
    assert human_bytes(2 * 92_000) in text
    assert "end-of-flow events lost" in text
    lines = [line for line in text.splitlines() if "tcp " in line]
    assert "40000" in lines[0]  # the largest connection first

    viewer.settings.apply_key("p")
    viewer.settings.apply_key("r")
    console = Console(record=True, width=200)
    console.print(render(viewer.frame()))
    text = console.export_text()
    assert "view processes by retrans" in text
    first = [line for line in text.splitlines() if "[" in line and "]" in line][0]
    assert first.startswith("curl[100]")


def test_settings_keys() -> None:
    settings = Settings()
    assert settings.apply_key("h") and settings.view == "hosts"
    assert settings.apply_key("t") and settings.sort == "rtt"
    assert not settings.apply_key("x")
    with pytest.raises(ValueError):
        Settings(view="pods")
