"""collectors.md section 2, rule by rule, asserted on the bytes."""

from __future__ import annotations

import struct

import pytest

from ipfix.decoder import Decoder
from ipfix.errors import IpfixError
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.ipfix.wire import frame, ipfix_template_fields, v9_template_fields

NOW = 1_760_000_123.456  # seconds, with a fractional part on purpose


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def flow(i: int = 0, v6: bool = False, **extra) -> dict:
    end = int(NOW * 1000) - i % 900  # some end within the current, partial second
    record = {
        "sourceTransportPort": 40000 + i % 1000,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "tcpControlBits": 0x1B,
        "octetDeltaCount": 1000 + i,
        "packetDeltaCount": 10 + i,
        "flowStartMilliseconds": end - 5000 - i,
        "flowEndMilliseconds": end,
        "SRC_PROC_NAME": "curl",
    }
    if v6:
        record["sourceIPv6Address"] = bytes(15) + bytes([1])
        record["destinationIPv6Address"] = bytes(15) + bytes([2])
    else:
        record["sourceIPv4Address"] = bytes([10, 0, 0, 1])
        record["destinationIPv4Address"] = bytes([10, 0, 0, 2])
    record.update(extra)
    return record


def session(protocol: str = "ipfix", profile: str = "ntop", **kwargs) -> ExportSession:
    kwargs.setdefault("clock", Clock())
    return ExportSession(protocol, load_profile(profile), 42, **kwargs)


def templates_of(messages: list[bytes]) -> dict[int, list[tuple]]:
    out = {}
    for message in messages:
        f = frame(message)
        for set_id, body in f.sets:
            if f.version == 10 and set_id == 2:
                out.update(ipfix_template_fields(body))
            if f.version == 9 and set_id == 0:
                out.update(v9_template_fields(body))
    return out


def test_ipfix_uses_absolute_millisecond_timestamps_152_153_at_8_bytes() -> None:
    s = session()
    messages = s.encode([flow(1)])
    for fields in templates_of(messages).values():
        ids = {ie: length for ie, length, pen in fields if pen == 0}
        assert ids[152] == 8 and ids[153] == 8
        assert not {150, 151, 21, 22, 154, 155, 156, 157, 160} & set(ids)
    [record] = _records(messages[-1], s)
    assert record["flowEndMilliseconds"] == flow(1)["flowEndMilliseconds"]


