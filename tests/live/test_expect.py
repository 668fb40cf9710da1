"""The live tests' judge of a connection's records: a late tail merges back, nothing else does;
and when a direction's records are all out (its late tail included)."""

from __future__ import annotations

from ebpf.observation import Direction
from tests.harness.netlab import Endpoint
from tests.harness.netlab_capture import CaptureFlow
from tests.harness.netlab_proc import ProcReport
from tests.live.expect import (
    ACTIVE_TIMEOUT,
    END_OF_FLOW,
    Expected,
    exported_in_full,
    merged_late_tail,
)


def record(start: int, end: int, octets: int, packets: int, flags: int, reason: int) -> dict:
    return {"flowStartMilliseconds": start, "flowEndMilliseconds": end, "octetDeltaCount": octets,
            "packetDeltaCount": packets, "tcpControlBits": flags, "flowEndReason": reason,
            "protocolIdentifier": 6}


LAB_HOST = Endpoint("host", "fb-test", "veth0", "02:00:00:00:00:01", "198.18.0.1", "fd00::1",
                    7, 4026531840)
CLIENT, SERVER = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])


def want_fields(want: Expected) -> dict:
    """The fields by which records_of finds the records of `want` (an egress direction)."""
    _, _, protocol, src, dst, sport, dport = want.key
    return {"sourceIPv4Address": src, "destinationIPv4Address": dst, "sourceTransportPort": sport,
            "destinationTransportPort": dport, "protocolIdentifier": protocol,
            "flowDirection": int(Direction.EGRESS), "egressInterface": want.endpoint.ifindex}


def test_duplicate_ack_after_the_close_merges_into_the_connection():
    connection = record(1000, 1040, 3580, 11, 0x1B, END_OF_FLOW)
    late = record(1052, 1052, 64, 1, 0x10, ACTIVE_TIMEOUT)
    assert merged_late_tail([connection, late]) == [
        record(1000, 1052, 3644, 12, 0x1B, END_OF_FLOW)]


def test_a_new_connection_or_a_split_in_the_middle_is_not_a_tail():
    connection = record(1000, 1040, 3580, 11, 0x1B, END_OF_FLOW)
    reused_port = record(1100, 1140, 3580, 11, 0x1B, END_OF_FLOW)  # SYN: a new connection
    overlapping = record(1030, 1050, 64, 1, 0x10, ACTIVE_TIMEOUT)
    bulky = record(1050, 1060, 9000, 6, 0x18, ACTIVE_TIMEOUT)
    timed_out = record(1000, 1040, 3580, 11, 0x1B, ACTIVE_TIMEOUT)
    for records in ([connection, reused_port], [connection, overlapping],
                    [connection, bulky], [timed_out, record(1052, 1052, 64, 1, 0x10, 2)]):
        assert merged_late_tail(records) == records
    assert merged_late_tail([connection]) == [connection]


def test_a_tail_after_a_split_flow_merges_into_its_last_record():
    periods = [record(1000, 3000, 90000, 60, 0x18, ACTIVE_TIMEOUT),
               record(3001, 5000, 90000, 60, 0x18, ACTIVE_TIMEOUT)]
    end = record(5001, 5040, 3000, 3, 0x11, END_OF_FLOW)
    late = record(5052, 5052, 64, 1, 0x10, ACTIVE_TIMEOUT)
    assert merged_late_tail([*periods, end, late]) == [
        *periods, record(5001, 5052, 3064, 4, 0x11, END_OF_FLOW)]


def test_a_direction_is_exported_in_full_once_its_late_tail_is_out():
    truth = CaptureFlow()
    for at in range(12):
        truth.add(1.0 + at / 1000, 300)
    want = Expected(LAB_HOST, (Direction.EGRESS, 4, 6, CLIENT, SERVER, 40000, 5000), truth,
                    ProcReport(1, "fbcli", ("198.18.0.1", 40000), ("198.18.0.2", 5000), 0, 0, ""))
    connection = {**record(1000, 1010, 3300, 11, 0x1B, END_OF_FLOW), **want_fields(want)}
    late = {**record(1011, 1011, 300, 1, 0x10, ACTIVE_TIMEOUT), **want_fields(want)}
    assert not exported_in_full([connection], want)  # the capture's 12th packet is still due
    assert exported_in_full([connection, late], want)
    assert not exported_in_full([late], want)  # no end-of-flow record yet
