"""Rows straight from the cache (RowBuilder) hold exactly what RecordBuilder's dicts hold, for
every profile and protocol, and the exporter's row path sends byte for byte what the dict path
sends."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from bridge.cache import FlowCache
from bridge.config import CollectorConfig
from bridge.exporter import Exporter
from bridge.records import RecordBuilder, biflow_profile
from bridge.rows import RowBuilder
from ebpf.observation import Direction, EndCause, ProcessInfo, TcpHealth
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.harness.formats import FORMATS

from .helpers import T0, FakeClock, Sink, key, obs, reverse

EPHEMERAL = (32768, 60999)
CASES = FORMATS
CONTAINER_FIELDS = ("SRC_PROC_CONTAINER_ID", "DST_PROC_CONTAINER_ID")
CMDLINE_FIELDS = ("SRC_PROC_CMDLINE", "DST_PROC_CMDLINE")
CURL = ProcessInfo(pid=4242, comm="curl", uid=1000, cgroup_id=7)
NGINX = ProcessInfo(pid=80, comm="nginx: worker", uid=33, cgroup_id=9)
CONTAINERS = {9: "4f" * 32}  # nginx runs in a container, curl on the host


COMMAND_LINES = {(4242, "curl"): "curl -s https://example.org/"}  # nginx's is unreadable: ""


def container_ids(cgroup_id: int) -> str:
    return CONTAINERS.get(cgroup_id, "")


def command_lines(pid: int, comm: str) -> str:
    return COMMAND_LINES.get((pid, comm), "")


def with_fields(profile, names):  # type: ignore[no-untyped-def]
    """The profile plus those of `names` it does not list yet."""
    missing = tuple(n for n in names if n not in profile.fields)
    return replace(profile, fields=(*profile.fields, *missing))


def variety() -> list:
    """Observations covering every branch of record building: both families and directions,
    TCP/UDP/ICMP/ICMPv6, client and server ports, with and without process and RTT, and with the
    kernel saying who connected or not (then ports decide)."""
    out = []
    shapes = itertools.product(
        (("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")),
        (Direction.EGRESS, Direction.INGRESS),
        ((6, 45000, 443), (6, 443, 45000), (6, 5000, 80), (17, 53000, 53), (1, 0, 8 << 8)),
        (None, CURL, NGINX),
        (None, TcpHealth(3, 4344, 40_000, 39_000, 10, 1), TcpHealth(0, 0, 0, 0, 10, 1)),
    )
    for i, ((src, dst), direction, (protocol, sport, dport), process, tcp) in enumerate(shapes):
        if protocol == 1 and ":" in src:
            protocol = 58
        k = key(sport + i % 7, dport, src=src, dst=dst, direction=direction, protocol=protocol)
        out.append(
            obs(k, 100 * (i + 1), i + 1, T0, T0 + i, flags=0x1B | (i & 0x100), end=EndCause.FIN,
                ifindex=1 + i % 3, process=process, tcp=tcp,
                local_initiated=(None, True, False)[i // 2 % 3])
        )  # fmt: skip
    return out


def dict_rows(session: ExportSession, records: list[dict]) -> list[tuple[int, list[tuple]]]:
    """RecordBuilder's dicts as rows, grouped as RowBuilder groups them (IPv4 first)."""
    out = []
    for family in (4, 6):
        layout = session.row_layout(family)
        mine = [r for r in records if (r["ipVersion"] == family)]
        rows = [tuple(r.get(k, default) for k, default in layout) for r in mine]
        if rows:
            out.append((family, rows if layout else [()] * len(rows)))
    return out


@pytest.mark.parametrize("with_process_extras", [False, True])
@pytest.mark.parametrize(("protocol", "profile_name"), CASES)
def test_rows_hold_what_the_dicts_hold(
    protocol: str, profile_name: str, with_process_extras: bool
) -> None:
    profile = load_profile(profile_name)
    if with_process_extras:  # a profile that asks for the container id and the command line
        profile = with_fields(profile, (*CONTAINER_FIELDS, *CMDLINE_FIELDS))
    session = ExportSession(protocol, profile, 1)
    layouts = {family: session.row_layout(family) for family in (4, 6)}
    exports = FlowCache().update(variety())
    assert len(exports) == 180
    for containers, cmdlines in ((None, None), (container_ids, command_lines)):
        records = RecordBuilder(
            profile.fields, ephemeral=EPHEMERAL, container_ids=containers, command_lines=cmdlines
        ).build(exports)
        rows = RowBuilder(
            layouts,
            profile.fields,
            ephemeral=EPHEMERAL,
            container_ids=containers,
            command_lines=cmdlines,
        ).build(exports)
        assert rows == dict_rows(session, records)
        if containers is not None and with_process_extras:
            # The container and the command line go on the local side, like the process name.
            for side, direction in (("SRC", Direction.EGRESS), ("DST", Direction.INGRESS)):
                local = [e[0].process for e in exports if e[0].key.direction == direction]
                assert local.count(NGINX) > 0 and local.count(CURL) > 0
                assert [r.get(f"{side}_PROC_CONTAINER_ID") for r in records].count(
                    "4f" * 32
                ) == local.count(NGINX)
                assert [r.get(f"{side}_PROC_CMDLINE") for r in records].count(
                    COMMAND_LINES[(4242, "curl")]
                ) == local.count(CURL)
        if cmdlines is None:
            assert not any(k.endswith("_PROC_CMDLINE") for r in records for k in r)