@pytest.mark.parametrize("protocol", ["v9", "v5"])
def test_sysuptime_comes_from_the_same_instant_as_unix_secs(protocol: str) -> None:
    clock = Clock()
    s = session(protocol, "v5" if protocol == "v5" else "ntop", clock=clock)
    boots = set()
    for step in range(5):
        clock.t = NOW + step * 0.337  # readings at arbitrary milliseconds
        batch = [flow(i) for i in range(3)]
        for message in s.encode(batch):
            if protocol == "v9":
                _, _, uptime, secs, _, _ = struct.unpack_from(">HHIIII", message)
                boots.add(secs * 1000 - uptime)  # nfdump's boot time
            else:
                _, _, uptime, secs, nsecs = struct.unpack_from(">HHIII", message)
                boots.add(secs * 1000 + nsecs // 1_000_000 - uptime)
                first, last = struct.unpack_from(">II", message, 24 + 24)
                assert last <= uptime  # pmacct and goflow2 subtract unsigned
        decoded = [r for m in s.encode(batch) for r in Decoder().records(m, ("h", 1))]
        if protocol == "v5":
            assert [r["flowEndMilliseconds"] for r in decoded] == [
                r["flowEndMilliseconds"] for r in batch
            ]
    assert len(boots) == 1  # one virtual boot epoch: times exact to the millisecond


def test_v9_flow_times_never_exceed_sysuptime() -> None:
    s = session("v9")
    batch = [flow(i) for i in range(40)]
    latest = max(r["flowEndMilliseconds"] for r in batch)
    for message in s.encode(batch):
        _, _, uptime, secs, _, _ = struct.unpack_from(">HHIIII", message)
        boot = secs * 1000 - uptime
        for record in _records(message, s):
            assert record["flowEndMilliseconds"] - boot <= uptime
        assert secs * 1000 >= latest  # the export second is rounded up, never down


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
def test_counters_8_bytes_and_tcp_flags_1_byte(protocol: str) -> None:
    for fields in templates_of(session(protocol).template_messages()).values():
        lengths = {f[0]: f[1] for f in fields}
        assert lengths[1] == 8 and lengths[2] == 8
        assert lengths[6] == 1
        assert 23 not in lengths and 24 not in lengths  # never as reverse counters in v9


def test_ipfix_sequence_counts_data_records_before_the_message() -> None:
    s = session()
    sequence = 0
    for batch in ([flow(i) for i in range(50)], [flow(i, v6=True) for i in range(7)], [flow(3)]):
        for message in s.encode(batch):
            f = frame(message)
            assert f.header[3] == sequence
            sequence += len(_records(message, s))
    # Options data go to domain 0 with their own sequence; the flow domain's is untouched.
    [stats] = s.options_messages({"notSentFlowTotalCount": 3})
    assert frame(stats).header[4] == 0
    assert frame(stats).header[3] == 0
    assert frame(s.encode([flow(1)])[-1]).header[3] == sequence


def _records(message: bytes, s: ExportSession) -> list[dict]:
    decoder = Decoder()
    for t in s.template_messages():
        decoder.feed(t, ("h", 1))
    return decoder.records(message, ("h", 1))


def test_v9_sequence_counts_packets_and_count_is_all_records() -> None:
    s = session("v9")
    messages = s.encode([flow(i) for i in range(60)] + [flow(i, v6=True) for i in range(5)])
    messages += s.options_messages({}, interfaces={1: "lo"}, sampling=True)
    decoder = Decoder()
    for number, message in enumerate(messages):
        [m] = decoder.feed(message, ("h", 1))
        assert m.sequence == number
        records = len(m.templates) + len(m.options_templates) + len(m.records)
        records += len(m.options_records)
        assert m.count == records and m.count >= len(m.sets)


def test_v9_data_flowsets_are_padded_to_4_bytes() -> None:
    for message in session("v9").encode([flow(i) for i in range(7)]):
        assert all(length % 4 == 0 for length in frame(message).set_lengths)


def test_v5_sequence_counts_flows_and_at_most_30_records() -> None:
    s = session("v5", "v5")
    messages = s.encode([flow(i) for i in range(95)])
    assert [struct.unpack_from(">H", m, 2)[0] for m in messages] == [30, 30, 30, 5]
    assert [struct.unpack_from(">I", m, 16)[0] for m in messages] == [0, 30, 60, 90]
    assert max(map(len, messages)) == 24 + 30 * 48
    assert all(struct.unpack_from(">H", m, 22)[0] == 0 for m in messages)  # unsampled


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
@pytest.mark.parametrize("max_size", [256, 512, 1400, 9000])
def test_messages_never_exceed_the_maximum(protocol: str, max_size: int) -> None:
    """256 is the smallest maximum ExportSession accepts: the ntop profile's largest record
    (v9 IPv6, fixed-length strings) must fit in it, so a new element's v9 length counts."""
    s = session(protocol, max_message_size=max_size)
    batch = [flow(i, v6=i % 3 == 0) for i in range(500)]
    messages = s.encode(batch)
    messages += s.options_messages({}, interfaces={i: f"veth{i}" for i in range(300)})
    assert max(map(len, messages)) <= max_size
    assert sum(len(_records(m, s)) for m in messages) == 500


def test_no_empty_sets_and_no_padding_in_template_sets() -> None:
    s = session()
    messages = s.encode([flow(i) for i in range(30)]) + s.options_messages({}, sampling=True)
    for message in messages:
        f = frame(message)
        for (set_id, body), length in zip(f.sets, f.set_lengths, strict=True):
            assert length > 4
            if set_id == 2:
                parsed = ipfix_template_fields(body)
                exact = sum(4 + sum(8 if pen else 4 for _, _, pen in fl) for _, fl in parsed)
                assert exact == len(body)


def test_one_options_template_per_set_and_exporter_options_in_domain_0() -> None:
    """Statistics and interface names describe the exporter: domain 0, with its own sequence
    (1 statistics record before the interface names); only sampling is about the flow domain."""
    s = session()
    messages = s.options_messages(
        {"notSentFlowTotalCount": 7}, interfaces={1: "lo", 2: "eth0"}, sampling=True
    )
    domains, sequences = [], []
    for message in messages:
        f = frame(message)
        domains.append(f.header[4])
        sequences.append(f.header[3])
        for set_id, body in f.sets:
            if set_id == 3:
                assert len(ipfix_template_fields(body, options=True)) == 1
    assert domains == [0, 0, 42]
    assert sequences[:2] == [0, 1]
    [m] = Decoder().feed(messages[0], ("h", 1))
    assert m.options_records[0]["notSentFlowTotalCount"] == 7
    assert m.options_records[0]["systemInitTimeMilliseconds"] == int(NOW * 1000)


def test_templates_first_then_refresh_by_time_and_by_packets() -> None:
    clock = Clock()
    s = session(clock=clock, template_refresh_seconds=30, template_refresh_packets=5)
    first = s.encode([flow(1)])
    assert [frame(m).sets[0][0] for m in first] == [2, first_data_id(s)]
    assert len(frame(first[0]).sets) == 1  # templates alone, before any data
    assert not _has_templates(s.encode([flow(1)]))
    clock.t += 31
    assert _has_templates(s.encode([flow(1)]))
    # By packets: after 5 data messages (one sent since the time refresh), templates again.
    seen = [_has_templates([m]) for _ in range(12) for m in s.encode([flow(2)])]
    assert [i for i, t in enumerate(seen) if t] == [4, 10]


def first_data_id(s: ExportSession) -> int:
    return s.templates[4].template_id


def _has_templates(messages: list[bytes]) -> bool:
    return any(set_id in (0, 2) for m in messages for set_id, _ in frame(m).sets)


def test_template_ids_and_layouts() -> None:
    ipfix, v9 = session(), session("v9")
    ids = [t.template_id for t in ipfix.templates.values()]
    assert all(i >= 256 for i in ids) and len(set(ids)) == 2
    assert {t.template_id for t in v9.templates.values()}.isdisjoint(ids)  # pmacct: no clash
    standard = {t.template_id for t in session(profile="standard").templates.values()}
    assert standard.isdisjoint(ids)  # another layout never reuses an id
    assert ids == [t.template_id for t in session().templates.values()]  # stable


def test_separate_ipv4_ipv6_templates_with_vendor_elements_beside_the_5_tuple() -> None:
    tmpl = templates_of(session().template_messages())
    v4, v6 = (sorted(tmpl.items())[i][1] for i in (0, 1))
    for fields in (v4, v6):
        assert len(fields) <= 60
        assert any(pen == 35632 for _, _, pen in fields)
    all_ids = [{ie for ie, _, pen in f if pen == 0} for f in (v4, v6)]
    assert any({8, 12} <= ids and not {27, 28} & ids for ids in all_ids)
    assert any({27, 28} <= ids and not {8, 12} & ids for ids in all_ids)


def test_strings_variable_in_ipfix_fixed_nul_padded_in_v9() -> None:
    ipfix_fields = next(iter(templates_of(session().template_messages()).values()))
    assert (169, 65535, 35632) in ipfix_fields
    v9_fields = next(iter(templates_of(session("v9").template_messages()).values()))
    assert (57472 + 169, 16) in v9_fields
    message = session("v9").encode([flow(1)])[-1]
    assert b"curl" + b"\0" * 12 in message


def test_observation_domain_must_be_non_zero() -> None:
    with pytest.raises(IpfixError, match="observation domain"):
        ExportSession("ipfix", load_profile("standard"), 0)
    assert frame(session().encode([flow(1)])[0]).header[4] == 42
    assert frame(session("v9").encode([flow(1)])[0]).header[5] == 42


def test_profile_protocol_mismatch_is_an_error() -> None:
    with pytest.raises(IpfixError, match="not v5"):
        ExportSession("v5", load_profile("standard"), 1)
    with pytest.raises(IpfixError, match="not ipfix"):
        ExportSession("ipfix", load_profile("nfdump-latency"), 1)


def test_nfdump_latency_profile_uses_the_legacy_v9_ids() -> None:
    fields = next(iter(templates_of(session("v9", "nfdump-latency").template_messages()).values()))
    assert {57554, 57555, 57556, 57557} <= {ie for ie, _ in fields}


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
def test_container_id_whole_in_ipfix_and_nprobe_prefix_in_v9(protocol: str) -> None:
    container = "3f4e1a9c0b2d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"
    s = session(protocol)
    messages = s.encode([flow(0, SRC_PROC_CONTAINER_ID=container), flow(1)])
    decoded = [r for m in messages for r in _records(m, s)]
    want = container if protocol == "ipfix" else container[:16]
    assert [r["SRC_PROC_CONTAINER_ID"] for r in decoded] == [want, ""]
    assert [r["DST_PROC_CONTAINER_ID"] for r in decoded] == ["", ""]
