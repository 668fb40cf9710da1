"""How data records become messages on the fast path: fixed-length records are packed one
message body at a time, so these check what that must not change. Every message but the last of
a batch is as full as the size allows (sets of both families share messages); a value the fast
path cannot take midway is encoded as the careful path would; and a batch refused midway leaves
no trace: the next messages are byte for byte those of a session that never saw it."""

from __future__ import annotations

import struct

import pytest

from ipfix.decoder import Decoder
from ipfix.errors import IpfixError
from ipfix.packer import Packed
from ipfix.profile import load_profile
from ipfix.session import ExportSession
from tests.ipfix.strategies import NOW_MS
from tests.ipfix.wire import frame

EXPORTER = ("192.0.2.7", 4739)
V9_HEADER = 20
# Records of 50 (IPv4) and 74 (IPv6) bytes in v9, so data FlowSets need padding; every shipped
# profile happens to have v9 records of a multiple of 4 bytes.
ODD_PROFILE = """
name = "odd"
protocols = ["ipfix", "v9"]
fields = [
    "sourceIPv4Address", "destinationIPv4Address", "sourceIPv6Address", "destinationIPv6Address",
    "sourceTransportPort", "destinationTransportPort", "protocolIdentifier",
    { element = "tcpControlBits", length = 1 }, "ipVersion", "ipClassOfService",
    "octetDeltaCount", "packetDeltaCount", "flowStartMilliseconds", "flowEndMilliseconds",
    "ingressInterface", "egressInterface", "flowDirection", "flowEndReason",
]
"""


@pytest.fixture(scope="module")
def odd_profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("encode") / "odd.toml"
    path.write_text(ODD_PROFILE)
    return str(path)


def fixed_clock() -> float:
    return NOW_MS / 1000


def make_session(protocol: str, profile: str = "standard", **kwargs) -> ExportSession:
    kwargs.setdefault("clock", fixed_clock)
    profile = "v5" if protocol == "v5" else profile
    return ExportSession(protocol, load_profile(profile), 9, exporting_process_id=3, **kwargs)


def record(i: int, family: int = 4) -> dict:
    end = NOW_MS - 2000 - i
    out = {
        "sourceTransportPort": 1024 + i,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "octetDeltaCount": 1500 * i + 40,
        "packetDeltaCount": i + 1,
        "flowStartMilliseconds": end - 30_000,
        "flowEndMilliseconds": end,
    }
    if family == 6:
        out["sourceIPv6Address"] = bytes(15) + bytes([1])
        out["destinationIPv6Address"] = bytes(15) + bytes([2])
    else:
        out["sourceIPv4Address"] = bytes([10, 1, i >> 8 & 0xFF, i & 0xFF])
        out["destinationIPv4Address"] = bytes([10, 2, 0, 1])
    return out


def rows_of(session: ExportSession, family: int, numbers: range) -> list[tuple]:
    layout = session.row_layout(family)
    return [tuple(record(i, family).get(key, value) for key, value in layout) for i in numbers]


def replaced(row: tuple, session: ExportSession, family: int, **values: object) -> tuple:
    keys = [key for key, _ in session.row_layout(family)]
    out = list(row)
    for key, value in values.items():
        out[keys.index(key)] = value
    return tuple(out)


def decoded(session: ExportSession, messages: list[bytes]) -> list:
    decoder = Decoder()
    for message in session.template_messages():
        decoder.feed(message, EXPORTER)
    return [m for message in messages for m in decoder.feed(message, EXPORTER)]


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
@pytest.mark.parametrize("profile", ["standard", "odd"])
@pytest.mark.parametrize("max_size", [256, 301, 1400, 9000])
def test_every_message_but_the_last_is_full(
    protocol: str, profile: str, max_size: int, odd_profile: str
) -> None:
    session = make_session(
        protocol, odd_profile if profile == "odd" else profile, max_message_size=max_size
    )
    runs = [
        (4, rows_of(session, 4, range(0, 70))),
        (6, rows_of(session, 6, range(70, 79))),
        (4, rows_of(session, 4, range(79, 80))),
        (6, rows_of(session, 6, range(80, 200))),
        (4, rows_of(session, 4, range(200, 1000))),
    ]
    messages = session.encode_runs(runs)
    data = [m for m in decoded(session, messages) if m.records]
    ports = [r["sourceTransportPort"] for m in data for r in m.records]
    assert ports == list(range(1024, 2024))  # every record once, in order
    family_of = {t.template_id: family for family, t in session.templates.items()}
    length_of = {t.template_id: t.record_length for t in session.templates.values()}
    data_messages = [m for m in messages if any(s[0] >= 256 for s in frame(m).sets)]
    assert len(data_messages) == len(data)
    align = 4 if protocol == "v9" else 1
    for message, following in zip(data_messages, data_messages[1:], strict=False):
        assert len(message) <= max_size
        last_set_id, last_body = frame(message).sets[-1]
        next_set_id = frame(following).sets[0][0]
        size = length_of[next_set_id]
        if next_set_id == last_set_id:  # the next record would have joined the last set
            records = len(last_body) // size + 1
            grown = 4 + records * size + (-(records * size) % align)
            extra = grown - (4 + len(last_body))
        else:  # it would have needed a set of its own
            extra = 4 + size + (-size % align)
        assert len(message) + extra > max_size, (family_of[next_set_id], len(message))


