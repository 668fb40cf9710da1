"""Whatever an exporter sends, every way a decoded record is printed works: collect's table and
JSON lines (strict JSON), and the agent's built-in collector line (no terminal escapes)."""

from __future__ import annotations

import json
import socket
import struct

from bridge.cli.collect import Collection, json_line, table_row
from bridge.loopback import LoopbackCollector, format_flow
from ipfix.decoder import Decoder
from ipfix.jsonform import record_from_json, record_to_json

EXPORTER = ("192.0.2.31", 4739)


def _garbage_message() -> bytes:
    """A record from an exporter that sends odd lengths: integers longer than 8 bytes (which
    stay bytes), times far outside what datetime can show."""
    body = struct.pack(">HHHHHHHHHHHHHHHH", 300, 7, 1, 600, 2, 9, 4, 12, 6, 3, 152, 8, 153, 8, 7, 2)
    data = b"\x01" * 600 + b"\x02" * 9 + b"\x03" * 12 + b"\x00\x00\xff"
    data += struct.pack(">QQH", 2**64 - 1, 0, 80)
    sets = struct.pack(">HH", 2, 4 + len(body)) + body
    sets += struct.pack(">HH", 300, 4 + len(data)) + data
    return struct.pack(">HHIII", 10, 16 + len(sets), 0, 0, 1) + sets


def _garbage_record() -> dict:
    [record] = Decoder().records(_garbage_message(), EXPORTER)
    return record


def test_garbage_values_render_in_every_form() -> None:
    record = _garbage_record()
    assert isinstance(record["octetDeltaCount"], bytes) and record["tcpControlBits"] == 0xFF
    row = table_row(record)
    # A start past year 9999 is shown as the number; the duration as far as a float reaches.
    assert row.split()[:2] == [str(2**64 - 1), f"{-(2**64 - 1) / 1000:.3f}"]
    assert row.split()[2:4] == ["?", "?:80"]  # protocol sent in 12 bytes; no source address
    parsed = json.loads(json_line(record))
    assert parsed["octetDeltaCount"] == "01" * 600 and parsed["sourceTransportPort"] == 80
    assert "pkts" in format_flow(record)


def test_non_finite_floats_are_spelled_for_strict_json() -> None:
    line = json_line({"samplingProbability": float("nan"), "x": float("-inf")})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(line, parse_constant=refuse) == {"samplingProbability": "nan", "x": "-inf"}
    assert record_to_json({"y": float("inf")}) == {"y": "inf"}


def test_control_characters_do_not_reach_the_terminal() -> None:
    line = format_flow(
        {"SRC_PROC_NAME": "ev\x1b[2Jil\n", "SRC_PROC_PID": 7, "protocolIdentifier": 6}
    )
    assert "\x1b" not in line and "\n" not in line and "proc=ev\\x1b[2Jil\\n[7]" in line


def test_collection_counts_every_datagram_once() -> None:
    collection = Collection(as_json=True)
    for data in (b"", b"\x00\x0a", b"\x00\x0b" + bytes(20)):
        try:
            collection.receive(data, EXPORTER)
        except Exception as exc:  # noqa: BLE001 - asserting it is the decoder's error
            assert type(exc).__name__ == "DecodeError"
    assert collection.datagrams == 3 and collection.accepted == 0
    assert dict(collection.rejected) == {"short": 2, "version": 1}
    assert "3 rejected (short 2, version 1)" in collection.summary()
    assert record_from_json({"octetDeltaCount": 1}) == {"octetDeltaCount": 1}


def test_the_built_in_collector_survives_and_bounds_a_local_flood() -> None:
    """Anyone on the host can send to the agent's built-in collector: garbage is counted, odd
    values print, and one drain reads a bounded number of datagrams (the agent loop goes on)."""
    printed: list[str] = []
    collector = LoopbackCollector(printed.append)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(5):
                sender.sendto(b"\x00\x0a junk", (collector.host, collector.port))
            sender.sendto(_garbage_message(), (collector.host, collector.port))
        assert collector.drain(max_datagrams=4) == 0 and collector.rejected == 4
        assert collector.drain() == 1 and collector.rejected == 5
    finally:
        collector.close()
    assert len(printed) == 1 and "pkts" in printed[0]