def test_biflow_rows_hold_what_the_dicts_hold() -> None:
    ntop = load_profile("ntop")
    profile = biflow_profile(with_fields(ntop, (*CONTAINER_FIELDS, *CMDLINE_FIELDS)))
    session = ExportSession("ipfix", profile, 1)
    layouts = {family: session.row_layout(family) for family in (4, 6)}
    cache = FlowCache(biflow=True)
    live = {o.key: o.__class__(**{**_fields(o), "end": EndCause.NONE}) for o in variety()}
    paired = list(live.values())[::2]  # the others stay one-sided
    cache.update(list(live.values()))
    cache.update([obs(reverse(o.key), 7, 1, T0, T0 + 1, process=o.process) for o in paired])
    exports = cache.flush_all()
    assert sum(e[8] is not None for e in exports) == len(paired) > 20
    extras = {"container_ids": container_ids, "command_lines": command_lines}
    records = RecordBuilder(
        profile.fields, biflow=True, ephemeral=EPHEMERAL, **extras
    ).build(exports)
    rows = RowBuilder(layouts, profile.fields, biflow=True, ephemeral=EPHEMERAL, **extras).build(
        exports
    )
    assert any("4f" * 32 in (r.get("SRC_PROC_CONTAINER_ID"), r.get("DST_PROC_CONTAINER_ID"))
               for r in records)
    assert any("curl -s" in (r.get("SRC_PROC_CMDLINE", "") + r.get("DST_PROC_CMDLINE", ""))
               for r in records)
    assert rows == dict_rows(session, records)


@pytest.mark.parametrize(("protocol", "profile_name"), CASES)
def test_exporter_row_path_sends_what_the_dict_path_sends(protocol: str, profile_name: str) -> None:
    sinks = [Sink(), Sink()]
    try:
        exporters = [
            Exporter(
                CollectorConfig(host=s.host, port=s.port, protocol=protocol, profile=profile_name),
                4242,
                clock=FakeClock(T0 + 1000),
            )
            for s in sinks
        ]
        for start in (0, 60, 120):
            exports = FlowCache().update(variety()[start : start + 60])
            exporters[0].export(exports)
            exporters[1].send_records(exporters[1].builder.build(exports))
        for s in sinks:
            s.receive(expect=10)
        assert sinks[0].datagrams == sinks[1].datagrams
        assert len(sinks[0].datagrams) >= 3
        assert exporters[0].records_exported == exporters[1].records_exported
        assert exporters[0].records_refused == exporters[1].records_refused
        if protocol == "v5":
            assert exporters[0].records_refused == 90  # the IPv6 half
    finally:
        for s in sinks:
            s.close()


@pytest.mark.parametrize("profile_name", ["standard", "ntop"])
def test_a_value_the_record_pack_refuses_sends_what_the_dict_path_sends(profile_name: str) -> None:
    """IPFIX rows are packed as they are made; a value out of its field's range (an ifindex past
    32 bits, a counter past 64) makes that batch go as tuples, which the careful path saturates,
    as for record dicts."""
    sinks = [Sink(), Sink()]
    try:
        exporters = [
            Exporter(
                CollectorConfig(host=s.host, port=s.port, profile=profile_name),
                4242,
                clock=FakeClock(T0 + 1000),
            )
            for s in sinks
        ]
        assert exporters[0].session.direct_pack(4) is not None
        odd = [
            obs(key(41000, 443), 1 << 64, 3, T0, T0 + 5, end=EndCause.FIN),
            obs(key(41001, 443), 900, 3, T0, T0 + 5, end=EndCause.FIN, ifindex=1 << 40),
        ]
        for batch in (variety()[:60], odd, variety()[60:120]):
            exports = FlowCache().update(batch)
            exporters[0].export(exports)
            exporters[1].send_records(exporters[1].builder.build(exports))
        for s in sinks:
            s.receive(expect=3)
        assert sinks[0].datagrams == sinks[1].datagrams
        got = {r["sourceTransportPort"]: r for m in sinks[0].messages for r in m.records}
        assert got[41000]["octetDeltaCount"] == (1 << 64) - 1
        assert got[41001]["egressInterface"] == (1 << 32) - 1
        assert exporters[0].records_exported == 122
    finally:
        for s in sinks:
            s.close()


def _fields(o) -> dict:
    return {name: getattr(o, name) for name in o.__slots__}