@pytest.mark.parametrize("protocol", ["ipfix", "v9", "v5"])
def test_values_the_fast_path_refuses_midway_are_encoded_as_the_careful_path_would(
    protocol: str,
) -> None:
    """A counter too large for its field saturates and None takes the default, in the body
    where it occurs; the bodies before and after it stay on the fast path."""
    fast, careful = make_session(protocol), make_session(protocol)
    rows = rows_of(fast, 4, range(400))
    octets = 4 if protocol == "v5" else 8
    saturated = (1 << 8 * octets) - 1
    bad = list(rows)
    bad[250] = replaced(rows[250], fast, 4, octetDeltaCount=1 << 70, packetDeltaCount=None)
    fixed = list(rows)
    fixed[250] = replaced(rows[250], fast, 4, octetDeltaCount=saturated, packetDeltaCount=0)
    messages = fast.encode_rows(4, bad)
    assert messages == careful.encode_rows(4, fixed)
    records = [r for m in decoded(fast, messages) for r in m.records]
    assert len(records) == 400
    assert records[250]["octetDeltaCount"] == saturated
    assert records[250]["packetDeltaCount"] == 0
    assert records[251]["octetDeltaCount"] == 1500 * 251 + 40


@pytest.mark.parametrize("protocol", ["ipfix", "v9", "v5"])
def test_a_batch_refused_midway_leaves_no_trace(protocol: str) -> None:
    """The bad row sits several messages (and a template refresh) into its batch: messages made
    before it are dropped with it, so sequence numbers and the refresh count must not move."""
    kwargs = {} if protocol == "v5" else {"template_refresh_packets": 3}
    saw_it, never_saw_it = make_session(protocol, **kwargs), make_session(protocol, **kwargs)
    first, second = range(0, 90), range(90, 300)
    expected = never_saw_it.encode_rows(4, rows_of(never_saw_it, 4, first))
    expected += never_saw_it.encode_rows(4, rows_of(never_saw_it, 4, second))

    got = saw_it.encode_rows(4, rows_of(saw_it, 4, first))
    bad = rows_of(saw_it, 4, range(1000, 1200))
    bad[150] = replaced(bad[150], saw_it, 4, octetDeltaCount="lots")
    with pytest.raises(IpfixError, match="octetDeltaCount.*'lots'"):
        saw_it.encode_rows(4, bad)
    got += saw_it.encode_rows(4, rows_of(saw_it, 4, second))
    assert got == expected
    if protocol == "ipfix":  # and the collector sees an unbroken sequence
        sequences = [m.sequence for m in decoded(saw_it, got) if m.records]
        counts = [len(m.records) for m in decoded(saw_it, got) if m.records]
        assert sequences == [sum(counts[:i]) for i in range(len(counts))]
    assert saw_it.records_sent == 300


def test_v9_full_packets_carry_whole_padded_flowsets(odd_profile: str) -> None:
    """A record length that is not a multiple of 4: the padding counts in what fits."""
    session = make_session("v9", odd_profile, max_message_size=512)
    assert session.templates[4].record_length == 50
    messages = session.encode_rows(4, rows_of(session, 4, range(100)))
    data = [m for m in messages if struct.unpack_from(">H", m, V9_HEADER)[0] >= 256]
    # 9 records: a set of 4 + 450 + 2 padding = 456 bytes fits in 492; 10 would need 504.
    counts = [struct.unpack_from(">H", m, 2)[0] for m in data]
    assert counts == [9] * 11 + [1]
    assert [len(m) for m in data] == [V9_HEADER + 456] * 11 + [V9_HEADER + 56]
    assert all(length % 4 == 0 for m in data for length in frame(m).set_lengths)


@pytest.mark.parametrize("max_size", [1400, 9000, 65535])
def test_variable_length_records_fill_messages_too(max_size: int) -> None:
    """IPFIX strings of every length class (empty, short, past the 255-byte prefix): records
    are packed a chunk ahead of the body, and a 65535-byte message holds more than a chunk."""
    session = make_session("ipfix", "ntop", max_message_size=max_size)
    assert session.templates[4].variable
    names = ["", "nginx", "é" * 130, "postgres: writer", "sshd"]  # 260 bytes: a 3-byte prefix
    batch = [dict(record(i), SRC_PROC_NAME=names[i % len(names)]) for i in range(1500)]
    layout = session.row_layout(4)
    rows = [tuple(r.get(key, value) for key, value in layout) for r in batch]
    messages = [m for m in session.encode_rows(4, rows) if frame(m).sets[0][0] >= 256]
    counts = [len(m.records) for m in decoded(session, messages)]
    got = [r for m in decoded(session, messages) for r in m.records]
    assert [r["SRC_PROC_NAME"] for r in got] == [r["SRC_PROC_NAME"] for r in batch]

    def alone(row: tuple) -> int:
        """One record's encoded length, from a message of its own."""
        single = make_session("ipfix", "ntop", max_message_size=max_size)
        [message] = [m for m in single.encode_rows(4, [row]) if frame(m).sets[0][0] >= 256]
        return len(message) - 16 - 4

    lengths = {name: alone(rows[i]) for i, name in enumerate(names)}
    assert all(len(m) <= max_size for m in messages)
    position = 0
    for message, count in zip(messages[:-1], counts, strict=False):
        position += count  # the first record of the next message did not fit in this one
        assert len(message) + lengths[batch[position]["SRC_PROC_NAME"]] > max_size
    if max_size == 65535:
        assert len(got) / len(messages) > 256  # more records per message than one chunk


@pytest.mark.parametrize("profile", ["standard", "ntop", "odd"])
@pytest.mark.parametrize("max_size", [600, 1400, 9000])  # 600: a 260-byte name and its record
def test_records_packed_by_the_caller_make_the_same_messages_as_rows(
    profile: str, max_size: int, odd_profile: str
) -> None:
    """direct_pack: rows packed as they are made (the agent's row builder) give byte for byte
    the messages of the same rows passed as tuples: fixed-length sets and IPFIX strings, full
    bodies and IPv4/IPv6 sets sharing a message."""
    name = odd_profile if profile == "odd" else profile
    names = ["", "nginx", "é" * 130, "postgres: writer"]
    as_rows, packed = make_session("ipfix", name, max_message_size=max_size), make_session(
        "ipfix", name, max_message_size=max_size
    )
    runs = []
    for family, numbers in ((4, range(0, 70)), (6, range(70, 79)), (4, range(79, 400))):
        layout = as_rows.row_layout(family)
        batch = [dict(record(i, family), SRC_PROC_NAME=names[i % 4]) for i in numbers]
        runs.append((family, [tuple(r.get(k, value) for k, value in layout) for r in batch]))
    packs = {family: packed.direct_pack(family) for family in (4, 6)}
    assert all(packs.values())
    packed_runs = [(f, Packed(packs[f](*row) for row in rows)) for f, rows in runs]
    expected = as_rows.encode_runs(runs)
    assert packed.encode_runs(packed_runs) == expected
    ports = [r["sourceTransportPort"] for m in decoded(packed, expected) for r in m.records]
    assert ports == [1024 + i for i in range(400)]


@pytest.mark.parametrize("protocol", ["v9", "v5"])
def test_relative_times_are_never_packed_ahead(protocol: str) -> None:
    """v9/v5 records depend on the batch's time base: no direct pack, and packed records are
    refused rather than sent with the wrong times."""
    session = make_session(protocol)
    assert session.direct_pack(4) is None
    ipfix = make_session("ipfix")
    with pytest.raises(IpfixError, match="packed records"):
        session.encode_runs([(4, Packed([ipfix.direct_pack(4)(*rows_of(ipfix, 4, range(1))[0])]))])
